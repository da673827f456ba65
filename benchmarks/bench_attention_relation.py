"""Benchmark of kdops.attention_relation_loss (forward + backward) against the materialised torch
version (kdops.reference: ``[B, H, L, L]`` relations of both models), eager and torch.compile.

    python benchmarks/bench_attention_relation.py                       # B=8, 12 heads, d=64, L 512 2048
    python benchmarks/bench_attention_relation.py --lengths 512 --repeats 3 --methods kdops torch
    python benchmarks/bench_attention_relation.py --batch 1 --heads 4 --lengths 2048 8192 --memory-cap-gib 8

Each (method, L) runs in a fresh subprocess so that the peak resident set of one does not hide
another's: time is the median of ``--repeats`` calls after one warm-up, peak memory the rise of
the process's peak resident set over the inputs during one call (kdops.bench.measure). Each
subprocess's address space is capped at ``--memory-cap-gib`` (a method that needs more reports
that it does not fit instead of pushing a shared machine into swap or the OOM killer). Writes a
table and benchmarks/results/attention-relation-cpu-B<batch>-H<heads>-L<lengths>-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

METHODS = ("kdops", "torch", "torch.compile")
RESULTS = Path(__file__).resolve().parent / "results"


def _inputs(batch: int, heads: int, length: int, dim: int):
    import torch

    torch.manual_seed(0)
    student = [torch.randn(batch, heads, length, dim, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(batch, heads, length, dim) for _ in range(2)]
    return student, teacher


def run_one(method: str, batch: int, heads: int, length: int, dim: int, repeats: int) -> dict:
    """Time and peak memory of one method at one length, in this process."""
    import torch

    import kdops
    from kdops.bench.measure import median_seconds, peak_extra_bytes, return_freed_memory

    return_freed_memory()
    (sa, sb), (ta, tb) = _inputs(batch, heads, length, dim)
    if method == "kdops":
        loss_fn = lambda a, b: kdops.attention_relation_loss(a, b, ta, tb)  # noqa: E731
    else:
        loss_fn = lambda a, b: kdops.reference.attention_relation_loss(a, b, ta, tb)  # noqa: E731
        if method == "torch.compile":
            loss_fn = torch.compile(loss_fn)

    def step():
        loss = loss_fn(sa, sb)
        torch.autograd.grad(loss, (sa, sb))

    device = torch.device("cpu")
    step()  # warm-up (and compilation)
    peak = peak_extra_bytes(step, device)
    seconds = median_seconds(step, device, repeats=repeats, warmup=0)
    return dict(method=method, batch=batch, heads=heads, length=length, dim=dim, seconds=seconds,
                peak_mib=peak / 2**20, load_average_1min=os.getloadavg()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per (method, L) subprocess")
    parser.add_argument("--memory-cap-gib", type=float, default=16.0,
                        help="address-space limit of each (method, L) subprocess")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        cap = int(args.memory_cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        method, length = args.one[0], int(args.one[1])
        try:
            row = run_one(method, args.batch, args.heads, length, args.dim, args.repeats)
        except (MemoryError, RuntimeError) as error:  # torch's CPU allocator raises a RuntimeError
            if not isinstance(error, MemoryError) and "allocate" not in str(error):
                raise
            tried = re.search(r"allocate (\d+) bytes", str(error))
            failed = f"an allocation of {int(tried[1]) / 2**30:.2f} GiB failed" if tried else str(error)[:200]
            row = dict(method=method, length=length,
                       error=f"does not fit in the {args.memory_cap_gib:g} GiB cap ({failed})")
        print(json.dumps(row))
        return 0

    import torch

    from kdops.bench.measure import describe_machine, machine_info

    rows = []
    for length in args.lengths:
        for method in args.methods:
            command = [sys.executable, __file__, "--one", method, str(length), "--batch", str(args.batch),
                       "--heads", str(args.heads), "--dim", str(args.dim), "--repeats", str(args.repeats),
                       "--memory-cap-gib", str(args.memory_cap_gib)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                row = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else
                       dict(method=method, length=length, error=done.stderr.strip().splitlines()[-1:]))
            except subprocess.TimeoutExpired:
                row = dict(method=method, length=length, error=f"over {args.timeout:.0f} s")
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = machine_info(torch.device("cpu"))
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = dict(command="python " + " ".join([f"benchmarks/{Path(__file__).name}", *(argv or sys.argv[1:])]),
                  machine=info, rows=rows)
    print(f"\n{result['command']}\n{describe_machine(info)}\n")
    print("| L | method | time (s) | peak memory (MiB) | time / kdops | memory / kdops |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        base = next((r for r in rows if r["length"] == length and r["method"] == "kdops" and "seconds" in r), None)
        for r in (r for r in rows if r["length"] == length):
            if "seconds" not in r:
                print(f"| {length} | {r['method']} | {r['error']} | | | |")
                continue
            ratio = (f"{r['seconds'] / base['seconds']:.2f} | {r['peak_mib'] / max(base['peak_mib'], 1e-9):.1f}"
                     if base else " | ")
            print(f"| {length} | {r['method']} | {r['seconds']:.3f} | {r['peak_mib']:.1f} | {ratio} |")
    RESULTS.mkdir(exist_ok=True)
    shape = f"B{args.batch}-H{args.heads}-L{'-'.join(map(str, args.lengths))}"
    out = RESULTS / f"attention-relation-cpu-{shape}-{info['date'][:10]}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
