"""The backend choice: argument, then KDOPS_BACKEND, then automatic; clear errors otherwise."""
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
