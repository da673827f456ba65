"""Model-side logit transforms (logit scale, final-logit softcapping) and the student entropy in
the chunked lm_head path, against the float64 reference on materialised transformed logits."""
import math

import pytest
import torch

import kdops
from kdops import reference
from kdops.divergences import DIVERGENCES

from conftest import BACKENDS, GRAD_TOL, LOSS_TOL, assert_close, require

FUSED_LINEAR_BACKENDS = ["torch", "cpu", "triton"]


def _tensors(n, hs, ht, v, dtype, device, spread=6.0):
    """Hidden states and weights whose logits reach |z| ~ spread (beyond a softcap of 2-3)."""
    g = lambda *shape: (torch.randn(*shape) * spread / math.sqrt(shape[-1])).to(dtype).to(device)  # noqa: E731
    h, th = torch.randn(n, hs).to(dtype).to(device), torch.randn(n, ht).to(dtype).to(device)
    w, tw, b, tb = g(v, hs), g(v, ht), g(v) / 4, g(v) / 4
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < 0.3] = -100
    return h, w, b, th, tw, tb, labels.to(device)


TRANSFORMS = [
    dict(student_softcap=2.5),
    dict(teacher_softcap=3.0, teacher_logit_scale=0.5),
    dict(student_logit_scale=0.25, teacher_logit_scale=1.7),
    dict(student_logit_scale=1.3, student_softcap=3.0, teacher_softcap=2.0),
]


def _reference(h, w, b, th, tw, tb, labels, **options):
    """float64 reference: the transformed logits materialised, then reference.distill_loss."""
    st = {k: options.pop(k) for k in ("student_logit_scale", "student_softcap") if k in options}
    tt = {k: options.pop(k) for k in ("teacher_logit_scale", "teacher_softcap") if k in options}
    s = reference.transform_logits(torch.nn.functional.linear(h, w, b), st.get("student_logit_scale", 1.0),
                                   st.get("student_softcap"))
    t = reference.transform_logits(torch.nn.functional.linear(th, tw, tb), tt.get("teacher_logit_scale", 1.0),
                                   tt.get("teacher_softcap"))
    return reference.distill_loss(s, t, labels, **options), s


def _check(backend, dtype, transform, divergence="forward_kl", reduction="mean", chunk_size=7, **options):
    device = require(backend)
    h, w, b, th, tw, tb, labels = _tensors(37, 24, 40, 301, dtype, device)
    params = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
    beta = 0.3 if divergence in ("jsd", "skew_forward_kl", "skew_reverse_kl") else 0.5
    kw = dict(temperature=1.7, divergence=divergence, beta=beta, reduction=reduction, **options)
    out = kdops.fused_linear_distill_loss(params[0], params[1], th, tw, labels, student_bias=params[2],
                                          teacher_bias=tb, chunk_size=chunk_size, backend=backend,
                                          **transform, **kw)
    cotangent = torch.rand(out.shape, dtype=torch.float64) + 0.5
    out.backward(cotangent.to(out.dtype).to(out.device))
    ref_params = [x.detach().double().cpu().requires_grad_(True) for x in (h, w, b)]
    ref, _ = _reference(*ref_params, th.double().cpu(), tw.double().cpu(), tb.double().cpu(), labels.cpu(),
                        **transform, **kw)
    ref.backward(cotangent)
    loss_tol = LOSS_TOL[dtype] if dtype in (torch.float32, torch.float64) else (2e-2, 1e-3)
    assert_close(out.cpu(), ref, loss_tol, scale=float(ref.detach().abs().max()))
    for name, p, r in zip(("hidden", "weight", "bias"), params, ref_params):
        assert p.grad.dtype == dtype, name
        assert_close(p.grad.cpu(), r.grad, GRAD_TOL[dtype], scale=float(r.grad.abs().max()))


@pytest.mark.parametrize("backend", FUSED_LINEAR_BACKENDS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transforms_every_backend(backend, transform):
    _check(backend, torch.float32, transform, hard_weight=0.3)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_transforms_every_divergence(divergence):
    _check("cpu", torch.float32, TRANSFORMS[3], divergence=divergence)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_transforms_dtypes(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 takes the same chunked path as cpu")
    _check(backend, dtype, TRANSFORMS[3], divergence="jsd")


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_transforms_reductions_and_normalizer(reduction):
    _check("cpu", torch.float32, TRANSFORMS[0], reduction=reduction, hard_weight=0.2)
    _check("cpu", torch.float32, TRANSFORMS[1], normalizer=torch.tensor(50.0))


def test_transforms_gradcheck_float64():
    h, w, b, th, tw, tb, labels = _tensors(6, 5, 7, 11, torch.float64, "cpu", spread=4.0)

    def loss(h, w, b):
        return kdops.fused_linear_distill_loss(h, w, th, tw, labels, student_bias=b, teacher_bias=tb, chunk_size=4,
                                               divergence="reverse_kl", temperature=1.3, backend="cpu",
                                               **TRANSFORMS[3])

    assert torch.autograd.gradcheck(loss, [x.requires_grad_(True) for x in (h, w, b)])


def test_transforms_multi_teacher():
    h, w, b, th, tw, tb, labels = _tensors(19, 8, 12, 97, torch.float64, "cpu")
    th2, tw2 = torch.randn(19, 6, dtype=torch.float64), torch.randn(97, 6, dtype=torch.float64)
    mix = torch.tensor([0.6, 0.4], dtype=torch.float64)
    kw = dict(temperature=2.0, teacher_weights=mix, student_softcap=2.0, teacher_softcap=2.5,
              teacher_logit_scale=0.8, backend="cpu")
    got = kdops.fused_linear_distill_loss(h, w, [th, th2], [tw, tw2], labels, student_bias=b, **kw)
    s = reference.transform_logits(torch.nn.functional.linear(h, w, b), 1.0, 2.0)
    t = torch.stack([reference.transform_logits(x @ y.T, 0.8, 2.5) for x, y in ((th, tw), (th2, tw2))])
    expected = reference.distill_loss(s, t, labels, temperature=2.0, teacher_weights=mix)
    assert_close(got, expected, LOSS_TOL[torch.float64])


@pytest.mark.parametrize("backend", FUSED_LINEAR_BACKENDS)
def test_entropy(backend):
    """return_entropy: the sum over counted rows of H(softmax(z' / T)) of the student's
    transformed logits, without gradient; the loss is unchanged."""
    device = require(backend)
    h, w, b, th, tw, tb, labels = _tensors(29, 16, 16, 203, torch.float32, device)
    kw = dict(student_bias=b, teacher_bias=tb, temperature=1.5, student_softcap=2.0, chunk_size=8, backend=backend)
    loss, entropy = kdops.fused_linear_distill_loss(h, w, th, tw, labels, return_entropy=True, **kw)
    assert entropy.shape == () and not entropy.requires_grad and entropy.dtype == torch.float32
    _, s = _reference(h.double().cpu(), w.double().cpu(), b.double().cpu(), th.double().cpu(), tw.double().cpu(),
                      tb.double().cpu(), labels.cpu(), student_softcap=2.0)
    counted = labels.cpu() != -100
    expected = reference.entropy(s, temperature=1.5)[counted].sum()
    assert_close(entropy.cpu(), expected, (2e-5, 1e-5), scale=float(expected))
    # return_entropy takes the chunked path, the loss alone the blockwise kernel where there is one:
    # float32 row sums in another order, a few ulp apart
    assert_close(loss, kdops.fused_linear_distill_loss(h, w, th, tw, labels, **kw), (32 * 2.0**-24, 0))
    rows, row_entropy = kdops.fused_linear_distill_loss(h, w, th, tw, labels, reduction="none", return_entropy=True,
                                                        **kw)
    assert row_entropy.shape == rows.shape == labels.shape
    assert_close(row_entropy.cpu(), torch.where(counted, reference.entropy(s, temperature=1.5), 0.0), (2e-5, 1e-5))


def test_module_takes_the_transforms():
    h, w, b, th, tw, tb, labels = _tensors(9, 8, 8, 31, torch.float32, "cpu")
    crit = kdops.nn.FusedLinearDistillLoss(temperature=2.0, student_softcap=2.0, teacher_logit_scale=0.5)
    expected = kdops.fused_linear_distill_loss(h, w, th, tw, labels, temperature=2.0, student_softcap=2.0,
                                               teacher_logit_scale=0.5)
    assert_close(crit(h, w, th, tw, labels), expected, (0, 0))


@pytest.mark.parametrize("name,value,error", [
    ("student_softcap", 0.0, ValueError), ("teacher_softcap", -1.0, ValueError),
    ("student_softcap", math.inf, ValueError), ("teacher_logit_scale", math.nan, ValueError),
    ("student_logit_scale", "2", TypeError),
])
def test_bad_transforms_name_the_argument(name, value, error):
    h, w, b, th, tw, tb, labels = _tensors(4, 8, 8, 31, torch.float32, "cpu")
    for backend in ("cpu", "torch"):
        with pytest.raises(error, match=name):
            kdops.fused_linear_distill_loss(h, w, th, tw, labels, backend=backend, **{name: value})


# ---- kdops.distill_loss: the transforms in the dense kd kernels (Triton, C++, CUDA, torch) ----

def _dense_reference(student, teacher, labels, transform, **options):
    """float64 reference: reference.distill_loss of the transformed float64 logits; (loss, d loss / d student)."""
    s = student.detach().double().cpu().requires_grad_(True)
    zs = reference.transform_logits(s, transform.get("student_logit_scale", 1.0), transform.get("student_softcap"))
    zt = reference.transform_logits(teacher.double().cpu(), transform.get("teacher_logit_scale", 1.0),
                                    transform.get("teacher_softcap"))
    loss = reference.distill_loss(zs, zt, None if labels is None else labels.cpu(), **options)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach(), grad


def _dense_check(backend, dtype, transform, shape=(5, 7, 67), n_teachers=0, divergence="forward_kl",
                 reduction="mean", spread=6.0, edit=None, hard_weight=0.3, **options):
    """distill_loss with ``transform`` on ``backend`` against the float64 reference (logits past the
    softcaps, ignored rows, a hard-label term); ``edit(student, teacher)`` changes the inputs."""
    device = require(backend)
    student = torch.randn(shape, dtype=torch.float64) * spread
    teacher = torch.randn(((n_teachers,) if n_teachers else ()) + shape, dtype=torch.float64) * spread
    if edit is not None:
        edit(student, teacher)
    student, teacher = student.to(dtype), teacher.to(dtype)  # the reference sees the rounded inputs
    labels = torch.randint(0, shape[-1], shape[:-1])
    labels[torch.rand(shape[:-1]) < 0.3] = -100
    beta = 0.3 if divergence in ("jsd", "skew_forward_kl", "skew_reverse_kl") else 0.5
    kw = dict(temperature=1.7, divergence=divergence, beta=beta, hard_weight=hard_weight, reduction=reduction,
              **options)
    s = student.to(device).requires_grad_(True)
    out = kdops.distill_loss(s, teacher.to(device), labels.to(device), backend=backend, **transform, **kw)
    cotangent = torch.rand(out.shape, dtype=torch.float64) + 0.5
    out.backward(cotangent.to(out.dtype).to(device))
    ref, ref_grad = _dense_reference(student, teacher, labels, transform, **kw)
    ref_grad = ref_grad * (cotangent.reshape(cotangent.shape + (1,)) if reduction == "none" else cotangent)
    assert s.grad.dtype == dtype and s.grad.shape == student.shape
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    assert_close(out.cpu(), ref, LOSS_TOL[dtype], scale=scale)
    assert_close(s.grad.cpu(), ref_grad, GRAD_TOL[dtype], scale=float(ref_grad.abs().max()))
    return s.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: ",".join(f"{k}={v}" for k, v in t.items()))
def test_distill_loss_transforms(backend, dtype, transform):
    _dense_check(backend, dtype, transform)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_distill_loss_transforms_every_divergence(backend, divergence, reduction):
    _dense_check(backend, torch.float32, TRANSFORMS[3], divergence=divergence, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_teachers", [1, 3])
def test_distill_loss_transforms_multi_teacher(backend, dtype, n_teachers):
    """Every teacher is transformed before the mixture (K = 1 in the (K, ..., V) form too)."""
    weights = [1.0] if n_teachers == 1 else [0.2, 0.5, 0.3]
    _dense_check(backend, dtype, dict(teacher_softcap=2.0, teacher_logit_scale=1.5, student_logit_scale=0.7),
                 n_teachers=n_teachers, teacher_weights=weights)
    _dense_check(backend, dtype, TRANSFORMS[0], n_teachers=n_teachers, teacher_weights=weights,
                 divergence="jsd", shape=(9, 301))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_distill_loss_transforms_of_minus_inf(backend, divergence):
    """-inf logits: under a scale they stay -inf; under a softcap c they become -c (tanh(-inf) =
    -1, slope 0: a zero gradient there, a finite hard-label term), as in the reference."""
    def edit(student, teacher):
        student[..., ::5] = -math.inf
        teacher[..., 1::4] = -math.inf
        teacher[..., ::5] = -math.inf

    capped = _dense_check(backend, torch.float32, dict(student_softcap=3.0, teacher_softcap=2.5), edit=edit,
                          divergence=divergence)
    assert (capped[..., ::5] == 0).all()

    def edit_teacher(student, teacher):  # a -inf student logit under a scale: the reference's own tests
        teacher[..., 1::4] = -math.inf

    scaled = _dense_check(backend, torch.float32, dict(student_logit_scale=0.5, teacher_logit_scale=2.0),
                          edit=edit_teacher, divergence=divergence)
    assert scaled.isfinite().all()


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_distill_loss_transforms_gradcheck_float64(backend):
    device = require(backend)
    s = (torch.randn(4, 13, dtype=torch.float64) * 4).to(device).requires_grad_(True)
    t = (torch.randn(4, 13, dtype=torch.float64) * 4).to(device)
    labels = torch.tensor([3, -100, 12, 0], device=device)
    for divergence in ("forward_kl", "jsd"):
        torch.autograd.gradcheck(
            lambda x: kdops.distill_loss(x, t, labels, temperature=1.5, divergence=divergence, hard_weight=0.4,
                                         student_logit_scale=1.3, student_softcap=2.5, teacher_softcap=3.0,
                                         backend=backend), (s,))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_distill_loss_transforms_opcheck(backend):
    from kdops.ops._common import DistillOptions

    require(backend)
    student, teacher = torch.randn(4, 23) * 4, torch.randn(4, 23) * 4
    labels = torch.tensor([1, -100, 22, 5])
    student.requires_grad_(True)
    options = DistillOptions(2, 2.0, 0.5, 0.3, 2.8, -100, False, 0.7, 2.5, 1.2, 3.0)
    for divisor, reduced in ((None, False), (torch.tensor(3.0), True), (None, True)):
        args = (student, teacher, labels, None, divisor, reduced, True, backend, *options)
        torch.library.opcheck(torch.ops.kdops.distill_rows.default, args)


@pytest.mark.parametrize("name,value,error", [
    ("student_softcap", 0.0, ValueError), ("teacher_softcap", -1.0, ValueError),
    ("student_softcap", math.inf, ValueError), ("teacher_logit_scale", math.nan, ValueError),
    ("student_logit_scale", -1.0, ValueError), ("teacher_logit_scale", 0.0, ValueError),
    ("student_logit_scale", "2", TypeError), ("teacher_softcap", "3", TypeError),
])
def test_distill_loss_bad_transforms_name_the_argument(name, value, error):
    s, t = torch.randn(4, 11), torch.randn(4, 11)
    for backend in BACKENDS:
        if kdops.available_backends()[backend].available:
            with pytest.raises(error, match=name):
                kdops.distill_loss(s, t, backend=backend, **{name: value})


def test_torch_compile_fullgraph_with_transforms():
    h, w, b, th, tw, tb, labels = _tensors(8, 6, 5, 21, torch.float32, "cpu")

    def step(h, w):
        return kdops.fused_linear_distill_loss(h, w, th, tw, labels, temperature=2.0, chunk_size=3,
                                               student_softcap=2.0, teacher_logit_scale=0.5, return_entropy=True)

    h.requires_grad_(True)
    w.requires_grad_(True)
    eager = step(h, w)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(h, w)
    for a, e in zip(compiled, eager):
        assert_close(a, e, (1e-6, 1e-7))
    grads = torch.autograd.grad(compiled[0], (h, w))
    for g, e in zip(grads, torch.autograd.grad(eager[0], (h, w))):
        assert_close(g, e, (1e-6, 1e-7))


@pytest.mark.parametrize("backend", FUSED_LINEAR_BACKENDS)
@pytest.mark.parametrize("rest_mass", ["ignore", "bucket"])
def test_sparse_student_transform(backend, rest_mass):
    """fused_linear_sparse_distill_loss with the student's softcap and scale (a cached teacher
    is log-probabilities already) against the float64 reference."""
    device = require(backend)
    h, w, b, th, tw, tb, labels = _tensors(23, 16, 16, 157, torch.float32, device)
    topk = torch.log_softmax(torch.randn(23, 157) * 3, dim=-1).topk(12, dim=-1)
    values, indices = topk.values.to(device), topk.indices.to(device)
    kw = dict(temperature=1.5, rest_mass=rest_mass, hard_weight=0.2, student_logit_scale=0.8, student_softcap=2.5)
    params = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
    got = kdops.fused_linear_sparse_distill_loss(params[0], params[1], values, indices, labels, student_bias=params[2],
                                                 chunk_size=6, backend=backend, **kw)
    got.backward()
    ref_params = [x.detach().double().cpu().requires_grad_(True) for x in (h, w, b)]
    ref = reference.fused_linear_sparse_distill_loss(ref_params[0], ref_params[1], values.double().cpu(),
                                                     indices.cpu(), labels.cpu(), student_bias=ref_params[2], **kw)
    ref.backward()
    assert_close(got.cpu(), ref, LOSS_TOL[torch.float32], scale=float(ref.detach().abs()))
    for p, r in zip(params, ref_params):
        assert_close(p.grad.cpu(), r.grad, GRAD_TOL[torch.float32], scale=float(r.grad.abs().max()))
