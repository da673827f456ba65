"""kdops.distill_loss on every backend available here against the float64 reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import kdops
from kdops import reference
from kdops.divergences import DIVERGENCES
from kdops.ops._common import DistillOptions

from conftest import (BACKENDS, DTYPES, GRAD_TOL, LOSS_TOL, assert_close, beta_for, huge_logits_grad_tol, require)


def run(backend, student, teacher, labels=None, **options):
    """Loss and student gradient from kdops; the same from the float64 reference."""
    s = student.detach().clone().requires_grad_(True)
    loss = kdops.distill_loss(s, teacher, labels, backend=backend, **options)
    loss.sum().backward() if loss.dim() else loss.backward()
    s64 = student.detach().double().requires_grad_(True)
    ref = reference.distill_loss(s64, teacher.double(), labels, **options)
    ref.sum().backward() if ref.dim() else ref.backward()
    return loss, s.grad, ref, s64.grad


def check(backend, student, teacher, labels=None, grad_tol=None, **options):
    loss, grad, ref, ref_grad = run(backend, student, teacher, labels, **options)
    dtype = student.dtype
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == student.shape
    assert_close(loss, ref, LOSS_TOL[dtype], scale=float(ref.detach().abs().max()) if ref.numel() else 1.0)
    assert_close(grad, ref_grad, grad_tol or GRAD_TOL[dtype])
    return loss, grad


def make_inputs(shape, dtype, device, spread=3.0, ignore_frac=0.3):
    student = (torch.randn(shape) * spread).to(dtype).to(device)
    teacher = (torch.randn(shape) * spread).to(dtype).to(device)
    labels = torch.randint(0, shape[-1], shape[:-1])
    labels[torch.rand(shape[:-1]) < ignore_frac] = -100
    return student, teacher, labels.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_reference(backend, dtype, reduction, divergence):
    device = require(backend)
    student, teacher, labels = make_inputs((5, 37), dtype, device)
    check(backend, student, teacher, labels, temperature=2.0, divergence=divergence,
          beta=beta_for(divergence), hard_weight=0.25, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (3, 5, 129), (2, 1000)])
def test_shapes_and_temperatures(backend, divergence, shape):
    device = require(backend)
    student, teacher, _ = make_inputs(shape, torch.float32, device)
    for temperature, scale in ((1.0, True), (4.5, False)):
        check(backend, student, teacher, None, temperature=temperature, divergence=divergence,
              beta=beta_for(divergence), scale_by_temperature_squared=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_teacher_vocabulary(backend, divergence):
    """-inf teacher logits: p_t = 0 there. Reverse KL is then +inf (as in the reference)."""
    device = require(backend)
    student, teacher, labels = make_inputs((4, 50), torch.float32, device)
    teacher[:, ::3] = -math.inf
    options = dict(divergence=divergence, beta=beta_for(divergence), hard_weight=0.2)
    if divergence == "reverse_kl":
        loss = kdops.distill_loss(student, teacher, labels, backend=backend, **options)
        assert loss.item() == math.inf or (labels == -100).all()
        return
    check(backend, student, teacher, labels, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits(backend, divergence):
    device = require(backend)
    student, teacher, labels = make_inputs((3, 40), torch.float32, device, spread=1e4)
    grad_tol = huge_logits_grad_tol(divergence, float((student - teacher).abs().max()))
    check(backend, student, teacher, labels, grad_tol=grad_tol, temperature=1.0, divergence=divergence,
          beta=beta_for(divergence), hard_weight=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    device = require(backend)
    wide = torch.randn(6, 2, 90, device=device)
    student = wide.transpose(0, 1)[..., 5:66]  # leading dims permuted, rows strided
    teacher = torch.randn(61, 2, 6, device=device).permute(1, 2, 0)  # elements strided
    labels = torch.randint(0, 61, (2, 6), device=device).t().t()
    check(backend, student, teacher, labels, divergence="jsd", hard_weight=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    device = require(backend)
    student, teacher, _ = make_inputs((4, 33), torch.float32, device)
    labels = torch.full((4,), -7, device=device)
    loss, grad = check(backend, student, teacher, labels, ignore_index=-7, hard_weight=0.5,
                       reduction=reduction)
    assert not loss.isnan().any() and (loss == 0).all()
    assert (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, reduction):
    device = require(backend)
    student = torch.randn(0, 11, device=device, requires_grad=True)
    loss = kdops.distill_loss(student, torch.randn(0, 11, device=device), backend=backend, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert loss.sum().item() == 0
    loss.sum().backward()
    assert student.grad.shape == (0, 11)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_float64(backend, divergence):
    device = require(backend)
    student, teacher, labels = make_inputs((3, 9), torch.float64, device, spread=1.5)
    student.requires_grad_(True)

    def f(s):
        return kdops.distill_loss(s, teacher, labels, divergence=divergence, beta=beta_for(divergence),
                                  hard_weight=0.3, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(f, (student,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(backend):
    device = require(backend)
    student, teacher, _ = make_inputs((3, 17), torch.float32, device)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    kdops.distill_loss(student, teacher, backend=backend).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_with_retained_graph(backend):
    """The saved gradient is scaled in place only when the graph is not kept for another pass."""
    device = require(backend)
    student, teacher, _ = make_inputs((3, 17), torch.float32, device)
    student.requires_grad_(True)
    loss = kdops.distill_loss(student, teacher, backend=backend)
    (first,) = torch.autograd.grad(loss * 3, student, retain_graph=True)
    (second,) = torch.autograd.grad(loss, student)
    assert_close(first, 3 * second, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_call(backend):
    device = require(backend)
    student, teacher, labels = make_inputs((3, 17), torch.float32, device)
    with torch.no_grad():
        loss = kdops.distill_loss(student.requires_grad_(True), teacher, labels, backend=backend)
    ref = reference.distill_loss(student.double(), teacher.double(), labels)
    assert_close(loss, ref, LOSS_TOL[torch.float32])


def test_matches_torch_kl_div():
    """The textbook Hinton loss: F.kl_div(log_softmax(s/T), softmax(t/T)) * T^2, batchmean."""
    student, teacher, _ = make_inputs((8, 100), torch.float64, "cpu")
    T = 3.0
    expected = F.kl_div(F.log_softmax(student / T, -1), F.softmax(teacher / T, -1), reduction="batchmean") * T * T
    for backend in ("torch", "cpu"):
        if kdops.available_backends()[backend].available:
            got = kdops.distill_loss(student, teacher, temperature=T, backend=backend)
            assert_close(got, expected, LOSS_TOL[torch.float64])


def test_module_wrapper_matches_function():
    student, teacher, labels = make_inputs((4, 3, 20), torch.float32, "cpu")
    crit = kdops.nn.DistillLoss(temperature=3.0, divergence="jsd", beta=0.4, hard_weight=0.5)
    assert "jsd" in repr(crit)
    expected = kdops.distill_loss(student, teacher, labels, temperature=3.0, divergence="jsd", beta=0.4, hard_weight=0.5)
    assert torch.equal(crit(student, teacher, labels), expected)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    device = require(backend)
    student, teacher, labels = make_inputs((4, 23), torch.float32, device)
    student.requires_grad_(True)
    for labels_arg, hard in ((labels, 0.3), (None, 0.0)):
        options = DistillOptions(2, 2.0, 0.5, hard, (1 - hard) * 4.0, -100)
        args = (student, teacher, labels_arg, None, True, backend, *options)
        torch.library.opcheck(torch.ops.kdops.distill_rows.default, args)


@pytest.mark.parametrize("backend", [None, "cpu", "torch"])
def test_torch_compile_fullgraph(backend):
    if backend == "cpu":
        require("cpu")
    student, teacher, labels = make_inputs((6, 40), torch.float32, "cpu")

    def step(s, t, y):
        return kdops.distill_loss(s, t, y, temperature=2.0, divergence="jsd", hard_weight=0.2, backend=backend) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if backend is None else "inductor")
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    eager = step(s1, teacher, labels)
    got = compiled(s2, teacher, labels)
    eager.backward()
    got.backward()
    assert_close(got, eager, LOSS_TOL[torch.float32])
    assert_close(s2.grad, s1.grad, GRAD_TOL[torch.float32])


def _bad_calls():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    return [
        ((s, t.long()), {}, TypeError, "teacher_logits"),
        ((s.long(), t), {}, TypeError, "student_logits"),
        (([1.0], t), {}, TypeError, "student_logits"),
        ((s, t.double()), {}, TypeError, "teacher_logits"),
        ((s, torch.randn(4, 11)), {}, ValueError, "teacher_logits"),
        ((s, torch.randn(10)), {}, ValueError, "(4, 10)"),
        ((torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, "V >= 1"),
        ((s, t, torch.randint(0, 10, (5,))), {}, ValueError, "labels"),
        ((s, t, y.float()), {}, TypeError, "labels"),
        ((s, t), dict(temperature=0.0), ValueError, "temperature"),
        ((s, t), dict(temperature=-1.0), ValueError, "temperature"),
        ((s, t), dict(temperature=math.nan), ValueError, "temperature"),
        ((s, t), dict(divergence="kl"), ValueError, "divergence"),
        ((s, t), dict(divergence="jsd", beta=0.0), ValueError, "beta"),
        ((s, t), dict(divergence="jsd", beta=1.0), ValueError, "beta"),
        ((s, t), dict(divergence="skew_forward_kl", beta=1.0), ValueError, "beta"),
        ((s, t), dict(divergence="skew_reverse_kl", beta=-0.1), ValueError, "beta"),
        ((s, t), dict(reduction="batchmean"), ValueError, "reduction"),
        ((s, t), dict(backend="tpu"), ValueError, "backend"),
        ((s, t), dict(backend="cuda"), RuntimeError, "backend='cuda'"),
        ((s, t), dict(hard_weight=0.5), ValueError, "labels"),
        ((s, t, y), dict(hard_weight=1.5), ValueError, "hard_weight"),
        ((s, t, torch.tensor([0, 1, 10, 2])), dict(hard_weight=0.5), ValueError, "labels"),
        ((s, t, torch.tensor([0, 1, -3, 2])), dict(hard_weight=0.5), ValueError, "labels"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    args, kwargs, error, text = _bad_calls()[case]
    with pytest.raises(error, match=__import__("re").escape(text)):
        kdops.distill_loss(*args, **kwargs)


def test_different_devices_is_an_error():
    s = torch.randn(2, 5)
    t = torch.randn(2, 5, device="meta")
    with pytest.raises(ValueError, match="teacher_logits is on meta"):
        kdops.distill_loss(s, t)
