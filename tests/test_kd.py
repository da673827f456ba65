"""kdops.distill_loss on every backend available here against the float64 reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import kdops
from kdops import reference
from kdops._codes import KD_DIVERGENCES
from kdops.divergences import DIVERGENCES
from kdops.ops._common import DistillOptions

from conftest import BACKENDS, DTYPES, GRAD_TOL, LOSS_TOL, assert_close, beta_for, huge_logits_grad_tol, require


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
@pytest.mark.parametrize("divergence", KD_DIVERGENCES)
def test_matches_reference(backend, dtype, reduction, divergence):
    device = require(backend)
    student, teacher, labels = make_inputs((5, 37), dtype, device)
    check(backend, student, teacher, labels, temperature=2.0, divergence=divergence,
          beta=beta_for(divergence), hard_weight=0.25, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", KD_DIVERGENCES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (3, 5, 129), (2, 1000)])
def test_shapes_and_temperatures(backend, divergence, shape):
    device = require(backend)
    student, teacher, _ = make_inputs(shape, torch.float32, device)
    for temperature, scale in ((1.0, True), (4.5, False)):
        check(backend, student, teacher, None, temperature=temperature, divergence=divergence,
              beta=beta_for(divergence), scale_by_temperature_squared=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", KD_DIVERGENCES)
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
@pytest.mark.parametrize("divergence", KD_DIVERGENCES)
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
@pytest.mark.parametrize("divergence", KD_DIVERGENCES)
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
    expected = kdops.distill_loss(student, teacher, labels, temperature=3.0, divergence="jsd", beta=0.4,
                                  hard_weight=0.5)
    assert torch.equal(crit(student, teacher, labels), expected)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("divergence", ["jsd", "hard"])
def test_opcheck(backend, divergence):
    device = require(backend)
    student, teacher, labels = make_inputs((4, 23), torch.float32, device)
    student.requires_grad_(True)
    for labels_arg, hard in ((labels, 0.3), (None, 0.0)):
        options = DistillOptions(KD_DIVERGENCES.index(divergence), 2.0, 0.5, hard, (1 - hard) * 4.0, -100)
        for divisor, reduced in ((None, False), (torch.tensor(3.0, device=device), True)):
            args = (student, teacher, labels_arg, None, divisor, reduced, True, backend, *options)
            torch.library.opcheck(torch.ops.kdops.distill_rows.default, args)


@pytest.mark.parametrize("backend", [None, "cpu", "torch"])
@pytest.mark.parametrize("divergence", ["jsd", "hard"])
def test_torch_compile_fullgraph(backend, divergence):
    if backend == "cpu":
        require("cpu")
    student, teacher, labels = make_inputs((6, 40), torch.float32, "cpu")

    def step(s, t, y):
        return kdops.distill_loss(s, t, y, temperature=2.0, divergence=divergence, hard_weight=0.2,
                                  backend=backend) * 2

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


# ---- DeiT's hard target (divergence="hard"): CE against the teacher's argmax, fused in every kernel ----


def _hard_inputs(shape, dtype, device, ties=False):
    """Student / teacher logits and labels (a third ignored); ``ties``: each row's teacher max
    duplicated at two or three columns (also across Triton blocks of 64 and CPU chunks)."""
    student, teacher, labels = make_inputs(shape, dtype, device)
    if ties:
        v = shape[-1]
        flat = teacher.reshape(-1, v)
        top = float(flat.abs().max()) + 1.0
        for r in range(flat.shape[0]):
            cols = torch.randperm(v)[:3]
            flat[r, cols] = top
    return student, teacher, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 1000), (2, 2053)])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_hard_target_vocab_sizes_and_ties(backend, shape, ties):
    """Odd V (one element, a partial block, several blocks / chunks); with ties, the target is
    the lowest of the maximal columns (the gradient there is soft_weight / T * (p_s - 1) < 0)."""
    device = require(backend)
    student, teacher, labels = _hard_inputs(shape, torch.float32, device, ties=ties and shape[-1] > 1)
    labels = labels.clamp(min=0)  # every row counts
    for temperature in (1.0, 3.0):
        _, grad = check(backend, student, teacher, labels, temperature=temperature, divergence="hard",
                        hard_weight=0.0, reduction="sum")
        first = (teacher == teacher.max(-1, keepdim=True).values).int().argmax(-1)  # lowest maximal index
        assert (grad.argmin(-1) == first).all() or shape[-1] == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_hard_target_softcap_saturation_ties(backend, dtype):
    """A softcapped teacher: c * tanh(z / c) saturates to c exactly (in float32 from |z| / c ~ 9,
    in float64 from ~19): columns 5, 40 and 90 of every row tie at c, the lowest (5) wins, whatever
    their raw order. Columns 60 (z = 10 c: below c in float64, equal to c in float32) make a
    float32-only tie, resolved to 5 too in the float32 kernels."""
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernels take float32, float16 or bfloat16")
    device = require(backend)
    cap = 4.0
    student, teacher, labels = _hard_inputs((3, 130), dtype, device)
    teacher[:, [5, 40, 90]] = torch.tensor([25.0, 30.0, 40.0]).to(dtype).to(device) * cap
    teacher[:, 60] = 10.0 * cap
    s = student.detach().clone().requires_grad_(True)
    options = dict(temperature=2.0, divergence="hard", hard_weight=0.3, teacher_softcap=cap, student_softcap=7.0)
    loss = kdops.distill_loss(s, teacher, labels, backend=backend, reduction="none", **options)
    loss.sum().backward()
    # the reference on the teacher transformed as the kernels do (in the compute dtype) and the student in float64
    t_seen = reference.transform_logits(teacher, 1.0, cap).double()
    s64 = student.detach().double().requires_grad_(True)
    ref = reference.distill_loss(reference.transform_logits(s64, 1.0, 7.0), t_seen, labels, reduction="none",
                                 temperature=2.0, divergence="hard", hard_weight=0.3)
    ref.sum().backward()
    assert (t_seen.argmax(-1) == 5).all()
    assert_close(loss, ref, LOSS_TOL[dtype], scale=float(ref.detach().abs().max()))
    assert_close(s.grad, s64.grad, GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_target_infinite_and_nan_teacher_logits(backend):
    """-inf teacher logits are never the target (unless the whole row is -inf: target 0, as
    torch.argmax); a NaN teacher logit makes its row's loss and gradient NaN, the others intact."""
    device = require(backend)
    student, teacher, labels = _hard_inputs((5, 130), torch.float32, device)
    labels = labels.clamp(min=0)
    teacher[:, ::3] = -math.inf
    teacher[1] = -math.inf
    check(backend, student, teacher, labels, divergence="hard", hard_weight=0.2, reduction="none")
    teacher[3, 77] = teacher[4, 0] = math.nan
    labels[4] = -100  # an ignored row stays 0 with a zero gradient
    s = student.detach().clone().requires_grad_(True)
    loss = kdops.distill_loss(s, teacher, labels, divergence="hard", hard_weight=0.2, reduction="none",
                              backend=backend)
    loss.sum().backward()
    s64 = student.detach().double().requires_grad_(True)
    ref = reference.distill_loss(s64, teacher.double(), labels, divergence="hard", hard_weight=0.2,
                                 reduction="none")
    ref.sum().backward()
    assert loss[3].isnan() and ref[3].isnan() and s.grad[3].isnan().all() and s64.grad[3].isnan().all()
    assert loss[4] == 0 and ref[4] == 0 and (s.grad[4] == 0).all() and (s64.grad[4] == 0).all()
    keep = [0, 1, 2]
    assert_close(loss[keep], ref[keep].detach(), LOSS_TOL[torch.float32], scale=float(ref[keep].abs().max()))
    assert_close(s.grad[keep], s64.grad[keep], GRAD_TOL[torch.float32])


def test_hard_target_is_refused_by_the_other_families():
    """divergence="hard" is distill_loss's only: the sparse, lm_head and relation losses name it."""
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    s = torch.randn(4, 10)
    top = torch.log_softmax(torch.randn(4, 10), -1).topk(3)
    calls = [
        lambda: kdops.sparse_distill_loss(s, top.values, top.indices, divergence="hard"),
        lambda: kdops.fused_linear_distill_loss(h, w, h, w, divergence="hard"),
        lambda: kdops.attention_relation_loss(*(torch.randn(1, 2, 5, 4) for _ in range(4)), divergence="hard"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="divergence='hard'.*distill_loss only"):
            call()


# ---- the native CPU kernel (kdops._C through kdops.backends.native.kd) against the float64 reference ----

from kdops.backends.native import _module as _native_module  # noqa: E402
from kdops.backends.native import kd as _native  # noqa: E402

_native_cpu = pytest.mark.skipif(not _native_module.cpu_status()[0], reason=_native_module.cpu_status()[1])


def _native_kd(student, teacher, labels, divergence, temperature, beta, hard_weight, soft_weight, ignore_index,
               compute_grad, teacher_log_weights=None):
    options = DistillOptions(divergence, temperature, beta, hard_weight, soft_weight, ignore_index)
    return _native.kd_forward(student, teacher, labels, options, compute_grad, teacher_log_weights)


NATIVE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# (loss rtol, grad tolerance relative to the largest |grad| of the row block)
NATIVE_TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1e-5, 8e-3),
    torch.float16: (1e-5, 1e-3),
}


def _native_logits(n, v, dtype, scale=3.0, seed=0, width=None):
    """[n, v] logits, as a slice of an [n, width] tensor when width is given (row stride width)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width or v, generator=g, dtype=torch.float64) * scale
    return x.to(dtype)[:, :v]


def _native_reference(student, teacher, labels, div, temperature, beta, hard_weight, soft_weight):
    s = student.double().requires_grad_()
    rows, _ = reference.weighted_row_loss(
        s, teacher.double(), labels, temperature=temperature, divergence=KD_DIVERGENCES[div],
        beta=beta, hard_weight=hard_weight, soft_weight=soft_weight, ignore_index=-100,
    )
    (grad,) = torch.autograd.grad(rows.sum(), s)
    return rows.detach(), grad


def _native_check(student, teacher, labels=None, div=0, temperature=2.0, beta=0.3, hard_weight=0.0,
           soft_weight=None):
    soft_weight = (1.0 - hard_weight) * temperature**2 if soft_weight is None else soft_weight
    args = (student, teacher, labels, div, temperature, beta, hard_weight, soft_weight, -100)
    loss, grad = _native_kd(*args, True)
    loss_only, empty = _native_kd(*args, False)
    n, v = student.shape
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert loss.shape == (n,) and grad.shape == (n, v) and grad.dtype == student.dtype
    assert grad.is_contiguous() and empty.numel() == 0
    ref_loss, ref_grad = _native_reference(student, teacher, labels, div, temperature, beta, hard_weight,
                                    soft_weight)
    rtol, gtol = NATIVE_TOLERANCES[student.dtype]
    torch.testing.assert_close(loss_only, loss, rtol=rtol, atol=rtol * 1e-2)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=rtol * 1e-2)
    scale = max(ref_grad.abs().max().item(), 1e-30)
    atol = gtol * scale
    if student.dtype == torch.float32 and KD_DIVERGENCES[div] not in ("forward_kl", "tvd", "hard"):
        # a log-ratio enters the gradient: float32 log-probabilities of size A = (max|s| + max|t|) / T
        # round by 2^-24 A each (the two rows, their log-normalisers, the ratio's mean S); the
        # gradient multiplies them by soft_weight / T. Four such roundings, twice: 8 * 2^-24 A *
        # soft_weight / T (the kernels sum in the order of the machine's vector width: on AVX-512,
        # reverse KL at V = 5003, T = 0.7 reached 0.32 of it, over gtol * scale)
        size = (student.abs().max().item() + teacher.abs().max().item()) / temperature
        atol = max(atol, 8 * 2.0**-24 * size * soft_weight / temperature)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=gtol, atol=atol)
    return loss, grad


@_native_cpu
@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
@pytest.mark.parametrize("div", range(len(KD_DIVERGENCES)), ids=KD_DIVERGENCES)
def test_native_matches_reference(div, dtype):
    n, v = 7, 1000 + 7
    _native_check(_native_logits(n, v, dtype, seed=1), _native_logits(n, v, dtype, seed=2), div=div)


@_native_cpu
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("div", range(len(KD_DIVERGENCES)), ids=KD_DIVERGENCES)
def test_native_labels_ignore_index_and_hard_weight(div, dtype, monkeypatch):
    monkeypatch.setenv("KDOPS_POISON_OUTPUTS", "1")  # every output element must be written
    n, v = 6, 3001
    labels = torch.tensor([0, -100, v - 1, 17, -100, 5])
    loss, grad = _native_check(_native_logits(n, v, dtype, seed=3), _native_logits(n, v, dtype, seed=4), labels,
                        div=div, beta=0.6, hard_weight=0.4)
    assert torch.all(loss[labels == -100] == 0) and torch.all(grad[labels == -100] == 0)


@_native_cpu
@pytest.mark.parametrize("v", [1, 3, 5000 + 3], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("div", range(len(KD_DIVERGENCES)), ids=KD_DIVERGENCES)
def test_native_vocab_sizes(div, v):
    labels = torch.tensor([0, v - 1, v // 2])
    _native_check(_native_logits(3, v, torch.float32, seed=5), _native_logits(3, v, torch.float32, seed=6), labels,
           div=div, temperature=0.7, hard_weight=0.25)


@pytest.mark.parametrize("div", [d for d, name in enumerate(DIVERGENCES) if name != "reverse_kl"],
                         ids=lambda d: DIVERGENCES[d])
@_native_cpu
def test_native_masked_teacher_vocabulary(div):
    """-inf teacher logits (a masked vocabulary): p_t = 0 there."""
    n, v = 4, 2049
    teacher = _native_logits(n, v, torch.float32, seed=8).clone()
    teacher[torch.rand(n, v, generator=torch.Generator().manual_seed(9)) < 0.4] = -math.inf
    teacher[:, 2000:] = -math.inf  # also whole chunks of -inf
    _native_check(_native_logits(n, v, torch.float32, seed=7), teacher, div=div, beta=0.5)


@_native_cpu
def test_native_masked_teacher_reverse_kl_is_infinite():
    student = _native_logits(2, 100, torch.float32, seed=10)
    teacher = _native_logits(2, 100, torch.float32).clone()
    teacher[:, :10] = -math.inf
    loss, _ = _native_kd(student, teacher, None, DIVERGENCES.index("reverse_kl"), 2.0, 0.5,
                                0.0, 4.0, -100, True)
    assert torch.all(loss == math.inf)


@_native_cpu
@pytest.mark.parametrize("div", ["reverse_kl", "jsd", "tvd"])
def test_native_masked_student_logits(div):
    """-inf student logits: p_s = 0 there, and so is the gradient. (The reference's autograd is
    NaN there, so its gradient is taken with -1e4 in their place, where p_s is 0 as well.)"""
    n, v = 3, 777
    student = _native_logits(n, v, torch.float32, seed=11).clone()
    student[:, ::5] = -math.inf
    teacher = _native_logits(n, v, torch.float32, seed=12)
    code = DIVERGENCES.index(div)
    args = (None, code, 2.0, 0.5, 0.0, 4.0)
    loss, grad = _native_kd(student, teacher, *args, -100, True)
    ref_loss, _ = _native_reference(student, teacher, *args)
    _, ref_grad = _native_reference(student.nan_to_num(neginf=-1e4), teacher, *args)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    assert torch.all(grad[:, ::5] == 0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


@_native_cpu
@pytest.mark.parametrize("div", range(len(KD_DIVERGENCES)), ids=KD_DIVERGENCES)
def test_native_large_logits(div):
    n, v = 4, 4099
    student = _native_logits(n, v, torch.float32, scale=1e4, seed=13)
    teacher = _native_logits(n, v, torch.float32, scale=1e4, seed=14)
    _native_check(student, teacher, torch.tensor([1, 2, 3, 4]), div=div, temperature=3.0, hard_weight=0.1)


@_native_cpu
@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
def test_native_strided_rows(dtype):
    n, v = 5, 1031
    student = _native_logits(n, v, dtype, seed=15, width=v + 13)
    teacher = _native_logits(n, v, dtype, seed=16, width=2 * v + 1)
    assert student.stride(0) == v + 13 and teacher.stride(0) == 2 * v + 1
    _native_check(student, teacher, torch.tensor([3, -100, 0, 1030, 9]), div=2, hard_weight=0.3)


@_native_cpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_native_half_types_round_like_torch(dtype):
    """16-bit logits are exact in float, so the gradients must round like torch's float ->
    dtype conversion: bit-equal but where the last bits of the float sums (added in another
    order) move a value across a rounding boundary."""
    student, teacher = _native_logits(6, 3000, dtype, seed=17), _native_logits(6, 3000, dtype, seed=18)
    args = (None, 0, 2.0, 0.5, 0.0, 4.0, -100, True)
    loss16, grad16 = _native_kd(student, teacher, *args)
    loss32, grad32 = _native_kd(student.float(), teacher.float(), *args)
    # the two dtypes' rows are summed in float32 in orders that depend on the vector width: twice the
    # random-walk size of a float32 sum of V terms, 2 sqrt(V) 2^-24 (AVX-512: 1.13e-6, 0.17 of it)
    torch.testing.assert_close(loss16, loss32, rtol=2 * 3000**0.5 * 2.0**-24, atol=0)
    assert (grad16.view(torch.int16) == grad32.to(dtype).view(torch.int16)).float().mean() > 0.99
    torch.testing.assert_close(grad16.float(), grad32, rtol=torch.finfo(dtype).eps,
                               atol=1e-5 * grad32.abs().max().item())


@_native_cpu
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "loss"])
def test_native_out_of_range_label_gives_a_nan_row(grad):
    """A counted label outside [0, V) with the hard-label term: that row's loss and gradient are
    NaN (never an out-of-bounds read), the other rows exact; without the hard term it only masks."""
    student, teacher = _native_logits(4, 10, torch.float32), _native_logits(4, 10, torch.float32, seed=1)
    labels = torch.tensor([10, 3, -7, -100])
    loss, g = _native_kd(student, teacher, labels, 0, 1.0, 0.5, 0.5, 0.5, -100, grad)
    assert loss[0].isnan() and loss[2].isnan() and loss[1].isfinite() and loss[3] == 0
    if grad:
        assert g[0].isnan().all() and g[2].isnan().all() and g[1].isfinite().all() and (g[3] == 0).all()
    ok = torch.tensor([1])
    ref_loss, ref_grad = _native_kd(student[ok], teacher[ok], labels[ok], 0, 1.0, 0.5, 0.5, 0.5, -100, True)
    assert torch.equal(loss[1:2], ref_loss) and (not grad or torch.equal(g[1:2], ref_grad))
    soft_only, _ = _native_kd(student, teacher, labels, 0, 1.0, 0.5, 0.0, 1.0, -100, False)
    assert soft_only[:3].isfinite().all() and soft_only[3] == 0


def _huge_rows(n, v, stride, dtype, seed):
    """[n, v] rows r at element offset r * stride of one torch.empty buffer (untouched pages cost
    nothing), filled with random logits, and their compact copy."""
    buf = torch.empty((n - 1) * stride + v, dtype=dtype)
    view = buf.as_strided((n, v), (stride, 1))
    view.copy_(_native_logits(n, v, dtype, seed=seed))
    return view, view.clone()


@_native_cpu
@pytest.mark.parametrize("div", [0, 2, 6], ids=["forward_kl", "jsd", "hard"])
def test_native_row_offsets_past_2_31(div):
    """Row offsets r * stride past 2^31 elements (int64 offsets): the same bits as compact rows."""
    stride = 2**31 + 7
    student, compact_s = _huge_rows(2, 33, stride, torch.bfloat16, seed=20)
    teacher, compact_t = _huge_rows(2, 33, stride, torch.bfloat16, seed=21)
    labels = torch.tensor([5, 32])
    args = (labels, div, 2.0, 0.3, 0.4, 2.4, -100, True)
    loss, grad = _native_kd(student, teacher, *args)
    ref_loss, ref_grad = _native_kd(compact_s, compact_t, *args)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad) and loss.isfinite().all()


@_native_cpu
@pytest.mark.parametrize("div", [2, 6], ids=["jsd", "hard"])
def test_native_teacher_offsets_past_2_31(div):
    """K = 3 teachers whose k stride puts teacher 2 at (K - 1) * k_stride > 2^31 elements."""
    k_stride, n, v = 2**30 + 64, 3, 41
    buf = torch.empty(2 * k_stride + n * v, dtype=torch.bfloat16)
    teacher = buf.as_strided((3, n, v), (k_stride, v, 1))
    teacher.copy_(_native_logits(3 * n, v, torch.bfloat16, seed=22).view(3, n, v))
    student = _native_logits(n, v, torch.bfloat16, seed=23)
    log_w = torch.tensor([0.2, 0.3, 0.5]).log()
    args = (torch.tensor([0, 7, 40]), div, 2.0, 0.5, 0.25, 3.0, -100, True)
    loss, grad = _native_kd(student, teacher, *args, log_w)
    ref_loss, ref_grad = _native_kd(student, teacher.contiguous(), *args, log_w)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad) and loss.isfinite().all()


@_native_cpu
def test_native_empty_batch():
    loss, grad = _native_kd(torch.empty(0, 5), torch.empty(0, 5), None, 0, 2.0, 0.5, 0.0,
                                   4.0, -100, True)
    assert loss.shape == (0,) and grad.shape == (0, 5)


