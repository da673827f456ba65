"""Deterministic mode: under ``torch.use_deterministic_algorithms(True)`` every kdops op gives
bitwise the same loss and gradients run to run (CPU here: the torch and cpu backends and the Triton
interpreter), and the blockwise Triton fused-linear kernel, whose float32 atomic adds make its
gradients order-dependent on a GPU, gives way to the chunked path (deterministic KD kernel per
chunk, then matmuls)."""
import pytest
import torch

import kdops
from kdops.backends.triton import fused_linear as triton_fused_linear

from conftest import interpreted, require

BACKENDS = ["torch", "cpu", "triton"]
RUNS = 3


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _cases(small: bool):
    """op name -> (function of the student leaves, the leaves' shapes): sizes that split the
    work over threads / tiles (tiny under the Triton interpreter)."""
    n, v, b = (6, 70, 9) if small else (96, 3000, 150)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(n, v, generator=g) * 3
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100
    th, tw = torch.randn(n, 24, generator=g), torch.randn(v, 24, generator=g) / 5
    lp, idx = torch.log_softmax(t, -1).topk(16, -1)
    f_t = torch.randn(b, 7, generator=g)
    m_t = torch.randn(4, 5, 6, 6, generator=g)
    return {
        "distill_loss": (lambda s, **kw: kdops.distill_loss(s, t, y, hard_weight=0.3, divergence="jsd", **kw),
                         [(n, v)]),
        "distill_loss multi-teacher": (lambda s, **kw: kdops.distill_loss(s, torch.stack([t, t.flip(0)]), y, **kw),
                                       [(n, v)]),
        "fused_linear_distill_loss": (lambda h, w, **kw: kdops.fused_linear_distill_loss(
            h, w, th, tw, y, hard_weight=0.2, chunk_size=32, **kw), [(n, 16), (v, 16)]),
        "sparse_distill_loss": (lambda s, **kw: kdops.sparse_distill_loss(s, lp, idx, y, rest_mass="bucket", **kw),
                                [(n, v)]),
        "fused_linear_sparse_distill_loss": (lambda h, w, **kw: kdops.fused_linear_sparse_distill_loss(
            h, w, lp, idx, y, **kw), [(n, 16), (v, 16)]),
        "affinity": (lambda x, **kw: (kdops.affinity(x, "euclidean", **kw) * f_t[:, :1]).sum(), [(b, 33)]),
        "similarity_preserving_loss": (lambda x, **kw: kdops.similarity_preserving_loss(x, f_t, **kw), [(b, 33)]),
        "rkd_distance_loss": (lambda x, **kw: kdops.rkd_distance_loss(x, f_t, **kw), [(b, 33)]),
        "rkd_angle_loss": (lambda x, **kw: kdops.rkd_angle_loss(x, f_t, **kw), [(b, 33)]),
        "hint_loss": (lambda x, **kw: kdops.hint_loss(x, m_t[:, :3] * 2), [(4, 3, 6, 6)]),
        "attention_transfer_loss": (lambda x, **kw: kdops.attention_transfer_loss(x, m_t), [(4, 3, 6, 6)]),
    }


def _run(fn, shapes, backend):
    g = torch.Generator().manual_seed(1)
    leaves = [torch.randn(shape, generator=g).requires_grad_(True) for shape in shapes]
    loss = fn(*leaves, **({} if backend is None else {"backend": backend}))
    loss.backward()
    return [loss.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(_cases(small=False)))
def test_bitwise_reproducible(deterministic, backend, op):
    require(backend)
    fn, shapes = _cases(small=interpreted(backend))[op]
    if op in ("hint_loss", "attention_transfer_loss"):
        backend = None  # no kernels: torch ops on any backend
    first = _run(fn, shapes, backend)
    for _ in range(RUNS - 1):
        again = _run(fn, shapes, backend)
        for a, b in zip(first, again):
            assert torch.equal(a, b), f"{op} on {backend}: run-to-run difference {float((a - b).abs().max())}"


@pytest.mark.usefixtures("blockwise_everywhere")
def test_blockwise_kernel_gives_way_in_deterministic_mode(deterministic, monkeypatch):
    """The blockwise Triton kernel's atomic float32 adds are order-dependent on a GPU: with
    deterministic algorithms on, fused_linear_distill_loss takes the chunked path instead."""
    require("triton")

    def refuse(*args, **kwargs):
        raise AssertionError("the blockwise kernel ran in deterministic mode")

    monkeypatch.setattr(triton_fused_linear, "fused_linear_distill", refuse)
    h, w = torch.randn(5, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    kdops.fused_linear_distill_loss(h, w, torch.randn(5, 4), torch.randn(20, 4), backend="triton").backward()
    assert h.grad is not None and w.grad is not None


@pytest.mark.usefixtures("blockwise_everywhere")
def test_blockwise_kernel_runs_otherwise(monkeypatch):
    require("triton")
    calls = []
    original = triton_fused_linear.fused_linear_distill
    monkeypatch.setattr(triton_fused_linear, "fused_linear_distill",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    h, w = torch.randn(5, 8, requires_grad=True), torch.randn(20, 8)
    kdops.fused_linear_distill_loss(h, w, torch.randn(5, 4), torch.randn(20, 4), backend="triton").backward()
    assert calls, "the blockwise kernel did not run (float32, one teacher, deterministic mode off)"
