"""The backend choice: argument, then KDOPS_BACKEND, then automatic; clear errors otherwise; the
backends' declarations and the one lazy import of their kernels."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdops
from kdops import _dispatch


def test_available_backends_reports_every_backend():
    status = kdops.available_backends()
    assert set(status) == set(kdops.BACKENDS)
    assert status["torch"].available
    for name, (ok, reason) in status.items():
        assert isinstance(ok, bool) and reason, name


def test_automatic_choice_on_cpu():
    expected = "cpu" if kdops.available_backends()["cpu"].available else "torch"
    assert _dispatch.resolve_backend(None, torch.device("cpu"), torch.float32) == expected


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("KDOPS_BACKEND", "torch")
    assert _dispatch.resolve_backend(None, torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv("KDOPS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="KDOPS_BACKEND"):
        _dispatch.resolve_backend(None, torch.device("cpu"), torch.float32)
    # the argument wins over the environment
    assert _dispatch.resolve_backend("torch", torch.device("cpu"), torch.float32) == "torch"


def test_environment_variable_reaches_the_loss(monkeypatch):
    monkeypatch.setenv("KDOPS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="KDOPS_BACKEND='cuda'"):
        kdops.distill_loss(torch.randn(2, 3), torch.randn(2, 3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a GPU")
def test_unavailable_backend_is_an_error():
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run this call"):
        _dispatch.resolve_backend("cuda", torch.device("cpu"), torch.float32)


def test_backend_without_the_dtype_is_skipped_or_refused():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only choice")
    # the torch reference takes every floating dtype
    assert _dispatch.resolve_backend("torch", torch.device("cpu"), torch.float64) == "torch"


def test_status_imports_no_kernel_module():
    """kdops and its dispatch import no kernel module: kernels() is the one lazy import."""
    code = ("import sys, kdops; kdops.available_backends(); "
            "print(sorted(m for m in sys.modules if m.startswith('kdops.backends.') and m.count('.') == 3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['kdops.backends.native._module']"


def test_kernels_of_a_family():
    assert _dispatch.kernels("kd", "cpu").__name__ == "kdops.backends.native.kd"
    assert _dispatch.kernels("sparse_kd", "triton").__name__ == "kdops.backends.triton.sparse_kd"
    for family in ("kd", "sparse_kd", "affinity", "attention_relation"):  # one contract per family
        modules = [_dispatch.kernels(family, b) for b in ("triton", "cpu", "cuda")]
        names = [set(n for n in dir(m) if n.endswith(("_forward", "_backward")) and not n.startswith("_"))
                 for m in modules]
        assert names[0] == names[1] == names[2] and names[0], family
    with pytest.raises(LookupError, match="kdops.reference"):
        _dispatch.kernels("kd", "torch")
    with pytest.raises(LookupError, match="no kernels of the 'fused_linear' family"):
        _dispatch.kernels("fused_linear", "cpu")


def test_declared_support():
    cpu = torch.device("cpu")
    triton = _dispatch.DECLARATIONS["triton"]
    assert _dispatch.offers("fused_linear", "triton", cpu, torch.bfloat16) == triton.status().available
    assert not _dispatch.offers("fused_linear", "triton", cpu, torch.float64)  # the chunked path instead
    assert not _dispatch.offers("fused_linear", "triton", cpu, torch.float32, n_teachers=2)
    assert not _dispatch.offers("fused_linear", "cpu", cpu, torch.float32)
    assert not _dispatch.offers("kd", "torch", cpu, torch.float32)
    cuda = _dispatch.DECLARATIONS["cuda"]
    too_many = cuda.families["kd"].max_teachers + 1
    reasons = cuda.not_supported_reasons(torch.device("cuda"), torch.float64, "kd", too_many)
    if cuda.status().available:
        assert any("float64" in r for r in reasons) and any("at most" in r for r in reasons)
    else:
        assert reasons == [cuda.status().reason]


def test_triton_kd_refuses_more_teachers_than_its_tile():
    """Past KD_MAX_TEACHERS the Triton kd kernel's teacher tile would grow with K (a [16, K] tile
    of K float64 lanes spills): the named backend says so; the automatic choice takes another."""
    status = _dispatch.DECLARATIONS["triton"].status()
    if not status.available:
        pytest.skip(status.reason)
    from kdops.backends.triton import KD_MAX_TEACHERS

    k = KD_MAX_TEACHERS + 1
    student, teachers = torch.randn(2, 8), torch.randn(k, 2, 8)
    with pytest.raises(RuntimeError, match=f"at most {KD_MAX_TEACHERS} teachers"):
        kdops.distill_loss(student, teachers, backend="triton")
    kdops.distill_loss(student, teachers[:KD_MAX_TEACHERS], backend="triton")
    assert torch.isfinite(kdops.distill_loss(student, teachers))


def test_cuda_max_teachers_is_the_kernels():
    """The CUDA kd kernel's teacher limit (kMaxTeachers in csrc/cuda/kd.cu) is declared once in Python."""
    source = (Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "kd.cu").read_text()
    value = int(re.search(r"constexpr\s+int64_t\s+kMaxTeachers\s*=\s*(\d+)", source).group(1))
    assert _dispatch.DECLARATIONS["cuda"].families["kd"].max_teachers == value


def test_blockwise_kernel_not_preferred_on_a_gpu():
    """The automatic choice: the chunked path for CUDA tensors (the blockwise Triton kernel measured
    18x slower there), the blockwise kernel for the interpreter's CPU tensors."""
    from kdops.ops import fused_linear

    assert not fused_linear.blockwise_preferred(torch.device("cuda", 0))
    assert fused_linear.blockwise_preferred(torch.device("cpu"))
