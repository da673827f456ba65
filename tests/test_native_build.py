"""The native build: kdops._C (and kdops._C_cuda where nvcc built it) import, expose the same
functions, report their OpenMP threads, check their arguments, and link no libtorch / libc10.
The kernels themselves are tested with their families (test_kd.py, test_sparse_kd.py,
test_affinity.py)."""
from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdops.backends.native import _module

_OK, _WHY_NOT = _module.cpu_status()
pytestmark = pytest.mark.skipif(not _OK, reason=f"kdops._C is not available: {_WHY_NOT}")

FUNCTIONS = ("kd_forward", "sparse_kd_forward", "affinity_forward", "affinity_backward", "relation_forward",
             "relation_backward")


def _built(name: str):
    module, why_not = _module.load(name)
    if module is None:
        pytest.skip(why_not)
    return module


def _path(name: str) -> str:
    return _built(name).__file__


@pytest.mark.parametrize("name", ["_C", "_C_cuda"])
def test_module_links_no_libtorch(name):
    """The modules take data pointers: no libtorch / libc10 / libtorch_python in their dynamic
    section (readelf) nor among the libraries the loader resolves (ldd)."""
    path = _path(name)
    readelf = shutil.which("readelf")
    if readelf:
        dynamic = subprocess.run([readelf, "-d", path], capture_output=True, text=True, check=True).stdout
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
        assert needed, dynamic
        assert not [lib for lib in needed if re.match(r"lib(torch|c10)", lib)], needed
    ldd = shutil.which("ldd")
    if not (readelf or ldd):
        pytest.skip("neither readelf nor ldd is available")
    if ldd:
        resolved = subprocess.run([ldd, path], capture_output=True, text=True).stdout
        assert "libtorch" not in resolved and "libc10" not in resolved, resolved


@pytest.mark.parametrize("name", ["_C", "_C_cuda"])
def test_module_imports_without_torch(name):
    """A fresh interpreter loads the module from its file without importing torch."""
    path = _path(name)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location({name!r}, {path!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"assert all(hasattr(m, f) for f in {FUNCTIONS!r})\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _signature(function) -> list[str]:
    """The argument names of a pybind function, from its docstring's first line."""
    first = function.__doc__.splitlines()[0]
    args = first[first.index("(") + 1:first.rindex(")")]
    return [a.split(":")[0].strip() for a in re.split(r",\s*(?![^\[]*\])", args) if a.strip()]


def test_modules_expose_the_same_functions():
    cpu = _built("_C")
    for f in FUNCTIONS:
        assert callable(getattr(cpu, f))
    keywords = ["n_teachers", "teacher_k_stride", "teacher_log_weights_ptr", "student_scale", "student_softcap",
                "teacher_scale", "teacher_softcap", "grad_divisor_ptr"]  # kd_forward's keywords, with defaults
    assert _signature(cpu.kd_forward)[-len(keywords):] == keywords
    module, _ = _module.load("_C_cuda")
    if module is None:
        return
    for f in FUNCTIONS:
        cpu_args, cuda_args = _signature(getattr(cpu, f)), _signature(getattr(module, f))
        # the CUDA module takes one more argument, the stream (before the keywords with defaults)
        assert cuda_args.count("stream") == 1 and [a for a in cuda_args if a != "stream"] == cpu_args, f


def test_openmp_threads_follow_omp_num_threads():
    """num_threads() is OpenMP's (checked without torch, which sets its own thread count)."""
    assert _built("_C").num_threads() >= 1
    code = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('_C', {_path('_C')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.num_threads())\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=120)
    expected = "3" if "OpenMP" in _module.cpu_status()[1] else "1"
    assert out.stdout.strip() == expected


def test_status_names_the_threads():
    ok, reason = _module.cpu_status()
    assert ok and re.search(r"OpenMP with \d+ threads", reason)


def test_bad_codes_raise_value_error_naming_the_function():
    cpu = _built("_C")
    x = torch.zeros(1, 4)
    loss = torch.empty(1)
    args = [x.data_ptr(), x.data_ptr(), 0, loss.data_ptr(), 0, 1, 4, 4, 4, 4, 0, 0, 2.0, 0.5, 0.0, 1.0, -100]
    cpu.kd_forward(*args)
    for index, bad in ((10, 7), (11, 7), (11, -1), (12, 0.0)):  # 11: divergence, 6 = the hard target
        with pytest.raises(ValueError, match="kdops.kd_forward"):
            cpu.kd_forward(*args[:index], bad, *args[index + 1:])
    idx = torch.zeros(1, 1, dtype=torch.int32)
    sparse = [x.data_ptr(), x.data_ptr(), idx.data_ptr(), 0, loss.data_ptr(), 0, 1, 4, 1, 4, 4, 0, 0, 2.0, 0.5,
              0.0, 1.0, -100, True]
    cpu.sparse_kd_forward(*sparse)
    with pytest.raises(ValueError, match="kdops.sparse_kd_forward"):
        cpu.sparse_kd_forward(*sparse[:8], 5, *sparse[9:])  # k > vocab
    out = torch.empty(1, 1)
    with pytest.raises(ValueError, match="kdops.affinity_forward"):
        cpu.affinity_forward(x.data_ptr(), out.data_ptr(), 1, 4, 4, 1, 0, 9)  # unknown kind


def test_loader_explains_a_missing_module():
    module, why_not = _module.load("_C_missing_for_test")
    assert module is None and "not built" in why_not and "pip install" in why_not


def test_spec_finds_the_modules_in_the_package():
    spec = importlib.util.find_spec("kdops._C")
    assert spec is not None and Path(spec.origin).parent == Path(inspect.getfile(_module)).parents[2]
