"""Benchmark of kdops.attention_relation_loss (forward + backward) against the materialised torch
version (kdops.reference: ``[B, H, L, L]`` relations of both models), eager and torch.compile.

    python benchmarks/bench_attention_relation.py                       # B=8, 12 heads, d=64, L 512 2048
    python benchmarks/bench_attention_relation.py --lengths 512 --repeats 3 --methods kdops torch
    python benchmarks/bench_attention_relation.py --preset long-cpu --memory-cap-gib 8   # B=1, 4 heads, L 2048 8192
    python benchmarks/bench_attention_relation.py --preset issue --device cuda  # the issue's sizes (make gpu-check)

Presets (``--preset``; explicit ``--batch`` / ``--heads`` / ``--dim`` / ``--lengths`` win): ``issue``
B=8, 12 heads, d=64, L 512 2048 8192 (issue 14's sizes: on a GPU, or on CPU for hours);
``cpu`` the same at L 512 2048 (what a 2-core CPU runs in minutes); ``long-cpu`` B=1, 4 heads,
L 2048 8192. Each (method, L) runs in a fresh subprocess so that the peak memory of one does not
hide another's: time is the median of ``--repeats`` calls after one warm-up, peak memory the rise
over the inputs during one call (kdops.bench.measure: the process's peak resident set on CPU, the
CUDA allocator's peak on a GPU). On CPU each subprocess's address space is capped at
``--memory-cap-gib`` (a method that needs more reports that it does not fit instead of pushing a
shared machine into swap or the OOM killer); on a GPU a method out of device memory reports the
same. ``kdops`` is kdops.attention_relation_loss with ``--backend`` (default: the automatic choice
for the device), ``torch`` the reference that materialises the ``[B, H, L, L]`` relations,
``torch.compile`` that reference compiled. Writes a table and (after every row, so that a run cut
short keeps what it measured) ``--out``, default
benchmarks/results/attention-relation-<device>-B<batch>-H<heads>-L<lengths>-<date>.json, and the
table next to it as .md.
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

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's kdops, installed or not
    sys.path.insert(0, str(REPO))
METHODS = ("kdops", "torch", "torch.compile")
RESULTS = REPO / "benchmarks" / "results"
PRESETS = {
    "issue": dict(batch=8, heads=12, dim=64, lengths=[512, 2048, 8192]),
    "cpu": dict(batch=8, heads=12, dim=64, lengths=[512, 2048]),
    "long-cpu": dict(batch=1, heads=4, dim=64, lengths=[2048, 8192]),
}


def _inputs(batch: int, heads: int, length: int, dim: int, device: str):
    import torch

    torch.manual_seed(0)
    student = [torch.randn(batch, heads, length, dim, device=device, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(batch, heads, length, dim, device=device) for _ in range(2)]
    return student, teacher


def run_one(method: str, batch: int, heads: int, length: int, dim: int, repeats: int, device: str = "cpu",
            backend: str | None = None) -> dict:
    """Time and peak memory of one method at one length, in this process."""
    import torch

    import kdops
    from kdops.bench.measure import median_seconds, peak_extra_bytes, return_freed_memory

    return_freed_memory()
    (sa, sb), (ta, tb) = _inputs(batch, heads, length, dim, device)
    if method == "kdops":
        loss_fn = lambda a, b: kdops.attention_relation_loss(a, b, ta, tb, backend=backend)  # noqa: E731
    else:
        loss_fn = lambda a, b: kdops.reference.attention_relation_loss(a, b, ta, tb)  # noqa: E731
        if method == "torch.compile":
            loss_fn = torch.compile(loss_fn)

    def step():
        loss = loss_fn(sa, sb)
        torch.autograd.grad(loss, (sa, sb))

    dev = torch.device(device)
    step()  # warm-up (and compilation)
    peak = peak_extra_bytes(step, dev)
    seconds = median_seconds(step, dev, repeats=repeats, warmup=0)
    return dict(method=method, backend=(backend or "automatic") if method == "kdops" else None, batch=batch,
                heads=heads, length=length, dim=dim, seconds=seconds, peak_mib=peak / 2**20,
                load_average_1min=os.getloadavg()[0])


def table(rows: list[dict], lengths: list[int]) -> list[str]:
    """Markdown rows: time and peak memory per (L, method), and their ratios to kdops's."""
    lines = ["| L | method | time (s) | peak memory (MiB) | time / kdops | memory / kdops |",
             "|---|---|---|---|---|---|"]
    for length in lengths:
        base = next((r for r in rows if r["length"] == length and r["method"] == "kdops" and "seconds" in r), None)
        for r in (r for r in rows if r["length"] == length):
            if "seconds" not in r:
                lines.append(f"| {length} | {r['method']} | {r['error']} | | | |")
                continue
            ratio = (f"{r['seconds'] / base['seconds']:.2f} | {r['peak_mib'] / max(base['peak_mib'], 1e-9):.1f}"
                     if base else " | ")
            lines.append(f"| {length} | {r['method']} | {r['seconds']:.3f} | {r['peak_mib']:.1f} | {ratio} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, help="batch, heads, d and lengths of a preset (see above)")
    parser.add_argument("--batch", type=int, help="default 8")
    parser.add_argument("--heads", type=int, help="default 12")
    parser.add_argument("--dim", type=int, help="default 64")
    parser.add_argument("--lengths", type=int, nargs="+", help="default 512 2048")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--backend", default=None, help="kdops backend of the kdops method (default: automatic)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per (method, L) subprocess")
    parser.add_argument("--memory-cap-gib", type=float, default=16.0,
                        help="address-space limit of each (method, L) subprocess on CPU")
    parser.add_argument("--out", type=Path, help="the JSON file (default: under benchmarks/results/, see above)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, default in {**PRESETS["cpu"], **PRESETS.get(args.preset, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    on_cpu = args.device == "cpu"
    if args.one:
        if on_cpu:
            cap = int(args.memory_cap_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        method, length = args.one[0], int(args.one[1])
        try:
            row = run_one(method, args.batch, args.heads, length, args.dim, args.repeats, args.device, args.backend)
        except (MemoryError, RuntimeError) as error:  # torch's allocators raise RuntimeErrors (CUDA: OutOfMemoryError)
            if not isinstance(error, MemoryError) and "allocate" not in str(error):
                raise
            tried = re.search(r"allocate (\d+) bytes", str(error))
            failed = f"an allocation of {int(tried[1]) / 2**30:.2f} GiB failed" if tried else str(error)[:200]
            limit = f"the {args.memory_cap_gib:g} GiB cap" if on_cpu else f"{args.device}'s memory"
            row = dict(method=method, length=length, error=f"does not fit in {limit} ({failed})")
        print(json.dumps(row))
        return 0

    import torch

    from kdops.bench.measure import describe_machine, machine_info

    info = machine_info(torch.device(args.device))
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    shape = f"B{args.batch}-H{args.heads}-L{'-'.join(map(str, args.lengths))}"
    out = args.out or RESULTS / f"attention-relation-{args.device.split(':')[0]}-{shape}-{info['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(command="python " + " ".join([f"benchmarks/{Path(__file__).name}", *(argv or sys.argv[1:])]),
                  machine=info, rows=[])
    for length in args.lengths:
        for method in args.methods:
            command = [sys.executable, __file__, "--one", method, str(length), "--batch", str(args.batch),
                       "--heads", str(args.heads), "--dim", str(args.dim), "--repeats", str(args.repeats),
                       "--memory-cap-gib", str(args.memory_cap_gib), "--device", args.device,
                       *(["--backend", args.backend] if args.backend else [])]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                row = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else
                       dict(method=method, length=length, error=done.stderr.strip().splitlines()[-1:]))
            except subprocess.TimeoutExpired:
                row = dict(method=method, length=length, error=f"over {args.timeout:.0f} s")
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
    lines = table(result["rows"], args.lengths)
    out.with_suffix(".md").write_text("\n".join([result["command"], describe_machine(info), "", *lines]) + "\n")
    print(f"\n{result['command']}\n{describe_machine(info)}\n")
    print("\n".join(lines))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
