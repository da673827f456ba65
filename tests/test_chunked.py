"""kdops.ops._chunked, the one chunked lm_head driver (dense, sparse and vocabulary-parallel
fused-linear losses): float32 logits from 16-bit inputs, and the casts of G and the row weights."""
import pytest
import torch

import kdops
from kdops import reference
from kdops.ops._chunked import chunk_logits, lm_head_rows

from conftest import require


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_logits_are_float32_with_float32_accumulation(dtype, monkeypatch):
    x = torch.randn(5, 37).to(dtype)
    w = torch.randn(11, 37).to(dtype)
    b = torch.randn(11).to(dtype)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    monkeypatch.setattr("kdops.ops._chunked.UPCAST_BUDGET_BYTES", 37 * 4 * 3)  # 3 vocabulary rows per slice
    got = chunk_logits(x, w, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-5)
    # the input dtype's own linear rounds the logits: a difference this test can see
    rounded = torch.nn.functional.linear(x, w, b).double()
    assert (rounded - exact).abs().max() > 100 * (got.double() - exact).abs().max()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("loss", ["dense", "sparse"])
def test_bf16_inputs_match_the_float64_oracle(backend, loss):
    """TVD at V = 7 with a teacher close to the student: rounding the logits to bfloat16 moves
    the loss (and flips gradient signs); the chunked path's float32 logits keep it to float32
    accuracy of the oracle on the same (exactly upcast) bf16 inputs."""
    device = require(backend)
    n, hidden, vocab = 9, 16, 7
    h = torch.randn(n, hidden).to(torch.bfloat16).to(device)
    w = torch.randn(vocab, hidden).to(torch.bfloat16).to(device)
    th = (h.float() + 2.0**-6 * torch.randn(n, hidden, device=device)).to(torch.bfloat16)
    options = dict(temperature=1.0, divergence="tvd")
    if loss == "dense":
        got = kdops.fused_linear_distill_loss(h, w, th, w, chunk_size=4, backend=backend, **options)
        exact = reference.fused_linear_distill_loss(h.double(), w.double(), th.double(), w.double(), **options)
        rounded = reference.distill_loss((h @ w.T).double(), (th @ w.T).double(), **options)
    else:  # the teacher's full distribution as its "top-k" (K = V)
        topk = torch.log_softmax(th.double() @ w.double().T, -1)
        idx = torch.arange(vocab, device=device).expand(n, vocab)
        got = kdops.fused_linear_sparse_distill_loss(h, w, topk.float(), idx, chunk_size=4, backend=backend, **options)
        exact = reference.sparse_distill_loss(h.double() @ w.double().T, topk, idx, **options)
        rounded = reference.sparse_distill_loss((h @ w.T).double(), topk, idx, **options)
    tol = 2e-5 * float(exact.abs()) + 1e-6
    assert abs(float(got) - float(exact)) <= tol
    assert abs(float(rounded) - float(exact)) > tol  # bf16-rounded logits would fail this test


def test_row_weights_and_gradients_stay_in_float32():
    """G and the row weights multiply in float32 (a weight 1 + 2^-10 is not a bfloat16); the
    weight and bias gradients accumulate in float32; grad_h uses G rounded to w's dtype."""
    n, hidden, vocab = 6, 5, 9
    h = torch.randn(n, hidden).to(torch.bfloat16)
    w = torch.randn(vocab, hidden).to(torch.bfloat16)
    b = torch.randn(vocab).to(torch.bfloat16)
    g_all = torch.randn(n, vocab).to(torch.bfloat16)  # a kernel's gradient in the student dtype
    row_weights = 1.0 + 2.0**-10 * torch.arange(1, n + 1, dtype=torch.float32)

    def row_loss(idx, logits, want_grad):
        assert logits.dtype == torch.float32
        return logits.sum(1), g_all[idx].clone()

    rows, gh, gw, gb = lm_head_rows(h, w, b, row_loss, None, -100, row_weights, 4, [True, True, True])
    weighted = g_all.double() * row_weights.double()[:, None]
    assert gw.dtype == gb.dtype == gh.dtype == torch.float32
    torch.testing.assert_close(gw.double(), weighted.T @ h.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb.double(), weighted.sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh.double(), (weighted.to(torch.bfloat16) @ w).double(), rtol=0, atol=0)
    # weights rounded to bfloat16 first (1 + 2^-10 -> 1) would be off by more than the tolerance
    coarse = g_all.double() * row_weights.to(torch.bfloat16).double()[:, None]
    assert (coarse.T @ h.double() - weighted.T @ h.double()).abs().max() > 1e-4


def test_ignored_rows_are_skipped():
    h, w = torch.randn(7, 3), torch.randn(5, 3)
    labels = torch.tensor([1, -100, 2, -100, -100, 0, 4])
    seen = []

    def row_loss(idx, logits, want_grad):
        seen.extend(idx.tolist())
        return logits.sum(1), None

    rows, *grads = lm_head_rows(h, w, None, row_loss, labels, -100, None, 2, [False] * 3)
    assert seen == [0, 2, 5, 6] and grads == [None, None, None]
    assert (rows[labels == -100] == 0).all()
