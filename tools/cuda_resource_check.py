"""Resource check of the CUDA C++ kernels, without a GPU: compiles each ``csrc/cuda/*.cu`` to a
cubin with ``nvcc -Xptxas -v`` for each target architecture, parses ptxas' report of every kernel
(registers, spill stores / loads, stack frame, static shared memory), prints a table and writes
it as JSON.

    python tools/cuda_resource_check.py results.json            # sm_80, sm_90, sm_100
    python tools/cuda_resource_check.py --quick results.json    # sm_90 only (a quick look)

Exit status 1 on any compile error and on any kernel whose spill stores or loads exceed
``SPILL_BUDGET`` bytes per thread (``make aot-check`` runs this with the Triton check,
``tools/aot_check.py``).

Spill budget: 0 bytes. The Triton check allows 32 B (``tools/aot_check.py``) because Triton's
register allocation of a kernel changes with Triton releases that kdops does not control. The CUDA
C++ kernels are written for their register budget (``__launch_bounds__`` fixes the cap, the
chunking of a row fixes what lives in registers), so every spill is a choice of this code that
ptxas reports exactly: the kd kernel streams its rows from L2 at memory speed, and each spilled
value becomes a local-memory store and load per element chunk of every pass, which the
streaming loop cannot hide; 0 keeps that visible when a change adds one. Every kernel meets it
today (issue 12 found 4-16 B in ``kd_forward_kernel``, since fixed).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = (80, 90, 100)
QUICK_ARCHS = (90,)
SPILL_BUDGET = 0  # bytes per thread, of spill stores and of spill loads (see the docstring)
# The flags of the CMake build (CMakeLists.txt, target _C_cuda) that shape the code, for a cubin of one
# architecture (the build's --threads=0 only runs its architectures in parallel).
NVCC_FLAGS = ("-std=c++17", "--expt-relaxed-constexpr", "-O3", "-DNDEBUG", "-DKDOPS_WITH_CUDA")

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PROPS = re.compile(
    r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


def nvcc_command(nvcc: str, source: Path, arch: int, cubin: Path) -> list[str]:
    return [nvcc, *NVCC_FLAGS, f"-I{ROOT / 'csrc'}", f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v",
            "-o", str(cubin), str(source)]


def parse_ptxas(log: str) -> list[dict]:
    """Per kernel of a ``ptxas -v`` log: name (mangled), arch, registers, stack, spill stores /
    loads and static shared memory (bytes per thread / per block)."""
    kernels: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = kernels.setdefault(m.group(1), dict(name=m.group(1), arch=m.group(2)))
            continue
        m = _USED.search(line)
        if m and current is not None:
            current["registers"] = int(m.group(1))
            smem = _SMEM.search(m.group(2))
            current["smem"] = int(smem.group(1)) if smem else 0
    for m in _PROPS.finditer(log):
        row = kernels.get(m.group(1))
        if row is not None:  # device functions have properties too; only entries are kept
            row.update(stack=int(m.group(2)), spill_stores=int(m.group(3)), spill_loads=int(m.group(4)))
    rows = list(kernels.values())
    for row in rows:
        missing = {"registers", "stack", "spill_stores", "spill_loads"} - row.keys()
        if missing:
            raise ValueError(f"ptxas report of {row['name']} lacks {sorted(missing)}")
    return rows


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable kernel names (c++filt when available; the anonymous-namespace part and
    the argument list dropped)."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = {}
    for name, pretty in zip(names, out):
        pretty = re.sub(r"\(anonymous namespace\)::|kdops::", "", pretty)
        short[name] = re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", pretty)  # drop the parameter list
    return short


def compile_one(nvcc: str, source: Path, arch: int, tmp: Path) -> dict:
    """Compiles one (source, arch); returns its kernels, or the error output."""
    cubin = tmp / f"{source.stem}.sm_{arch}.cubin"
    cmd = nvcc_command(nvcc, source, arch, cubin)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    result = dict(source=str(source.relative_to(ROOT)), arch=f"sm_{arch}", command=" ".join(cmd),
                  seconds=round(time.perf_counter() - start, 1), kernels=[], error=None)
    if proc.returncode != 0:
        result["error"] = (proc.stderr or proc.stdout)[-4000:]
        return result
    try:
        result["kernels"] = parse_ptxas(proc.stderr + proc.stdout)
    except ValueError as e:
        result["error"] = str(e)
    return result


def check_rows(results: list[dict], budget: int) -> list[str]:
    """The failures: compile errors and kernels spilling more than `budget` bytes."""
    failures = []
    for res in results:
        if res["error"]:
            failures.append(f"{res['source']} {res['arch']}: compile error:\n{res['error']}")
        for k in res["kernels"]:
            if max(k["spill_stores"], k["spill_loads"]) > budget:
                failures.append(f"{res['source']} {res['arch']} {k.get('kernel', k['name'])}: spills "
                                f"{k['spill_stores']} B stores / {k['spill_loads']} B loads > budget {budget} B")
    return failures


def table(results: list[dict]) -> str:
    lines = [f"{'source':<22} {'arch':<7} {'regs':>5} {'spill st/ld':>11} {'stack':>6} {'smem':>7}  kernel"]
    for res in results:
        for k in sorted(res["kernels"], key=lambda k: k["kernel"]):
            lines.append(f"{Path(res['source']).name:<22} {res['arch']:<7} {k['registers']:>5} "
                         f"{k['spill_stores']:>5}/{k['spill_loads']:<5} {k['stack']:>6} {k['smem']:>7}  {k['kernel']}")
        if res["error"]:
            lines.append(f"{Path(res['source']).name:<22} {res['arch']:<7} COMPILE ERROR")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="where to write the JSON report")
    parser.add_argument("--quick", action="store_true",
                        help=f"only sm_{QUICK_ARCHS[0]} (a quick look; make aot-check compiles all three)")
    parser.add_argument("--arch", type=int, nargs="+", help=f"compute capabilities (default {ARCHS})")
    parser.add_argument("--sources", type=Path, nargs="+", help="the .cu files (default csrc/cuda/*.cu)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc processes")
    parser.add_argument("--budget", type=int, default=SPILL_BUDGET, help="spill bytes per thread allowed")
    args = parser.parse_args(argv)
    nvcc = shutil.which("nvcc") or os.environ.get("CUDACXX")
    if not nvcc:
        print("cuda_resource_check: nvcc not found (put it on PATH or set CUDACXX)", file=sys.stderr)
        return 1
    archs = args.arch or (QUICK_ARCHS if args.quick else ARCHS)
    sources = [s.resolve() for s in args.sources] if args.sources else SOURCES
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(compile_one, nvcc, s, a, Path(tmp)) for s in sources for a in archs]
        results = [j.result() for j in jobs]
    names = demangle([k["name"] for r in results for k in r["kernels"]])
    for r in results:
        for k in r["kernels"]:
            k["kernel"] = names[k["name"]]
    failures = check_rows(results, args.budget)
    nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    report = dict(
        tool="tools/cuda_resource_check.py", command=" ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        machine=f"{platform.node()} {platform.machine()} ({os.cpu_count()} cores), no GPU needed",
        nvcc=nvcc_version[-1] if nvcc_version else "", archs=[f"sm_{a}" for a in archs],
        spill_budget_bytes=args.budget, seconds=round(time.perf_counter() - start, 1),
        results=results, failures=failures,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(table(results))
    n = sum(len(r["kernels"]) for r in results)
    worst = max((max(k["spill_stores"], k["spill_loads"]) for r in results for k in r["kernels"]), default=0)
    print(f"\n{n} kernels in {len(results)} compilations ({', '.join(report['archs'])}), worst spill {worst} B, "
          f"budget {args.budget} B, {report['seconds']} s; wrote {args.json}")
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
