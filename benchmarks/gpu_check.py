"""The one prepared command for a lent GPU (issue 12, section 3): ``make gpu-check``.

Made for the GPU machines kdops may be lent (one H200, 16 cores, torch 2.11, Triton 3.6, Python
3.12, nvcc 13.0, no network, about 15 minutes of GPU time, at most 10 minutes per command): in
under 8 minutes (run 1 on an H200, with a 500 s budget, took 499 s), each step under its own
timeout (and all under ``--budget`` seconds, 460 by default), it

1. builds kdops with this machine's Python, both native modules, no downloads
   (``pip install --no-build-isolation --no-deps -e .``, CUDA for this GPU's architecture only),
   while the Triton cases of the kernel test files run beside it (they need no native module);
2. then runs the CUDA backend's cases; both test runs take CUDA tensors against the float64
   oracle (pytest-xdist, a per-test timeout where pytest-timeout is installed);
3. runs ``compute-sanitizer`` memcheck (and racecheck on the sparse scatter) on a short payload
   of kd / sparse kd / multi-teacher / relation calls on both GPU backends, where the tool exists;
4. runs the GPU benchmark presets through ``python -m kdops.bench`` (KD 8192 x {32000, 128256,
   151936} bf16 / fp32 vs torch eager and torch.compile with the measured copy bandwidth; fused
   linear 8192 x 4096 x 128256 bf16 vs materialised logits, torch.compile and Liger-Kernel where
   installed; sparse KD; SP / RKD-D at 16384 x 2048), and the attention relation (``--bench-attention``
   here: B 8 x 12 heads x L 2048, d 64, teacher 128, forward + backward, the triton and cuda
   backends vs the torch reference that materialises the relations, CUDA-event medians, peaks);
5. writes versions, device, commands, every step's status and output tail and the benchmark
   tables as JSON (``<out-dir>/gpu-check-<date>.json``, every command's whole log beside it), and
   a short table last on stdout. ``--steps PREFIX...`` runs only some steps.

``--dry-run`` runs every step on CPU with tiny shapes (the Triton interpreter for the tests, the
payload without the sanitizer, the benchmarks with the cpu backend), and checks the build by
importing it instead of rebuilding: the plumbing, tested by ``tests/test_aot_check.py``.

    python3 benchmarks/gpu_check.py             # on the GPU machine (make gpu-check)
    python3 benchmarks/gpu_check.py --dry-run --out-dir /tmp/gpu-check
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the payload and benchmark steps import this checkout's kdops, installed or not
    sys.path.insert(0, str(REPO))
# The files whose cuda / triton cases take CUDA tensors on a GPU machine (conftest.device_for / require).
TEST_FILES = ("test_kd.py", "test_triton_kd.py", "test_sparse_kd.py", "test_multi_teacher.py", "test_fused_linear.py",
              "test_affinity.py", "test_gpu_bugs.py", "test_attention_relation.py")


@dataclass
class Step:
    """One command of the check; ``timeout`` seconds (cut to what the budget has left)."""

    name: str
    commands: list[list[str]]  # run in parallel
    timeout: float
    env: dict = field(default_factory=dict)
    bench_json: Optional[Path] = None  # a kdops.bench result to include


def _bench(name: str, out_dir: Path, date: str, device: str, args: list[str], timeout: float) -> Step:
    out = out_dir / f"gpu-{name}-{date}.json"
    cmd = [sys.executable, "-m", "kdops.bench", *args, "--device", device, "--out", str(out), "--no-plots"]
    return Step(f"bench {name}", [cmd], timeout, bench_json=out)


def plan(dry_run: bool, out_dir: Path, date: str) -> list[Step]:
    """The steps: the GPU run, or its CPU dry run with tiny shapes."""
    py = sys.executable
    tests = [f for f in TEST_FILES if (REPO / "tests" / f).exists()]
    if dry_run:
        interp = {"TRITON_INTERPRET": "1"}
        bench = dict(device="cpu",
                     extra=["--backends", "cpu", "--baselines", "eager", "--repeats", "1", "--warmup", "0"])
        return [
            Step("build (import check)", [[py, "-c", "import kdops; print(kdops.available_backends())"]], 120),
            Step("cuda tests", [[py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                 "tests/test_gpu_bugs.py::test_launch_helper_makes_the_tensors_device_current"]],
                 300, env=interp),
            Step("sanitizer payload", [[py, __file__, "--payload", "--device", "cpu"]], 300, env=interp),
            _bench("kd", out_dir, date, bench["device"], ["--ops", "kd", "--shapes", "16x100", "--dtypes", "float32",
                                                         *bench["extra"]], 300),
            _bench("fused-linear", out_dir, date, bench["device"], ["--ops", "fused_linear", "--shapes", "16x8x100",
                                                                   "--dtypes", "float32", *bench["extra"]], 300),
            _bench("sparse-kd", out_dir, date, bench["device"], ["--ops", "sparse_kd", "--shapes", "16x100x8",
                                                                "--dtypes", "float32", *bench["extra"]], 300),
            _bench("relation", out_dir, date, bench["device"], ["--ops", "sp", "rkd_distance", "--shapes", "16x8",
                                                               "--dtypes", "float32", *bench["extra"]], 300),
            _attention_bench(out_dir, date, "cpu", ["1", "2", "64", "16", "8"], ["float32"], 1, 300),
        ]
    cc = _capability()
    build_env = {"CUDAARCHS": cc, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 16), "KDOPS_REQUIRE_CUDA": "1"}
    nvcc = shutil.which("nvcc") or _cuda_tool("nvcc")
    if nvcc:
        build_env["CUDACXX"] = nvcc
    sanitizer = shutil.which("compute-sanitizer") or _cuda_tool("compute-sanitizer")
    workers = str(max(1, min(12, (os.cpu_count() or 2) - 4)))

    def pytest(select: str) -> list[str]:
        timeout = ["--timeout", "90"] if importlib.util.find_spec("pytest_timeout") else []
        return [py, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-n", workers, *timeout, "-k", select,
                *[f"tests/{f}" for f in tests]]

    # this checkout first on sys.path (the tests import it while the build runs; the .so files land in kdops/)
    tree = {"PYTHONPATH": str(REPO)}
    steps = [
        # the Triton cases need no native module: they run while nvcc builds (kd.cu is the long pole)
        Step("build + triton tests",
             [[py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q", "-e", "."], pytest("triton")],
             200, env={**build_env, **tree}),
        Step("cuda tests", [pytest("cuda and not triton")], 100, env=tree),
    ]
    if sanitizer:
        steps.append(Step("compute-sanitizer", [
            [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", py, __file__, "--payload", "--device", "cuda"],
            [sanitizer, "--tool", "racecheck", "--error-exitcode", "1", py, __file__, "--payload", "--device", "cuda",
             "--only", "sparse"]], 40))
    else:
        steps.append(Step("compute-sanitizer (not found: payload only)",
                          [[py, __file__, "--payload", "--device", "cuda"]], 40))
    steps += [
        _bench("kd", out_dir, date, "cuda", ["--ops", "kd", "--shapes", "8192x32000", "8192x128256", "8192x151936",
                                             "--dtypes", "bfloat16", "float32", "--baselines", "eager",
                                             "--repeats", "10"], 45),
        _bench("fused-linear", out_dir, date, "cuda", ["--ops", "fused_linear", "--shapes", "8192x4096x128256",
                                                       "--dtypes", "bfloat16", "--baselines", "eager", "compile",
                                                       "liger", "--repeats", "5"], 45),
        # torch.compile compiles once per (shape, dtype): one shape of the kd preset
        _bench("kd-compile", out_dir, date, "cuda", ["--ops", "kd", "--shapes", "8192x128256", "--dtypes", "bfloat16",
                                                     "float32", "--baselines", "compile", "--repeats", "10"], 40),
        _bench("sparse-kd", out_dir, date, "cuda", ["--ops", "sparse_kd", "--shapes", "8192x128256x64",
                                                    "--dtypes", "bfloat16", "--baselines", "eager",
                                                    "--repeats", "10"], 20),
        _bench("relation", out_dir, date, "cuda", ["--ops", "sp", "rkd_distance", "--shapes", "16384x2048",
                                                   "--dtypes", "float32", "bfloat16", "--baselines", "eager",
                                                   "--repeats", "5"], 25),
        _attention_bench(out_dir, date, "cuda", ["8", "12", "2048", "64", "128"], ["bfloat16", "float32"], 10, 25),
        # issue 14's sizes (B 8 x 12 heads, d 64, L 512 / 2048 / 8192) vs eager and torch.compile; JSON after each row
        Step("bench attention-relation (issue 14 sizes)",
             [[py, str(REPO / "benchmarks" / "bench_attention_relation.py"), "--preset", "issue", "--device", "cuda",
               "--repeats", "5", "--timeout", "60",
               "--out", str(out_dir / f"gpu-attention-relation-issue-{date}.json")]],
             120, bench_json=out_dir / f"gpu-attention-relation-issue-{date}.json"),
    ]
    return steps  # timeouts: 200 + 100 + 40 + 45 + 45 + 40 + 20 + 25 + 25 + 120 = 660 s, cut to --budget (460 s)


def _attention_bench(out_dir: Path, date: str, device: str, shape: list[str], dtypes: list[str], repeats: int,
                     timeout: float) -> Step:
    out = out_dir / f"gpu-attention-relation-{date}.json"
    cmd = [sys.executable, __file__, "--bench-attention", *shape, "--device", device, "--dtypes", *dtypes,
           "--repeats", str(repeats), "--bench-out", str(out)]
    return Step("bench attention-relation", [cmd], timeout, bench_json=out)


def bench_attention(batch: int, heads: int, length: int, dim: int, teacher_dim: int, device: str,
                    dtypes: list[str], repeats: int, out: Path) -> None:
    """Median time (CUDA events on a GPU) and allocator peak (GPU) of one forward + backward of
    kdops.attention_relation_loss per backend that takes ``device`` tensors, and of the reference
    (materialised ``[B, H, L, L]`` relations, eager); rows as JSON to ``out``."""
    import torch

    import kdops
    from kdops.bench import measure

    dev = torch.device(device)
    backends = [b for b, s in kdops.available_backends().items()
                if s.available and b != "torch" and (b == "cpu") == (dev.type == "cpu")]
    rows = []
    for dtype in dtypes:
        torch.manual_seed(0)
        sa, sb = (torch.randn(batch, heads, length, dim, device=dev, dtype=getattr(torch, dtype),
                              requires_grad=True) for _ in range(2))
        ta, tb = (torch.randn(batch, heads, length, teacher_dim, device=dev, dtype=getattr(torch, dtype))
                  for _ in range(2))
        for method in [*backends, "torch"]:
            def step(method=method):
                loss = kdops.attention_relation_loss(sa, sb, ta, tb, causal=True, backend=method)
                torch.autograd.grad(loss, (sa, sb))

            try:
                step()  # warm-up (compiles the Triton kernels)
                seconds = measure.median_seconds(step, dev, repeats=repeats, warmup=0)
                peak = measure.peak_extra_bytes(step, dev) if dev.type == "cuda" else None
                rows.append(dict(dtype=dtype, method=method, seconds=seconds,
                                 peak_mib=None if peak is None else peak / 2**20))
            except Exception as e:  # reported in the rows (an out-of-memory reference, a missing backend)
                rows.append(dict(dtype=dtype, method=method, error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(rows[-1], flush=True)
    shape = dict(batch=batch, heads=heads, length=length, dim=dim, teacher_dim=teacher_dim, causal=True)
    out.write_text(json.dumps(dict(machine=measure.machine_info(dev), shape=shape, repeats=repeats, rows=rows),
                              indent=1) + "\n")
    table = [f"attention relation {batch}x{heads}x{length}, d {dim}, teacher {teacher_dim}, causal, fwd+bwd ({device})",
             f"{'dtype':10s} {'method':8s} {'ms':>10s} {'peak MiB':>10s}"]
    for r in rows:
        ms = f"{r['seconds'] * 1e3:10.3f}" if "seconds" in r else f"{'error':>10s}"
        peak = f"{r['peak_mib']:10.1f}" if r.get("peak_mib") is not None else f"{'-':>10s}"
        table.append(f"{r['dtype']:10s} {r['method']:8s} {ms} {peak}")
    out.with_suffix(".md").write_text("\n".join(table) + "\n")


def _cuda_tool(name: str) -> Optional[str]:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / name).exists():
            return str(Path(root) / "bin" / name)
    return None


def _capability() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def run_step(step: Step, budget_left: float, log_dir: Path) -> dict:
    """Run the step's commands in parallel, each killed at the step's timeout (or the budget's end);
    each command's whole output goes to a log under ``log_dir``. Skipped when under 5 s are left."""
    if budget_left < 5:
        return dict(step=step.name, status="skipped (budget spent)", seconds=0.0, timeout=0, env=step.env, runs=[])
    timeout = min(step.timeout, budget_left)
    start = time.monotonic()
    env = {**os.environ, **step.env}
    slug = "".join(c if c.isalnum() else "-" for c in step.name).strip("-")
    logs = [log_dir / f"log-{slug}-{i}.txt" for i in range(len(step.commands))]
    files = [log.open("w") for log in logs]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
             for cmd, f in zip(step.commands, files)]
    results = []
    for cmd, proc, log, f in zip(step.commands, procs, logs, files):
        try:
            rc = proc.wait(timeout=max(0.1, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        f.close()
        results.append(dict(command=" ".join(cmd), rc=rc, log=log.name,
                            tail=log.read_text(errors="replace")[-4000:]))
    status = "ok" if all(r["rc"] == 0 for r in results) else "FAILED"
    row = dict(step=step.name, status=status, seconds=round(time.monotonic() - start, 1), timeout=round(timeout),
               env=step.env, runs=results)
    partial = step.bench_json.with_suffix(".partial.json") if step.bench_json is not None else None
    if step.bench_json is not None and step.bench_json.exists():
        bench = json.loads(step.bench_json.read_text())
        row["bench_json"] = str(step.bench_json)
        row["bench"] = {k: bench[k] for k in ("machine", "rows", "copy_bandwidth_gbps") if k in bench}
        md = step.bench_json.with_suffix(".md")
        if md.exists():
            row["tables"] = md.read_text()
    elif partial is not None and partial.exists():  # cut short: the rows measured before the timeout
        row["bench"] = {"rows": json.loads(partial.read_text()), "partial": True}
    return row


def versions() -> dict:
    """Python, torch, Triton, CUDA, nvcc and the device of this machine."""
    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
                platform=platform.platform(), cpus=os.cpu_count())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = dict(name=props.name, capability=f"{props.major}.{props.minor}",
                              memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    else:
        info["device"] = "none (CPU)"
    for tool, args in (("nvcc", ["--version"]), ("nvidia-smi", ["--query-gpu=name,driver_version", "--format=csv"])):
        path = shutil.which(tool) or _cuda_tool(tool)
        if path:
            out = subprocess.run([path, *args], capture_output=True, text=True).stdout.strip().splitlines()
            info[tool] = out[-1] if out else None
    return info


def payload(device: str, only: Optional[str]) -> None:
    """A short pass over the GPU kernels for the sanitizer: each family on each backend that takes
    ``device`` tensors, forward and backward, with ignored rows, a multi-teacher mixture, a
    sparse scatter, a relation loss, an attention relation; compared with the torch reference."""
    import torch

    import kdops

    torch.manual_seed(0)
    backends = [b for b, s in kdops.available_backends().items() if s.available and b != "torch"]
    if device == "cpu":
        backends = [b for b in backends if b in ("cpu", "triton")]
    n, vocab = (33, 1000) if device == "cuda" else (5, 40)  # the interpreter: tiny
    s = torch.randn(n, vocab, device=device)
    t = torch.randn(3, n, vocab, device=device)
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[::5] = -100
    top = t[0].log_softmax(-1).topk(16)
    for backend in backends:
        calls = {
            "kd": lambda x: kdops.distill_loss(x, t[0], labels, hard_weight=0.5, divergence="jsd", backend=backend),
            "multi": lambda x: kdops.distill_loss(x, t, labels, divergence="reverse_kl", backend=backend),
            "sparse": lambda x: kdops.sparse_distill_loss(x, top.values, top.indices, labels, hard_weight=0.5,
                                                          rest_mass="bucket", backend=backend),
            "relation": lambda x: kdops.rkd_distance_loss(x[:, :64], t[0, :, :32], backend=backend),
            "attention": lambda x: kdops.attention_relation_loss(
                x[:, :16].reshape(1, 1, n, 16), x[:, 16:32].reshape(1, 1, n, 16), t[0, :, :8].reshape(1, 1, n, 8),
                t[1, :, :8].reshape(1, 1, n, 8), causal=True, backend=backend),
        }
        for name, call in calls.items():
            if only and name != only:
                continue
            x = s.clone().requires_grad_()
            loss = call(x)
            (grad,) = torch.autograd.grad(loss, x)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (backend, name)
            print(f"payload {backend} {name}: loss {float(loss):.6g}")


def summary_table(rows: list[dict]) -> str:
    lines = [f"{'step':44s} {'status':8s} {'seconds':>8s}"]
    for r in rows:
        lines.append(f"{r['step']:44s} {r['status']:8s} {r['seconds']:8.1f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every step on CPU with tiny shapes (plumbing test)")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--budget", type=float, default=460.0, help="seconds for all steps (default 460: under 8 min)")
    p.add_argument("--steps", nargs="+", default=None, metavar="PREFIX",
                   help="only the steps whose names start with one of these (a second, shorter lease)")
    p.add_argument("--payload", action="store_true", help=argparse.SUPPRESS)  # the sanitizer's program
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--bench-attention", nargs=5, type=int, default=None, help=argparse.SUPPRESS,
                   metavar=("B", "H", "L", "D", "DT"))  # the attention-relation benchmark step
    p.add_argument("--dtypes", nargs="+", default=["float32"], help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--bench-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.payload:
        payload(args.device, args.only)
        return 0
    if args.bench_attention:
        bench_attention(*args.bench_attention, args.device, args.dtypes, args.repeats, args.bench_out)
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: run on the GPU machine, or --dry-run here")
    date = datetime.date.today().isoformat()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rows = []
    steps = [s for s in plan(args.dry_run, args.out_dir, date)
             if args.steps is None or any(s.name.startswith(prefix) for prefix in args.steps)]
    if not steps:
        p.error(f"--steps {' '.join(args.steps)}: no step's name starts so")
    for step in steps:
        rows.append(run_step(step, args.budget - (time.monotonic() - start), args.out_dir))
        print(f"[gpu-check] {rows[-1]['step']}: {rows[-1]['status']} in {rows[-1]['seconds']} s", flush=True)
    result = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), date=date, dry_run=args.dry_run,
                  versions=versions(), budget_s=args.budget, total_s=round(time.monotonic() - start, 1), steps=rows)
    out = args.out_dir / f"gpu-check{'-dry-run' if args.dry_run else ''}-{date}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:  # the benchmark tables, then the short table last
        if r.get("tables"):
            print(r["tables"])
    print(summary_table(rows))
    print(f"total {result['total_s']} s; JSON: {out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
