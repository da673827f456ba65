"""Benchmark of kdops.fused_linear_distill_loss (lm-head GEMMs + distillation, no [N, V] logits).

For each shape (N rows, hidden size H for student and teacher, vocabulary V) and dtype: median
time of the forward and of forward+backward (gradients to the student's hidden states and
weight), and the peak memory above the inputs, for
  naive-torch      logits h @ W.T materialised, F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T)) * T^2
  naive-kdops      logits materialised, kdops.distill_loss (fused KD kernel)
  fused-<backend>  kdops.fused_linear_distill_loss on each available backend
  liger-jsd        Liger-Kernel's LigerFusedLinearJSD (beta 0.5: another divergence, same work), if importable
  torchtune-fkl    torchtune's ForwardKLWithChunkedOutputLoss on 8 logit chunks (T = 1), if importable
Forward KL at temperature T. Memory and timing helpers are those of bench_kd.py (CUDA
allocator peaks; on CPU the process's VmHWM). Ratios are against naive-torch in the same run.
On CPU the issue's target is peak <= 1/8 and time <= 1.3x of naive-torch for fused-cpu.

    python benchmarks/bench_fused_linear.py                  # the default shapes for this device
    python benchmarks/bench_fused_linear.py --shapes 4096x1024x32000 --repeats 3
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import kdops
from bench_kd import DTYPES, MiB, machine_info, median_seconds, peak_extra_bytes, torch_eager

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# The CPU target for fused-cpu against naive-torch: peak memory and time ratios.
CPU_TARGET = {"peak": 1 / 8, "time": 1.3}


def methods(device: torch.device, temperature: float) -> tuple[dict[str, Loss], list[str]]:
    """The losses to compare, ``name -> fn(h, w, th, tw, labels)``, and notes on those skipped."""
    found: dict[str, Loss] = {
        "naive-torch": lambda h, w, th, tw, y: torch_eager(F.linear(h, w), F.linear(th, tw), temperature),
        "naive-kdops": lambda h, w, th, tw, y: kdops.distill_loss(F.linear(h, w), F.linear(th, tw),
                                                                  temperature=temperature),
    }
    notes = []
    for name, status in kdops.available_backends().items():
        if name == "torch" or not status.available:
            continue
        if name == "triton" and device.type != "cuda":
            notes.append("fused-triton: skipped on CPU (the interpreter is for tests, not timings)")
            continue
        if (name == "cpu") != (device.type == "cpu"):
            continue
        found[f"fused-{name}"] = lambda h, w, th, tw, y, b=name: kdops.fused_linear_distill_loss(
            h, w, th, tw, temperature=temperature, backend=b)
    for name, module in (("liger-jsd", "liger_kernel"), ("torchtune-fkl", "torchtune")):
        if device.type != "cuda":
            notes.append(f"{name}: skipped (GPU only)")
        elif importlib.util.find_spec(module) is None:
            notes.append(f"{name}: skipped ({module} is not installed)")
        else:
            found[name] = _liger(temperature) if name == "liger-jsd" else _torchtune()
    return found, notes


def _liger(temperature: float) -> Loss:
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    loss = LigerFusedLinearJSD(jsd_beta=0.5, temperature=temperature)
    return lambda h, w, th, tw, y: loss(h, w, th, tw)


def _torchtune(chunks: int = 8) -> Loss:
    from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

    loss = ForwardKLWithChunkedOutputLoss(num_output_chunks=chunks)

    def fn(h, w, th, tw, y):
        s = [F.linear(c, w) for c in h.unsqueeze(0).tensor_split(chunks, dim=1)]
        with torch.no_grad():
            t = [F.linear(c, tw) for c in th.unsqueeze(0).tensor_split(chunks, dim=1)]
        return loss(s, t, y.unsqueeze(0))

    return fn


def run(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    device = torch.device(args.device)
    rows: list[dict] = []
    notes: list[str] = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for shape in args.shapes:
            n, hidden, vocab = (int(x) for x in shape.split("x"))
            found, notes = methods(device, args.temperature)
            make = lambda *s: (torch.randn(*s, device=device) / s[-1] ** 0.5).to(dtype)
            h, w, th, tw = make(n, hidden), make(vocab, hidden), make(n, hidden), make(vocab, hidden)
            labels = torch.zeros(n, dtype=torch.long, device=device)
            logits_bytes = n * vocab * h.element_size()
            # GEMM work of forward + backward without recomputation: s, t, grad_h, grad_W
            flops = 2 * n * vocab * hidden * 4
            for name, fn in found.items():
                hg, wg = (x.detach().clone().requires_grad_(True) for x in (h, w))

                def fwd():
                    with torch.no_grad():
                        fn(hg, wg, th, tw, labels)

                def fwd_bwd():
                    hg.grad = wg.grad = None
                    fn(hg, wg, th, tw, labels).backward()

                try:
                    fwd_bwd()  # compile / warm up before measuring memory
                    hg.grad = wg.grad = None
                    mem = peak_extra_bytes(fwd_bwd, device)
                    t_fwd = median_seconds(fwd, device, args.repeats, args.warmup)
                    t_fb = median_seconds(fwd_bwd, device, args.repeats, args.warmup)
                except torch.OutOfMemoryError:
                    rows.append(dict(method=name, dtype=dtype_name, n=n, h=hidden, v=vocab, error="out of memory"))
                    print(f"{name:<16} {dtype_name:<9} {shape:<18} out of memory", flush=True)
                    continue
                finally:
                    hg.grad = wg.grad = None
                row = dict(method=name, dtype=dtype_name, n=n, h=hidden, v=vocab, fwd_ms=t_fwd * 1e3,
                           fwd_bwd_ms=t_fb * 1e3, peak_extra_mib=mem / MiB, peak_extra_logits=mem / logits_bytes,
                           fwd_bwd_tflops=flops / t_fb / 1e12)
                rows.append(row)
                print(_format_row(row), flush=True)
            del h, w, th, tw
    for row in rows:
        base = next((r for r in rows if r["method"] == "naive-torch" and "error" not in r
                     and (r["dtype"], r["n"], r["h"], r["v"]) == (row["dtype"], row["n"], row["h"], row["v"])), None)
        if base and "error" not in row:
            row["time_vs_naive"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]
            row["peak_vs_naive"] = row["peak_extra_mib"] / base["peak_extra_mib"]
    return rows, notes


def _format_row(r: dict) -> str:
    return (f"{r['method']:<16} {r['dtype']:<9} {r['n']:>6}x{r['h']}x{r['v']:<7} fwd {r['fwd_ms']:10.1f} ms  "
            f"fwd+bwd {r['fwd_bwd_ms']:10.1f} ms ({r['fwd_bwd_tflops']:.2f} TFLOP/s)  "
            f"peak+ {r['peak_extra_mib']:9.1f} MiB ({r['peak_extra_logits']:.2f} logits)")


def markdown(rows: list[dict]) -> str:
    lines = ["| method | dtype | N x H x V | fwd ms | fwd+bwd ms | time vs naive | peak extra MiB | peak vs naive |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        shape = f"{r['n']} x {r['h']} x {r['v']}"
        if "error" in r:
            lines.append(f"| {r['method']} | {r['dtype']} | {shape} | {r['error']} | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['dtype']} | {shape} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | "
                     f"{r.get('time_vs_naive', float('nan')):.2f}x | {r['peak_extra_mib']:.0f} | "
                     f"{r.get('peak_vs_naive', float('nan')):.3f} |")
    return "\n".join(lines)


def cpu_target(rows: list[dict]) -> list[str]:
    """The issue's CPU target, checked for each fused-cpu row."""
    lines = []
    for r in rows:
        if r["method"] == "fused-cpu" and "time_vs_naive" in r:
            ok = r["peak_vs_naive"] <= CPU_TARGET["peak"] and r["time_vs_naive"] <= CPU_TARGET["time"]
            lines.append(f"CPU target {r['n']}x{r['h']}x{r['v']} {r['dtype']}: peak {r['peak_vs_naive']:.3f} of naive "
                         f"(<= {CPU_TARGET['peak']:.3f}), time {r['time_vs_naive']:.2f}x (<= {CPU_TARGET['time']}x): "
                         f"{'met' if ok else 'NOT met'}")
    return lines


def _return_freed_memory() -> None:
    """Make glibc serve every allocation of 64 KiB or more by mmap (no dynamic threshold), so that
    freed buffers leave the resident set: otherwise a method reuses the pages an earlier one left
    resident and VmHWM misses its peak."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: peaks of later methods may read low


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--shapes", nargs="+", help="NxHxV (default: the device's preset)",
                   default=[f"{n}x4096x{v}" for n in (4096, 16384) for v in (32000, 128256, 151936)]
                   if cuda else ["4096x1024x32000"])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"] if cuda else ["float32"], choices=list(DTYPES))
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=10 if cuda else 3)
    p.add_argument("--warmup", type=int, default=2 if cuda else 0, help="(the memory run warms up already)")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/fused-linear-<device>-<date>.json)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cpu":
        _return_freed_memory()
    info = machine_info(device)
    print(f"# kdops.fused_linear_distill_loss benchmark on {info.get('gpu', info['cpu'])}, torch {torch.__version__}",
          flush=True)
    rows, notes = run(args)
    checks = cpu_target(rows) if device.type == "cpu" else []
    print()
    print(markdown(rows))
    for line in notes + checks:
        print(line)
    result = {"benchmark": "fused_linear", "machine": info, "temperature": args.temperature,
              "repeats": args.repeats, "rows": rows, "notes": notes, "cpu_target": checks}
    out = Path(args.out or Path(__file__).parent / "results" / f"fused-linear-{device.type}-{info['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
