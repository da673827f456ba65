"""The command line of kdops.bench: ``python -m kdops.bench`` (or ``kdops-bench``).

    python -m kdops.bench                                   # every op, this device's default shapes
    python -m kdops.bench --ops kd --shapes 4096x1000 4096x32000 --repeats 5
    python -m kdops.bench --ops fused_linear affinity --dtypes float32 bfloat16 --backends cpu
    python -m kdops.bench --ops all --shapes kd:512x32000 rkd_angle:256x64   # OP:SHAPE for one op
    python -m kdops.bench report                            # benchmarks/results/README.md

For each op, dtype and shape, every method (see :mod:`kdops.bench.workloads`) is run once (warm-up,
compilation), its peak memory measured on one forward+backward, then the median times of the
forward (under ``torch.no_grad``) and of forward+backward taken (see :mod:`kdops.bench.measure`).
Speed-ups and memory ratios are against torch-eager in the same run. Writes
``<out-dir>/<name>-<device>-<date>.json`` (machine, versions, date, command, rows), the same as
``.md`` (a Markdown table per op) and ``.png`` (plots; skipped with a note without matplotlib).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import torch

from kdops._dispatch import BACKENDS
from kdops.bench import measure, report
from kdops.bench.workloads import BASELINE, BASELINES, OPS, PRESETS, Op, Options, Workload


def _default_out_dir() -> Path:
    """``benchmarks/results`` of the source checkout kdops runs from, else ``./kdops-bench-results``."""
    checkout = Path(__file__).resolve().parents[2] / "benchmarks"
    return checkout / "results" if checkout.is_dir() else Path("kdops-bench-results")


DEFAULT_OUT_DIR = _default_out_dir()


def _parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    prog = "kdops-bench" if Path(sys.argv[0]).name == "kdops-bench" else "python -m kdops.bench"
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", default=["all"], choices=list(PRESETS),
                   help="ops or presets (affinity = sp rkd_distance rkd_angle; all = every op)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="[OP:]SHAPE",
                   help="sizes joined by x: NxV (kd), NxHxV (fused_linear), NxVxK (sparse_kd), BxD (sp, rkd_*); "
                        "a bare shape applies to every selected op with that many sizes, OP:SHAPE to that op or "
                        "preset; ops given no shape use this device's defaults")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"] if cuda else ["float32"],
                   choices=list(measure.DTYPES))
    p.add_argument("--backends", nargs="+", default=None, choices=list(BACKENDS),
                   help="kdops backends (default: every kernel backend that runs here natively)")
    p.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=list(BASELINES),
                   help=f"methods other than kdops's ({BASELINE} always runs: it is the ratios' baseline)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=10 if cuda else 5)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1,
                   help="calls before timing, besides the first call (compilation) and the memory run")
    p.add_argument("--timer", default="events", choices=measure.TIMERS,
                   help="CUDA timing: CUDA events around each call, or triton.testing.do_bench's median")
    p.add_argument("--cpu-memory", default="both", choices=("rss", "torch", "both"),
                   help="CPU peak memory: the resident set (VmHWM), torch's allocator (profiler), or both")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of torch-compile")
    p.add_argument("--name", default=None, help="the results' file name stem (default: the --ops joined by -)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: %(default)s")
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON path (default <out-dir>/<name>-<device>-<date>.json); .md and .png beside it")
    p.add_argument("--no-plots", action="store_true")
    return p


def _report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kdops.bench report",
                                description="Writes the Markdown performance page of every result file "
                                            "(*.json) of a folder.")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: %(default)s")
    p.add_argument("--out", type=Path, default=None, help="default: <results-dir>/README.md")
    return p


def selected_ops(names: list[str]) -> list[str]:
    """The ops of a list of ops and presets, in order, without repeats."""
    return list(dict.fromkeys(op for name in names for op in PRESETS[name]))


def shapes_per_op(ops: list[str], specs: Optional[list[str]], device: torch.device) -> dict[str, list[str]]:
    """Each op's shapes from ``--shapes`` (see its help); ValueError for a shape no op takes."""
    chosen: dict[str, list[str]] = {op: [] for op in ops}
    for spec in specs or []:
        target, _, shape = spec.rpartition(":")
        if target and target not in PRESETS:
            raise ValueError(f"--shapes {spec!r}: {target!r} is not an op or preset ({', '.join(PRESETS)})")
        try:
            sizes = [int(x) for x in shape.split("x")]
        except ValueError:
            raise ValueError(f"--shapes {spec!r}: a shape is sizes joined by x, like 4096x32000") from None
        if any(x <= 0 for x in sizes):
            raise ValueError(f"--shapes {spec!r}: sizes must be positive")
        takers = [op for op in (PRESETS[target] if target else ops)
                  if op in chosen and len(OPS[op].dims) == len(sizes)]
        if not takers:
            wanted = ", ".join(f"{op}: {'x'.join(OPS[op].dims)}" for op in ops)
            raise ValueError(f"--shapes {spec!r}: no selected op takes {len(sizes)} sizes ({wanted})")
        for op in takers:
            chosen[op].append(shape)
    for op, shapes in chosen.items():
        if not shapes:
            shapes.extend(OPS[op].default_shapes["cuda" if device.type == "cuda" else "cpu"])
    return chosen


def measure_method(fn, workload: Workload, device: torch.device, args: argparse.Namespace) -> dict:
    """Times and peak memory of one method on one workload (see the module's docstring)."""
    inputs = list(workload.inputs)
    for i in workload.grad_argnums:
        inputs[i] = inputs[i].detach().clone().requires_grad_(True)
    leaves = [inputs[i] for i in workload.grad_argnums]

    def clear_grads() -> None:
        for x in leaves:
            x.grad = None

    def forward() -> None:
        with torch.no_grad():
            fn(*inputs)

    def forward_backward() -> None:
        clear_grads()
        fn(*inputs).backward()

    try:
        forward_backward()  # compilation, first-call work: before memory and times
        measure.synchronize(device)
        out: dict = {}
        # memory above the inputs: the gradients of the call before are freed first
        if device.type == "cuda" or args.cpu_memory != "torch":
            clear_grads()
            out["peak_extra_mib"] = measure.peak_extra_bytes(forward_backward, device) / measure.MiB
        if device.type == "cpu" and args.cpu_memory != "rss":
            clear_grads()
            out["torch_peak_mib"] = measure.torch_cpu_peak_bytes(forward_backward) / measure.MiB
            out.setdefault("peak_extra_mib", out["torch_peak_mib"])
        clear_grads()
        out["fwd_ms"] = 1e3 * measure.median_seconds(forward, device, args.repeats, max(args.warmup, 1), args.timer)
        out["fwd_bwd_ms"] = 1e3 * measure.median_seconds(forward_backward, device, args.repeats, args.warmup,
                                                         args.timer)
        if workload.logits_bytes:
            out["peak_extra_logits"] = out["peak_extra_mib"] * measure.MiB / workload.logits_bytes
        return out
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as error:  # a method that fails (an other library's version, a compiler) is a row
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]}
    finally:
        clear_grads()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups (torch-eager's time / the method's) and memory ratios (the method's peak /
    torch-eager's, where that is at least 1 MiB: below, the resident-set measure is noise)."""
    key = lambda r: (r["op"], r["dtype"], r["shape"])
    base = {key(r): r for r in rows if r["method"] == BASELINE and "error" not in r}
    for row in rows:
        b = base.get(key(row))
        if b is None or "error" in row:
            continue
        row["speedup_fwd"] = b["fwd_ms"] / row["fwd_ms"]
        row["speedup_fwd_bwd"] = b["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        row["memory_ratio"] = row["peak_extra_mib"] / b["peak_extra_mib"] if b["peak_extra_mib"] >= 1 else None


def _row_line(r: dict) -> str:
    head = f"{r['op']:<13} {r['dtype']:<9} {r['shape']:<16} {r['method']:<16}"
    if "error" in r:
        return f"{head} {r['error']}"
    return (f"{head} fwd {r['fwd_ms']:10.2f} ms  fwd+bwd {r['fwd_bwd_ms']:10.2f} ms  "
            f"peak+ {r['peak_extra_mib']:9.1f} MiB")


def run(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], list[str], list[str]]:
    """Measures every (op, dtype, shape, method); returns the rows, notes and target checks."""
    ops = selected_ops(args.ops)
    shapes = shapes_per_op(ops, args.shapes, device)
    options = Options(args.temperature, tuple(args.backends) if args.backends else None,
                      tuple(args.baselines), args.compile_backend)
    dtypes = [measure.DTYPES[d] for d in args.dtypes]
    # methods per (op, dtype): their number sizes the progress bar
    counts = {(op, dtype): len(OPS[op].methods(device, dtype, options)[0]) for op in ops for dtype in dtypes}
    progress = measure.Progress(sum(counts[op, dtype] * len(shapes[op]) for op in ops for dtype in dtypes))
    rows: list[dict] = []
    notes: list[str] = []
    for op_name in ops:
        op: Op = OPS[op_name]
        for dtype_name, dtype in zip(args.dtypes, dtypes):
            for shape in shapes[op_name]:
                sizes = dict(zip(op.dims, (int(x) for x in shape.split("x"))))
                torch._dynamo.reset()  # a fresh torch-compile per shape (no recompile limit)
                methods, op_notes = op.methods(device, dtype, options)
                notes.extend(n for n in op_notes if n not in notes)
                workload = op.make(sizes, dtype, device)
                for method, fn in methods.items():
                    progress.step(f"{op_name} {dtype_name} {shape} {method}")
                    row = dict(op=op_name, method=method, dtype=dtype_name, shape=shape, **sizes)
                    row.update(measure_method(fn, workload, device, args))
                    rows.append(row)
                    progress.write(_row_line(row))
                    if args.out is not None:  # the rows so far, for a run cut short (make gpu-check's timeouts)
                        args.out.with_suffix(".partial.json").write_text(json.dumps(rows, indent=1) + "\n")
                del workload
    progress.close()
    add_ratios(rows)
    checks = [line for op in ops if OPS[op].cpu_check and device.type == "cpu"
              for line in OPS[op].cpu_check([r for r in rows if r["op"] == op])]
    return rows, notes, checks


def _memory_method(device: torch.device, cpu_memory: str) -> str:
    if device.type == "cuda":
        return "CUDA caching allocator peak (torch.cuda.max_memory_allocated) above the inputs"
    methods = []
    if cpu_memory != "torch":
        methods.append("process resident-set peak (VmHWM reset via /proc/self/clear_refs; glibc mmap "
                       "threshold fixed at 64 KiB) above the inputs")
    if cpu_memory != "rss":
        where = "in its own column" if methods else "above the inputs"
        methods.append(f"torch CPU allocator peak (profiler memory events) {where}")
    return "; ".join(methods)


def bench(argv: list[str]) -> int:
    """``python -m kdops.bench [options]``: measures, prints the tables, writes the results."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and args.timer == "do_bench" and importlib.util.find_spec("triton") is None:
        parser.error("--timer do_bench needs triton (pip install triton)")
    if device.type == "cpu" and args.cpu_memory != "torch":
        if not measure.resident_set_supported():
            parser.error("--cpu-memory rss/both needs Linux's /proc/self/clear_refs; use --cpu-memory torch")
        measure.return_freed_memory()
    try:
        shapes_per_op(selected_ops(args.ops), args.shapes, device)
    except ValueError as error:
        parser.error(str(error))
    torch.manual_seed(0)
    info = measure.machine_info(device)
    print(f"# kdops.bench on {measure.describe_machine(info)}, torch {torch.__version__}", flush=True)
    rows, notes, checks = run(args, device)
    name = args.name or "-".join(args.ops).replace("_", "-")
    result = {
        "suite": report.SUITE,
        "benchmark": name,
        "command": shlex.join(["python", "-m", "kdops.bench", *argv]),
        "process_argv": sys.argv,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": info.get("gpu", info["cpu"]),
        "machine": info,
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "temperature": args.temperature,
                     "timer": args.timer if device.type == "cuda" else "time.perf_counter",
                     "memory": _memory_method(device, args.cpu_memory), "baselines": args.baselines,
                     "backends": args.backends or "automatic", "compile_backend": args.compile_backend},
        "ops": selected_ops(args.ops),
        "rows": rows,
        "notes": notes,
        "checks": checks,
    }
    if device.type == "cuda":
        result["copy_bandwidth_gbps"] = measure.copy_bandwidth(device) / 1e9
    out = args.out or args.out_dir / f"{name}-{device.type}-{info['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        why_not = report.plot(result, out.with_suffix(".png"))
        if why_not:
            result["notes"].append(why_not)
    text = report.markdown(result)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".partial.json").unlink(missing_ok=True)  # the rows so far: complete now
    print("\n" + text)
    print(f"wrote {out}, {out.with_suffix('.md')}" + ("" if args.no_plots or not out.with_suffix(".png").exists()
                                                     else f", {out.with_suffix('.png')}"))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m kdops.bench [options]`` or ``python -m kdops.bench report [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        args = _report_parser().parse_args(argv[1:])
        out = report.write_results_page(args.results_dir, args.out)
        print(f"wrote {out}")
        return 0
    return bench(argv)
