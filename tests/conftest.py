"""Shared test settings: Triton interpretation on machines without a GPU, poisoned outputs, the
tolerances of every comparison against the float64 reference (in one place), and the spawning of
multi-process groups with hang detection."""
import json
import os
import socket
from pathlib import Path
from typing import Optional, Sequence

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
os.environ["KDOPS_POISON_OUTPUTS"] = "1"  # outputs start as NaN: unwritten elements fail the tests

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import kdops  # noqa: E402

# Every backend, and those with kernels (all but the torch reference), in the order tests run them.
BACKENDS = ["torch", "cpu", "triton", "cuda"]
KERNEL_BACKENDS = ["cpu", "triton", "cuda"]
# The 16/32-bit dtypes tests draw inputs in (float64 has its own gradcheck tests).
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def device_for(backend: str) -> str:
    """The device of the tensors a test gives ``backend``: CUDA for cuda (and triton on a GPU machine), else CPU."""
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def require(backend: str, dtype: Optional[torch.dtype] = None, family: Optional[str] = None) -> str:
    """Skips the test when ``backend`` cannot run here, or (given ``dtype``) declares that it takes
    no ``dtype`` tensors of ``family`` on its test device (the Triton relation kernels refuse
    float64 under Triton 3.6), with the reason; else its test device."""
    status = kdops.available_backends()[backend]
    if not status.available:
        pytest.skip(f"backend {backend!r} unavailable: {status.reason}")
    device = device_for(backend)
    if dtype is not None:
        reason = kdops._dispatch.why_not(backend, torch.device(device), dtype, family)
        if reason:
            pytest.skip(f"backend {backend!r} refuses {dtype} here (tested by the dispatch tests): {reason}")
    return device


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs under the Triton interpreter here (slow: tests keep its shapes small)."""
    return backend == "triton" and not torch.cuda.is_available()


def beta_for(divergence: str) -> float:
    """A beta valid for ``divergence`` (mixture divergences take beta in (0, 1))."""
    return 0.3 if divergence in ("jsd", "skew_forward_kl", "skew_reverse_kl") else 0.5


# (rtol, atol) for the loss (computed in float32 whatever the input dtype) and for gradients
# (stored in the input dtype), against the float64 reference on the same (upcast) inputs.
LOSS_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.bfloat16: (2e-5, 1e-6),
    torch.float16: (2e-5, 1e-6),
}
GRAD_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.bfloat16: (2e-2, 1e-5),
    torch.float16: (4e-3, 1e-6),
}


def huge_logits_grad_tol(divergence: str, log_ratio_size: float, tol: tuple = GRAD_TOL[torch.float32]) -> tuple:
    """GRAD_TOL for float32 at huge logits (|logits| ~ 1e4). Every divergence but forward KL and
    TVD puts a log-ratio (log p_s - log p_t or log p_s - log m, up to ``log_ratio_size`` =
    max|s - t| / T) into the gradient, computed in float32: its rounding, 2^-24 times its size,
    survives the cancellation against its p_s-weighted mean. atol allows twice 2^-23 times the
    size (observed: 0.65 of 2^-23 times it); rtol is unchanged, and so is the rest of the suite."""
    if divergence in ("forward_kl", "tvd"):
        return tol
    rtol, atol = tol
    return rtol, max(atol, 2 * 2.0**-23 * log_ratio_size)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple, scale: float = 1.0) -> None:
    """Elementwise |actual - expected| <= atol * scale + rtol * |expected|, inf/NaN matching."""
    rtol, atol = tol
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol * max(scale, 1.0), equal_nan=True
    )


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test, printed on failure so a failing draw can be replayed."""
    seed = int(os.environ.get("KDOPS_TEST_SEED", "0")) or (hash(request.node.nodeid) % (2**31))
    torch.manual_seed(seed)
    print(f"seed: KDOPS_TEST_SEED={seed}")  # shown with a failure's captured output
    yield


# Relation-based losses and affinities (test_affinity.py, test_feature.py): (rtol, atol) with atol
# a fraction of the largest |expected| element: gradients are sums over the batch that cancel,
# so small elements carry the absolute error of the large ones. The loss / affinity is float32
# whatever the input dtype; gradients are rounded to the input dtype (the Triton interpreter
# truncates to bfloat16: up to one ulp, 2**-7).
RELATION_LOSS_TOL = {**LOSS_TOL, torch.float64: (1e-9, 1e-12)}
RELATION_GRAD_TOL = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (5e-5, 5e-6),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (4e-3, 4e-3),
}


def assert_close_to_max(actual: torch.Tensor, expected: torch.Tensor, tol: tuple, floor: float = 0.0) -> None:
    """Elementwise |actual - expected| <= atol * max(max|expected|, floor) + rtol * |expected|;
    ``floor``: the size the values would have without cancellation (a gradient that is 0 in exact
    arithmetic, as for some 1-D features, is rounding noise of that size)."""
    rtol, atol = tol
    scale = max(float(expected.detach().abs().max()) if expected.numel() else 0.0, floor)
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol,
                               atol=atol * scale, equal_nan=True)


def spawn_ranks(target, world: int, out_dir: Path, *args, join_timeout_s: float,
                must_report: Sequence[int] = ()) -> dict:
    """Runs ``target(rank, world, port, str(out_dir), *args)`` in ``world`` spawned processes (a free
    loopback ``port`` for their process group); each rank writes what it saw to
    ``out_dir/rank{rank}.json``. Fails the test if a rank is still alive after ``join_timeout_s``
    (all are killed first) or a rank of ``must_report`` wrote nothing; skips it without
    torch.distributed. Returns {rank: its JSON} for the ranks that wrote one."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, port, str(out_dir), *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=join_timeout_s)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} of {world} did not finish within {join_timeout_s} s"
    seen = {r: json.loads((out_dir / f"rank{r}.json").read_text())
            for r in range(world) if (out_dir / f"rank{r}.json").exists()}
    silent = [f"{r} (exit code {procs[r].exitcode})" for r in must_report if r not in seen]
    assert not silent, f"ranks {', '.join(silent)} of {world} wrote no results"
    return seen


@pytest.fixture
def blockwise_everywhere(monkeypatch):
    """The blockwise fused-linear kernel taken on every device (the automatic choice takes it only
    off a GPU: kdops.ops.fused_linear.blockwise_preferred), so that its tests reach it on a GPU too."""
    from kdops.ops import fused_linear

    monkeypatch.setattr(fused_linear, "blockwise_preferred", lambda device: True)
