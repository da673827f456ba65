"""The native CPU module kdops._C through kdops.backends.native.kd.kd_forward, against the float64 reference
(kdops.reference.weighted_row_loss and its autograd gradient)."""
from __future__ import annotations

import math

import pytest
import torch

from kdops import reference
from kdops.backends.native import _module
from kdops.backends.native import kd as native
from kdops.divergences import DIVERGENCES

_OK, _WHY_NOT = _module.cpu_status()
pytestmark = pytest.mark.skipif(not _OK, reason=f"kdops._C is not available: {_WHY_NOT}")

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# (loss rtol, grad tolerance relative to the largest |grad| of the row block)
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1e-5, 8e-3),
    torch.float16: (1e-5, 1e-3),
}


def _logits(n, v, dtype, scale=3.0, seed=0, width=None):
    """[n, v] logits, as a slice of an [n, width] tensor when width is given (row stride width)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width or v, generator=g, dtype=torch.float64) * scale
    return x.to(dtype)[:, :v]


def _reference(student, teacher, labels, div, temperature, beta, hard_weight, soft_weight):
    s = student.double().requires_grad_()
    rows, _ = reference.weighted_row_loss(
        s, teacher.double(), labels, temperature=temperature, divergence=DIVERGENCES[div],
        beta=beta, hard_weight=hard_weight, soft_weight=soft_weight, ignore_index=-100,
    )
    (grad,) = torch.autograd.grad(rows.sum(), s)
    return rows.detach(), grad


def _check(student, teacher, labels=None, div=0, temperature=2.0, beta=0.3, hard_weight=0.0,
           soft_weight=None):
    soft_weight = (1.0 - hard_weight) * temperature**2 if soft_weight is None else soft_weight
    args = (student, teacher, labels, div, temperature, beta, hard_weight, soft_weight, -100)
    loss, grad = native.kd_forward(*args, True)
    loss_only, empty = native.kd_forward(*args, False)
    n, v = student.shape
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert loss.shape == (n,) and grad.shape == (n, v) and grad.dtype == student.dtype
    assert grad.is_contiguous() and empty.numel() == 0
    ref_loss, ref_grad = _reference(student, teacher, labels, div, temperature, beta, hard_weight,
                                    soft_weight)
    rtol, gtol = TOLERANCES[student.dtype]
    torch.testing.assert_close(loss_only, loss, rtol=rtol, atol=rtol * 1e-2)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=rtol * 1e-2)
    scale = max(ref_grad.abs().max().item(), 1e-30)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=gtol, atol=gtol * scale)
    return loss, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", range(len(DIVERGENCES)), ids=DIVERGENCES)
def test_matches_reference(div, dtype):
    n, v = 7, 1000 + 7
    _check(_logits(n, v, dtype, seed=1), _logits(n, v, dtype, seed=2), div=div)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("div", range(len(DIVERGENCES)), ids=DIVERGENCES)
def test_labels_ignore_index_and_hard_weight(div, dtype, monkeypatch):
    monkeypatch.setenv("KDOPS_POISON_OUTPUTS", "1")  # every output element must be written
    n, v = 6, 3001
    labels = torch.tensor([0, -100, v - 1, 17, -100, 5])
    loss, grad = _check(_logits(n, v, dtype, seed=3), _logits(n, v, dtype, seed=4), labels,
                        div=div, beta=0.6, hard_weight=0.4)
    assert torch.all(loss[labels == -100] == 0) and torch.all(grad[labels == -100] == 0)


@pytest.mark.parametrize("v", [1, 3, 5000 + 3], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("div", range(len(DIVERGENCES)), ids=DIVERGENCES)
def test_vocab_sizes(div, v):
    labels = torch.tensor([0, v - 1, v // 2])
    _check(_logits(3, v, torch.float32, seed=5), _logits(3, v, torch.float32, seed=6), labels,
           div=div, temperature=0.7, hard_weight=0.25)


@pytest.mark.parametrize("div", [d for d, name in enumerate(DIVERGENCES) if name != "reverse_kl"],
                         ids=lambda d: DIVERGENCES[d])
def test_masked_teacher_vocabulary(div):
    """-inf teacher logits (a masked vocabulary): p_t = 0 there."""
    n, v = 4, 2049
    teacher = _logits(n, v, torch.float32, seed=8).clone()
    teacher[torch.rand(n, v, generator=torch.Generator().manual_seed(9)) < 0.4] = -math.inf
    teacher[:, 2000:] = -math.inf  # also whole chunks of -inf
    _check(_logits(n, v, torch.float32, seed=7), teacher, div=div, beta=0.5)


def test_masked_teacher_reverse_kl_is_infinite():
    student = _logits(2, 100, torch.float32, seed=10)
    teacher = _logits(2, 100, torch.float32).clone()
    teacher[:, :10] = -math.inf
    loss, _ = native.kd_forward(student, teacher, None, DIVERGENCES.index("reverse_kl"), 2.0, 0.5,
                                0.0, 4.0, -100, True)
    assert torch.all(loss == math.inf)


@pytest.mark.parametrize("div", ["reverse_kl", "jsd", "tvd"])
def test_masked_student_logits(div):
    """-inf student logits: p_s = 0 there, and so is the gradient. (The reference's autograd is
    NaN there, so its gradient is taken with -1e4 in their place, where p_s is 0 as well.)"""
    n, v = 3, 777
    student = _logits(n, v, torch.float32, seed=11).clone()
    student[:, ::5] = -math.inf
    teacher = _logits(n, v, torch.float32, seed=12)
    code = DIVERGENCES.index(div)
    args = (None, code, 2.0, 0.5, 0.0, 4.0)
    loss, grad = native.kd_forward(student, teacher, *args, -100, True)
    ref_loss, _ = _reference(student, teacher, *args)
    _, ref_grad = _reference(student.nan_to_num(neginf=-1e4), teacher, *args)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    assert torch.all(grad[:, ::5] == 0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("div", range(len(DIVERGENCES)), ids=DIVERGENCES)
def test_large_logits(div):
    n, v = 4, 4099
    student = _logits(n, v, torch.float32, scale=1e4, seed=13)
    teacher = _logits(n, v, torch.float32, scale=1e4, seed=14)
    _check(student, teacher, torch.tensor([1, 2, 3, 4]), div=div, temperature=3.0, hard_weight=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_rows(dtype):
    n, v = 5, 1031
    student = _logits(n, v, dtype, seed=15, width=v + 13)
    teacher = _logits(n, v, dtype, seed=16, width=2 * v + 1)
    assert student.stride(0) == v + 13 and teacher.stride(0) == 2 * v + 1
    _check(student, teacher, torch.tensor([3, -100, 0, 1030, 9]), div=2, hard_weight=0.3)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_half_types_round_like_torch(dtype):
    """16-bit logits are exact in float, so the gradients must round like torch's float ->
    dtype conversion: bit-equal but where the last bits of the float sums (added in another
    order) move a value across a rounding boundary."""
    student, teacher = _logits(6, 3000, dtype, seed=17), _logits(6, 3000, dtype, seed=18)
    args = (None, 0, 2.0, 0.5, 0.0, 4.0, -100, True)
    loss16, grad16 = native.kd_forward(student, teacher, *args)
    loss32, grad32 = native.kd_forward(student.float(), teacher.float(), *args)
    torch.testing.assert_close(loss16, loss32, rtol=1e-6, atol=0)
    assert (grad16.view(torch.int16) == grad32.to(dtype).view(torch.int16)).float().mean() > 0.99
    torch.testing.assert_close(grad16.float(), grad32, rtol=torch.finfo(dtype).eps,
                               atol=1e-5 * grad32.abs().max().item())


def test_out_of_range_label_gives_nan():
    student, teacher = _logits(2, 10, torch.float32), _logits(2, 10, torch.float32, seed=1)
    loss, _ = native.kd_forward(student, teacher, torch.tensor([10, 3]), 0, 1.0, 0.5, 0.5, 0.5,
                                -100, True)
    assert math.isnan(loss[0].item()) and math.isfinite(loss[1].item())


def test_empty_batch():
    loss, grad = native.kd_forward(torch.empty(0, 5), torch.empty(0, 5), None, 0, 2.0, 0.5, 0.0,
                                   4.0, -100, True)
    assert loss.shape == (0,) and grad.shape == (0, 5)


def test_bad_codes_raise_value_error():
    from kdops import _C

    x = torch.zeros(1, 4)
    loss = torch.empty(1)
    args = [x.data_ptr(), x.data_ptr(), 0, loss.data_ptr(), 0, 1, 4, 4, 4, 4, 0, 0, 2.0, 0.5, 0.0,
            1.0, -100]
    _C.kd_forward(*args)
    for index, bad in ((10, 7), (11, 6), (11, -1), (12, 0.0)):
        with pytest.raises(ValueError):
            _C.kd_forward(*args[:index], bad, *args[index + 1:])
    assert _C.num_threads() >= 1
