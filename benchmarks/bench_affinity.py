"""Benchmark of the relation-based losses (SP, RKD distance, RKD angle) against the torch reference.

For each loss, batch B and feature size D (student and teacher both [B, D]): median time of
forward+backward and the peak memory above the inputs, for
  reference        kdops.reference.<loss> (plain PyTorch, materialises every [B, B] / [B, B, B] term)
  kdops-<backend>  kdops.<loss> with the automatic backend choice: on CPU tensors "cpu", the OpenMP
                   kernels of kdops._C (csrc/cpu/affinity.cpp); a suffix ":torch" would say that
                   the backend has no kernels of this family and the torch reference ran
Peak memory: on CUDA the allocator's peak; on CPU the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs), with the helpers of bench_kd.py. Prints a table, writes JSON.

    python benchmarks/bench_affinity.py                        # the default shapes for this device
    python benchmarks/bench_affinity.py --losses rkd_angle --batches 512 --dims 128 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import kdops
from bench_kd import MiB, machine_info, median_seconds, peak_extra_bytes
from kdops import _dispatch, reference
from kdops.ops import affinity as ops

LOSSES = {
    "sp": (kdops.similarity_preserving_loss, reference.similarity_preserving_loss),
    "rkd_distance": (kdops.rkd_distance_loss, reference.rkd_distance_loss),
    "rkd_angle": (kdops.rkd_angle_loss, reference.rkd_angle_loss),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def methods(loss, device, dtype):
    """name -> loss function; the kdops one is named after the backend that the automatic
    choice resolves to and, after a colon, what runs where that backend has no kernels here."""
    kdops_fn, ref_fn = LOSSES[loss]
    resolved = _dispatch.resolve_backend(None, device, dtype)
    impl = ops.implementation(None, device, dtype)
    return {"reference": ref_fn, f"kdops-{resolved}" + ("" if impl == resolved else f":{impl}"): kdops_fn}


def measure(fn, s, t, device, repeats, warmup):
    sg = s.detach().clone().requires_grad_(True)

    def fwd_bwd():
        sg.grad = None
        fn(sg, t).backward()

    fwd_bwd()  # warm up (Triton compiles) before measuring memory
    sg.grad = None
    mem = peak_extra_bytes(fwd_bwd, device)
    seconds = median_seconds(fwd_bwd, device, repeats, warmup)
    return seconds, mem


def run(args):
    device = torch.device(args.device)
    rows = []
    for loss in args.losses:
        batches = args.angle_batches if loss == "rkd_angle" and args.angle_batches else args.batches
        dims = args.angle_dims if loss == "rkd_angle" and args.angle_dims else args.dims
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            for b in batches:
                for d in dims:
                    s = torch.randn(b, d, device=device).to(dtype)
                    t = torch.randn(b, d, device=device).to(dtype)
                    for name, fn in methods(loss, device, dtype).items():
                        row = dict(loss=loss, method=name, dtype=dtype_name, batch=b, dim=d)
                        try:
                            seconds, mem = measure(fn, s, t, device, args.repeats, args.warmup)
                            row.update(fwd_bwd_ms=seconds * 1e3, peak_extra_mib=mem / MiB)
                        except torch.OutOfMemoryError:
                            row["error"] = "out of memory"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        rows.append(row)
                        print(_format_row(row), flush=True)
                    del s, t
    for row in rows:
        base = next((r for r in rows if r["method"] == "reference" and "error" not in r
                     and all(r[k] == row[k] for k in ("loss", "dtype", "batch", "dim"))), None)
        if base and "error" not in row:
            row["speedup"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
            if base["peak_extra_mib"] >= 1:  # below that the resident-set measure is noise
                row["memory_ratio"] = row["peak_extra_mib"] / base["peak_extra_mib"]
    return rows


def _format_row(r):
    head = f"{r['loss']:<13} {r['method']:<14} {r['dtype']:<9} B={r['batch']:<6} D={r['dim']:<5}"
    if "error" in r:
        return f"{head} {r['error']}"
    return f"{head} fwd+bwd {r['fwd_bwd_ms']:10.2f} ms  peak+ {r['peak_extra_mib']:9.1f} MiB"


def markdown(rows):
    lines = ["| loss | method | dtype | B x D | fwd+bwd ms | peak extra MiB | speed-up vs reference | memory vs reference |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        shape = f"{r['batch']} x {r['dim']}"
        if "error" in r:
            lines.append(f"| {r['loss']} | {r['method']} | {r['dtype']} | {shape} | {r['error']} | | | |")
            continue
        lines.append(f"| {r['loss']} | {r['method']} | {r['dtype']} | {shape} | {r['fwd_bwd_ms']:.1f} | "
                     f"{r['peak_extra_mib']:.1f} | {r.get('speedup', float('nan')):.2f}x | "
                     f"{r.get('memory_ratio', float('nan')):.3f} |")
    return "\n".join(lines)


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--batches", nargs="+", type=int, default=[256, 4096, 16384] if cuda else [8192])
    p.add_argument("--dims", nargs="+", type=int, default=[128, 2048] if cuda else [1024])
    p.add_argument("--angle-batches", nargs="+", type=int, default=[256, 1024, 4096] if cuda else [512],
                   help="batches of rkd_angle (B^3 work; the reference needs B^3 memory)")
    p.add_argument("--angle-dims", nargs="+", type=int, default=None if cuda else [128, 1024],
                   help="feature sizes of rkd_angle (default: --dims)")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=10 if cuda else 3)
    p.add_argument("--warmup", type=int, default=2 if cuda else 0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/affinity-<device>-<date>.json)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    info = machine_info(device)
    print(f"# kdops relation losses benchmark on {info.get('gpu', info['cpu'])}, torch {torch.__version__}", flush=True)
    rows = run(args)
    command = " ".join(["python", "benchmarks/bench_affinity.py", *sys.argv[1:]])
    result = {"benchmark": "affinity", "command": command, "machine": info, "repeats": args.repeats, "rows": rows}
    print()
    print(markdown(rows))
    out = Path(args.out or Path(__file__).parent / "results" / f"affinity-{device.type}-{info['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(main())
