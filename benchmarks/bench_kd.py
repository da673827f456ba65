"""Benchmark of kdops.distill_loss (fused temperature-softmax KD) against torch.

For each shape and dtype: median time of the forward and of forward+backward, and the peak
memory above the inputs, for
  torch-eager     F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T), log_target=True) * T^2
  torch-compile   torch.compile of the reference (kdops.reference.distill_loss)
  kdops-<backend> kdops.distill_loss on each available kernel backend
Peak memory: on CUDA the allocator's peak; on CPU the process's peak resident set (VmHWM,
reset through /proc/self/clear_refs before each measurement), which sees torch's own buffers.
Ratios are against torch-eager in the same run. Prints a table and writes JSON.

    python benchmarks/bench_kd.py                       # the default shapes for this device
    python benchmarks/bench_kd.py --shapes 4096x32000 --dtypes float32 --repeats 5
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kdops
from kdops import reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MiB = 2**20


def torch_eager(s, t, T):
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T * T


def methods(device, temperature):
    found = {"torch-eager": lambda s, t: torch_eager(s, t, temperature)}
    compiled = torch.compile(reference.distill_loss, dynamic=False)
    found["torch-compile"] = lambda s, t: compiled(s, t, temperature=temperature)
    for name, status in kdops.available_backends().items():
        if name == "torch" or not status.available:
            continue
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests, not timings
        if (name == "cpu") != (device.type == "cpu"):
            continue
        found[f"kdops-{name}"] = lambda s, t, b=name: kdops.distill_loss(s, t, temperature=temperature, backend=b)
    return found


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def peak_extra_bytes(fn, device):
    """Peak memory above what is held before the call (inputs included in 'before')."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = _rss_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn()
    return _rss_bytes("VmHWM:") - before


def median_seconds(fn, device, repeats, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, nbytes=2**30):
    """Measured device copy bandwidth (bytes read + written per second)."""
    x = torch.empty(nbytes // 4, device=device)
    y = torch.empty_like(x)
    sec = median_seconds(lambda: y.copy_(x), device, repeats=10, warmup=3)
    return 2 * nbytes / sec


def machine_info(device):
    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kdops": kdops.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["backends"] = {k: v.reason for k, v in kdops.available_backends().items() if v.available}
    return info


def run(args):
    device = torch.device(args.device)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for n, v in shapes:
            found = methods(device, args.temperature)
            s = torch.randn(n, v, device=device).mul_(3).to(dtype)
            t = torch.randn(n, v, device=device).mul_(3).to(dtype)
            logits_bytes = s.numel() * s.element_size()
            for name, fn in found.items():
                if name == "torch-compile" and dtype != torch.float32 and device.type == "cpu":
                    continue
                sg = s.detach().clone().requires_grad_(True)

                def fwd():
                    with torch.no_grad():
                        fn(sg, t)

                def fwd_bwd():
                    sg.grad = None
                    fn(sg, t).backward()

                try:
                    fwd_bwd()  # compile / warm up before measuring memory
                    sg.grad = None
                    mem = peak_extra_bytes(fwd_bwd, device)
                    t_fwd = median_seconds(fwd, device, args.repeats, args.warmup)
                    t_fb = median_seconds(fwd_bwd, device, args.repeats, args.warmup)
                except torch.OutOfMemoryError:
                    rows.append(dict(method=name, dtype=dtype_name, n=n, v=v, error="out of memory"))
                    continue
                sg.grad = None
                row = dict(method=name, dtype=dtype_name, n=n, v=v, fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_fb * 1e3,
                           peak_extra_mib=mem / MiB, peak_extra_logits=mem / logits_bytes)
                if device.type == "cuda":
                    # minimal traffic of forward+backward: read s and t, write the gradient
                    row["fwd_bwd_gbps"] = 3 * logits_bytes / t_fb / 1e9
                rows.append(row)
                print(_format_row(row), flush=True)
            del s, t
    for row in rows:
        base = next((r for r in rows if r["method"] == "torch-eager" and r["dtype"] == row["dtype"]
                     and r["n"] == row["n"] and r["v"] == row["v"] and "error" not in r), None)
        if base and "error" not in row:
            row["speedup_fwd"] = base["fwd_ms"] / row["fwd_ms"]
            row["speedup_fwd_bwd"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    return rows


def _format_row(r):
    return (f"{r['method']:<16} {r['dtype']:<9} {r['n']:>6}x{r['v']:<7} fwd {r['fwd_ms']:9.2f} ms  "
            f"fwd+bwd {r['fwd_bwd_ms']:9.2f} ms  peak+ {r['peak_extra_mib']:9.1f} MiB "
            f"({r['peak_extra_logits']:.2f} logits)")


def markdown(rows):
    lines = ["| method | dtype | N x V | fwd ms | fwd+bwd ms | speed-up fwd+bwd vs eager | peak extra (logits-sized) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['dtype']} | {r['n']} x {r['v']} | {r['error']} | | | |")
            continue
        lines.append(f"| {r['method']} | {r['dtype']} | {r['n']} x {r['v']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | "
                     f"{r.get('speedup_fwd_bwd', float('nan')):.2f}x | {r['peak_extra_logits']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--shapes", nargs="+",
                   default=["4096x1000", "4096x32000", "4096x128256"] if cuda else ["4096x1000", "4096x32000", "1024x128256"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"] if cuda else ["float32"], choices=list(DTYPES))
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=10 if cuda else 5)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kd-<device>-<date>.json)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    info = machine_info(device)
    print(f"# kdops.distill_loss benchmark on {info.get('gpu', info['cpu'])}, torch {torch.__version__}", flush=True)
    rows = run(args)
    result = {"benchmark": "kd", "machine": info, "temperature": args.temperature, "repeats": args.repeats, "rows": rows}
    if device.type == "cuda":
        result["copy_bandwidth_gbps"] = copy_bandwidth(device) / 1e9
    print()
    print(markdown(rows))
    out = Path(args.out or Path(__file__).parent / "results" / f"kd-{device.type}-{info['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(main())
