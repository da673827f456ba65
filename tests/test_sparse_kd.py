"""kdops.sparse_distill_loss / fused_linear_sparse_distill_loss (teacher top-k) on every backend
available here against the float64 reference, and against distill_loss in the dense case K = V."""
import math
import re

import pytest
import torch

import kdops
from kdops import reference
from kdops.divergences import DIVERGENCES
from kdops.ops._common import DistillOptions

from conftest import BACKENDS, DTYPES, GRAD_TOL, LOSS_TOL, assert_close, beta_for, require

REST = ["ignore", "bucket"]


def supported(divergence, rest_mass):
    return not (rest_mass == "ignore" and divergence == "reverse_kl")


def make(shape, k, dtype, device, spread=3.0, temperature=2.0, ignore_frac=0.3):
    """Student logits, the teacher's top-k log-probabilities (float32) and indices, labels."""
    student = (torch.randn(shape) * spread).to(dtype).to(device)
    teacher = torch.randn(shape) * spread
    values, indices = torch.log_softmax(teacher / temperature, -1).topk(k, dim=-1)
    labels = torch.randint(0, shape[-1], shape[:-1])
    labels[torch.rand(shape[:-1]) < ignore_frac] = -100
    return student, values.to(device), indices.to(device), labels.to(device)


def check(backend, student, values, indices, labels=None, **options):
    s = student.detach().clone().requires_grad_(True)
    loss = kdops.sparse_distill_loss(s, values, indices, labels, backend=backend, **options)
    loss.sum().backward()
    s64 = student.detach().double().requires_grad_(True)
    ref = reference.sparse_distill_loss(s64, values.double(), indices, labels, **options)
    ref.sum().backward()
    dtype = student.dtype
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert s.grad.dtype == dtype and s.grad.shape == student.shape
    assert_close(loss, ref, LOSS_TOL[dtype], scale=float(ref.detach().abs().max()) if ref.numel() else 1.0)
    slack = rest_bucket_slack(student, values, indices, options)
    if slack is None:
        assert_close(s.grad, s64.grad, GRAD_TOL[dtype])
    else:
        rtol, atol = GRAD_TOL[dtype]
        grad, grad64 = s.grad.double().cpu(), s64.grad.cpu()
        err, allowed = (grad - grad64).abs(), rtol * grad64.abs() + atol + slack
        bad = ~(err <= allowed) & ~(grad.isnan() & grad64.isnan())
        assert not bad.any(), f"{int(bad.sum())} gradient elements off; worst excess {float((err - allowed).max())}"
    return loss.detach(), s.grad


def rest_bucket_slack(student, values, indices, options):
    """With ``rest_mass="bucket"``, each rest mass 1 - sum_k p_k is formed in float32: k roundings
    of 2^-24 against a rest that may be small, so each rest element's gradient (up to p_s) is off
    by up to p_s * 2 k 2^-24 / rest (found: k = 30 of V = 40, a rest near 1e-3, 1.3e-6 off;
    KDOPS_TEST_SEED=122572965). That bound, elementwise on the CPU, or None (other modes, float64)."""
    if options.get("rest_mass", "ignore") != "bucket" or student.dtype == torch.float64:
        return None
    p_s = torch.softmax(student.detach().double().cpu() / options.get("temperature", 1.0), -1)
    rest_s = 1 - p_s.gather(-1, indices.cpu().long()).sum(-1, keepdim=True)
    rest_t = 1 - values.detach().double().cpu().exp().sum(-1, keepdim=True)
    rest = torch.minimum(rest_s, rest_t).clamp_min(2.0**-24)
    return p_s * 2 * indices.shape[-1] * 2.0**-24 / rest


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rest_mass", REST)
def test_matches_reference(backend, dtype, rest_mass):
    device = require(backend)
    student, values, indices, labels = make((5, 37), 8, dtype, device)
    check(backend, student, values, indices, labels, temperature=2.0, rest_mass=rest_mass, hard_weight=0.25)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("rest_mass", REST)
def test_every_divergence(backend, divergence, rest_mass):
    device = require(backend)
    student, values, indices, labels = make((4, 29), 5, torch.float32, device)
    options = dict(temperature=2.0, divergence=divergence, beta=beta_for(divergence), rest_mass=rest_mass)
    if not supported(divergence, rest_mass):
        with pytest.raises(ValueError, match="rest_mass='bucket'"):
            kdops.sparse_distill_loss(student, values, indices, backend=backend, **options)
        return
    check(backend, student, values, indices, labels, reduction="none", **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("rest_mass", REST)
def test_dense_case_equals_distill_loss(backend, divergence, rest_mass):
    """K = V: the teacher's full distribution; both rest options are distill_loss."""
    if not supported(divergence, rest_mass):
        pytest.skip("refused (tested above)")
    device = require(backend)
    T = 1.5
    student = torch.randn(6, 23, device=device) * 3
    teacher = torch.randn(6, 23, device=device) * 3
    labels = torch.tensor([0, 5, -100, 22, 7, 1], device=device)
    values, indices = torch.log_softmax(teacher / T, -1).topk(23, dim=-1)
    options = dict(temperature=T, divergence=divergence, beta=beta_for(divergence), hard_weight=0.2)
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    sparse = kdops.sparse_distill_loss(s1, values, indices, labels, rest_mass=rest_mass, backend=backend, **options)
    dense = kdops.distill_loss(s2, teacher, labels, backend=backend, **options)
    sparse.backward()
    dense.backward()
    assert_close(sparse, dense, LOSS_TOL[torch.float32], scale=float(dense.detach().abs()))
    assert_close(s1.grad, s2.grad, GRAD_TOL[torch.float32])


def test_ignore_is_distill_loss_on_masked_teacher():
    """rest_mass="ignore" is distill_loss against teacher logits T * lt at the top-k, -inf elsewhere."""
    T = 2.0
    student, values, indices, _ = make((4, 30), 6, torch.float64, "cpu", temperature=T)
    masked = torch.full((4, 30), -math.inf, dtype=torch.float64).scatter(-1, indices, T * values.double())
    for divergence in ("forward_kl", "jsd", "tvd"):
        got = reference.sparse_distill_loss(student, values, indices, temperature=T, divergence=divergence)
        want = reference.distill_loss(student, masked, temperature=T, divergence=divergence)
        assert_close(got, want, LOSS_TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,k", [((1, 1), 1), ((3, 5, 129), 7), ((2, 300), 100), ((2, 40), 30)])
def test_shapes(backend, shape, k):
    device = require(backend)
    student, values, indices, labels = make(shape, k, torch.float32, device)
    for rest_mass in REST:
        check(backend, student, values, indices, labels, temperature=1.0, rest_mass=rest_mass,
              hard_weight=0.5, scale_by_temperature_squared=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rest_mass", REST)
def test_masked_and_extreme_logits(backend, rest_mass):
    """-inf among the teacher's top-k (p_t = 0 there) and student logits of size 1e4."""
    device = require(backend)
    student, values, indices, labels = make((4, 50), 6, torch.float32, device)
    values[:, -2:] = -math.inf
    check(backend, student, values, indices, labels, rest_mass=rest_mass, divergence="jsd", beta=0.3, hard_weight=0.2)
    student, values, indices, labels = make((3, 40), 5, torch.float32, device, spread=1e4)
    check(backend, student, values, indices, labels, rest_mass=rest_mass, temperature=1.0, hard_weight=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    device = require(backend)
    student, values, indices, _ = make((4, 33), 4, torch.float32, device)
    labels = torch.full((4,), -7, device=device)
    loss, grad = check(backend, student, values, indices, labels, ignore_index=-7, hard_weight=0.5,
                       reduction=reduction)
    assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("rest_mass", REST)
def test_gradcheck_float64(backend, rest_mass):
    device = require(backend)
    student, values, indices, labels = make((3, 9), 4, torch.float64, device, spread=1.5)
    student.requires_grad_(True)
    # (the Triton interpreter is slow: one divergence there)
    for divergence in ("forward_kl",) if backend == "triton" else ("forward_kl", "skew_reverse_kl"):
        def f(s):
            return kdops.sparse_distill_loss(s, values, indices, labels, divergence=divergence, beta=0.3,
                                             rest_mass=rest_mass, hard_weight=0.3, reduction="none", backend=backend)

        assert torch.autograd.gradcheck(f, (student,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_half_precision_cache_values(backend):
    """bf16 / fp16 top-k values (as stored in a cache) with a float32 student, int32 indices."""
    device = require(backend)
    student, values, indices, labels = make((4, 31), 6, torch.float32, device)
    for dtype in (torch.bfloat16, torch.float16):
        v = values.to(dtype)
        got = kdops.sparse_distill_loss(student, v, indices.int(), labels, rest_mass="bucket", backend=backend)
        want = reference.sparse_distill_loss(student.double(), v.double(), indices, labels, rest_mass="bucket")
        assert_close(got, want, LOSS_TOL[torch.float32])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    device = require(backend)
    student, values, indices, labels = make((4, 23), 5, torch.float32, device)
    student.requires_grad_(True)
    for labels_arg, hard, bucket in ((labels, 0.3, True), (None, 0.0, False)):
        options = DistillOptions(2, 2.0, 0.5, hard, (1 - hard) * 4.0, -100, rest_bucket=bucket,
                                 student_logit_scale=0.7, student_softcap=2.5 if bucket else None)
        for divisor, reduced in ((None, False), (torch.tensor(3.0, device=device), True), (None, True)):
            args = (student, values, indices.int(), labels_arg, divisor, reduced, True, backend, *options)
            torch.library.opcheck(torch.ops.kdops.sparse_distill_rows.default, args)
        h, w = (torch.randn(n, 4, device=device, requires_grad=True) for n in (7, 23))
        _, values7, indices7, labels7 = make((7, 23), 5, torch.float32, device)
        for needs in ([True, True, False], [False, False, False]):  # gradients in forward / in backward
            fused = (h, w, None, values7, indices7.int(), None if labels_arg is None else labels7, None, needs, 3,
                     backend, *options)
            torch.library.opcheck(torch.ops.kdops.fused_linear_sparse_distill.default, fused)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_torch_compile_fullgraph(backend):
    student, values, indices, labels = make((6, 40), 6, torch.float32, "cpu")

    def step(s, v, i, y):
        return kdops.sparse_distill_loss(s, v, i, y, temperature=2.0, rest_mass="bucket", hard_weight=0.2,
                                         backend=backend) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    eager = step(s1, values, indices, labels)
    got = compiled(s2, values, indices, labels)
    eager.backward()
    got.backward()
    assert_close(got, eager, LOSS_TOL[torch.float32])
    assert_close(s2.grad, s1.grad, GRAD_TOL[torch.float32])


def test_module_wrapper_matches_function():
    student, values, indices, labels = make((2, 3, 20), 4, torch.float32, "cpu")
    crit = kdops.nn.SparseDistillLoss(temperature=2.0, rest_mass="bucket", hard_weight=0.5)
    assert "bucket" in repr(crit)
    expected = kdops.sparse_distill_loss(student, values, indices, labels, temperature=2.0, rest_mass="bucket",
                                         hard_weight=0.5)
    assert torch.equal(crit(student, values, indices, labels), expected)


# ---- fused linear ----


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_linear_matches_reference(backend, reduction):
    device = require(backend)
    n, hidden, vocab, k = 10, 8, 37, 6
    g = lambda *shape: (torch.randn(*shape) / shape[-1] ** 0.25).to(device)
    h, w, b = g(n, hidden), g(vocab, hidden), g(vocab)
    _, values, indices, labels = make((n, vocab), k, torch.float32, device)
    params = [x.clone().requires_grad_(True) for x in (h, w, b)]
    options = dict(temperature=2.0, rest_mass="bucket", hard_weight=0.3, reduction=reduction)
    out = kdops.fused_linear_sparse_distill_loss(params[0], params[1], values, indices, labels, student_bias=params[2],
                                                 chunk_size=3, backend=backend, **options)
    cotangent = torch.rand(out.shape, dtype=torch.float64, device=device) + 0.5
    out.backward(cotangent.to(out.dtype))
    ref_params = [x.double().requires_grad_(True) for x in (h, w, b)]
    ref = reference.fused_linear_sparse_distill_loss(ref_params[0], ref_params[1], values.double(), indices, labels,
                                                     student_bias=ref_params[2], **options)
    ref.backward(cotangent)
    assert_close(out, ref, LOSS_TOL[torch.float32], scale=float(ref.detach().abs().max()))
    for p, r in zip(params, ref_params):
        assert_close(p.grad, r.grad, GRAD_TOL[torch.float32], scale=float(r.grad.abs().max()))


def test_fused_linear_bfloat16_without_bias():
    require("cpu")
    h = torch.randn(7, 16).bfloat16()
    w = (torch.randn(41, 16) / 4).bfloat16()
    _, values, indices, labels = make((7, 41), 8, torch.float32, "cpu")
    hp, wp = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = kdops.fused_linear_sparse_distill_loss(hp, wp, values, indices, labels, chunk_size=4, backend="cpu")
    out.backward()
    hr, wr = h.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = reference.fused_linear_sparse_distill_loss(hr, wr, values.double(), indices, labels)
    ref.backward()
    assert hp.grad.dtype == torch.bfloat16 and wp.grad.dtype == torch.bfloat16
    assert_close(out, ref, (2e-2, 1e-3))
    assert_close(hp.grad, hr.grad, (5e-2, 5e-3), scale=float(hr.grad.abs().max()))
    assert_close(wp.grad, wr.grad, (5e-2, 5e-3), scale=float(wr.grad.abs().max()))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_torch_compile_fullgraph(reduction):
    h, w, b = torch.randn(10, 8), torch.randn(37, 8), torch.randn(37)
    _, values, indices, labels = make((10, 37), 5, torch.float32, "cpu")

    def step(h, w, b):
        return kdops.fused_linear_sparse_distill_loss(h, w, values, indices, labels, student_bias=b, hard_weight=0.2,
                                                      rest_mass="bucket", reduction=reduction, chunk_size=3).sum()

    eager = [x.clone().requires_grad_(True) for x in (h, w, b)]
    traced = [x.clone().requires_grad_(True) for x in (h, w, b)]
    want = step(*eager)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*traced)
    want.backward()
    got.backward()
    assert_close(got, want, LOSS_TOL[torch.float32])
    for p, q in zip(traced, eager):
        assert_close(p.grad, q.grad, GRAD_TOL[torch.float32])


# ---- bad input ----


def _bad_calls():
    s = torch.randn(4, 10)
    v, i = torch.log_softmax(torch.randn(4, 10), -1).topk(3, dim=-1)
    y = torch.randint(0, 10, (4,))
    return [
        ((s.long(), v, i), {}, TypeError, "student_logits"),
        ((s, v.long(), i), {}, TypeError, "topk_logprobs"),
        ((s, v, i.float()), {}, TypeError, "topk_indices"),
        ((s, v, [0, 1]), {}, TypeError, "topk_indices"),
        ((s, v[:3], i[:3]), {}, ValueError, "topk_logprobs must have shape"),
        ((s, v, i[:, :2]), {}, ValueError, "topk_indices must have the shape"),
        ((s[:, :2], v, i), {}, ValueError, "1 <= K <= V"),
        ((s, v, i + 8), {}, ValueError, "topk_indices must lie in [0, 10)"),
        ((s, v, i - 5), {}, ValueError, "topk_indices must lie in [0, 10)"),
        ((s, v, i), dict(rest_mass="drop"), ValueError, "rest_mass"),
        ((s, v, i), dict(divergence="reverse_kl"), ValueError, "rest_mass='bucket'"),
        ((s, v, i), dict(divergence="kl"), ValueError, "divergence"),
        ((s, v, i), dict(temperature=0.0), ValueError, "temperature"),
        ((s, v, i), dict(hard_weight=0.5), ValueError, "labels"),
        ((s, v, i, y[:3]), {}, ValueError, "labels"),
        ((s, v, i, torch.tensor([0, 1, 10, 2])), dict(hard_weight=0.5), ValueError, "labels"),
        ((s, v, i), dict(reduction="batchmean"), ValueError, "reduction"),
        ((s, v, i), dict(backend="cuda"), RuntimeError, "backend='cuda'"),
        ((s, v.to("meta"), i), {}, ValueError, "topk_logprobs is on meta"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    args, kwargs, error, text = _bad_calls()[case]
    with pytest.raises(error, match=re.escape(text)):
        kdops.sparse_distill_loss(*args, **kwargs)


def test_fused_linear_bad_input():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    v, i = torch.log_softmax(torch.randn(4, 10), -1).topk(3, dim=-1)
    with pytest.raises(ValueError, match="student_weight must have shape"):
        kdops.fused_linear_sparse_distill_loss(h, torch.randn(10, 7), v, i)
    with pytest.raises(ValueError, match="topk_logprobs must have shape"):
        kdops.fused_linear_sparse_distill_loss(h, w, v[:2], i[:2])
    with pytest.raises(ValueError, match="chunk_size"):
        kdops.fused_linear_sparse_distill_loss(h, w, v, i, chunk_size=0)


# ---- the native CPU kernel (kdops._C): int64 row offsets, out-of-range hard labels ----


def _native_sparse(student, labels, hard_weight, k=4, compute_grad=True, seed=0):
    """kdops.backends.native.sparse_kd.sparse_kd_forward on a top-k of random teacher logits."""
    from kdops.backends.native import sparse_kd as native

    g = torch.Generator().manual_seed(seed)
    n, v = student.shape
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64).float()
    values, indices = teacher.log_softmax(-1).topk(k, dim=-1)
    options = DistillOptions(0, 2.0, 0.5, hard_weight, (1 - hard_weight) * 4.0, -100, True)
    return native.sparse_kd_forward(student, values.contiguous(), indices.int().contiguous(), labels, options,
                                    compute_grad)


def test_native_row_offsets_past_2_31():
    """Student rows at r * stride > 2^31 elements (an untouched torch.empty buffer): the same bits
    as compact rows."""
    require("cpu")
    stride, n, v = 2**31 + 5, 2, 37
    buf = torch.empty((n - 1) * stride + v, dtype=torch.bfloat16)
    student = buf.as_strided((n, v), (stride, 1))
    student.copy_(torch.randn(n, v).to(torch.bfloat16))
    labels = torch.tensor([3, 36])
    loss, grad = _native_sparse(student, labels, 0.3)
    ref_loss, ref_grad = _native_sparse(student.clone(), labels, 0.3)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad) and loss.isfinite().all()


@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "loss"])
def test_native_out_of_range_label_gives_a_nan_row(compute_grad):
    """A counted label outside [0, V) with the hard term: NaN loss and gradient row, never read."""
    require("cpu")
    student = torch.randn(3, 11)
    loss, grad = _native_sparse(student, torch.tensor([11, 2, -5]), 0.5, compute_grad=compute_grad)
    assert loss[0].isnan() and loss[2].isnan() and loss[1].isfinite()
    if compute_grad:
        assert grad[0].isnan().all() and grad[2].isnan().all() and grad[1].isfinite().all()


# ---- the student's logit transform (scale, softcap) in the dense-logit kernels ----

STUDENT_TRANSFORMS = [dict(student_softcap=2.5), dict(student_logit_scale=0.6),
                      dict(student_logit_scale=1.4, student_softcap=3.0)]


def check_transformed(backend, student, values, indices, labels, transform, **options):
    """sparse_distill_loss with a student transform against the float64 reference on the
    transformed logits (reference.transform_logits); returns the gradient."""
    s = student.detach().clone().requires_grad_(True)
    loss = kdops.sparse_distill_loss(s, values, indices, labels, backend=backend, **transform, **options)
    cotangent = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    loss.backward(cotangent.to(loss.dtype).to(loss.device))
    s64 = student.detach().double().cpu().requires_grad_(True)
    z64 = reference.transform_logits(s64, transform.get("student_logit_scale", 1.0), transform.get("student_softcap"))
    ref = reference.sparse_distill_loss(z64, values.double().cpu(), indices.cpu(), None if labels is None else
                                        labels.cpu(), **options)
    ref.backward(cotangent)
    dtype = student.dtype
    assert s.grad.dtype == dtype
    assert_close(loss.cpu(), ref, LOSS_TOL[dtype], scale=float(ref.detach().abs().max()) if ref.numel() else 1.0)
    assert_close(s.grad.cpu(), s64.grad, GRAD_TOL[dtype], scale=float(s64.grad.abs().max()))
    return s.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", STUDENT_TRANSFORMS)
@pytest.mark.parametrize("rest_mass", REST)
def test_student_transform(backend, transform, rest_mass):
    """Logits reaching |z| ~ 8 (beyond the softcaps), a hard term on the transformed logits,
    ignored rows, a vocabulary not a multiple of the interpreter's blocks."""
    device = require(backend)
    student, values, indices, labels = make((9, 131), 7, torch.float32, device, spread=4.0)
    check_transformed(backend, student, values, indices, labels, transform, temperature=1.5, rest_mass=rest_mass,
                      hard_weight=0.3, divergence="jsd", beta=0.4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_student_transform_dtypes_and_reductions(backend, dtype):
    device = require(backend)
    if dtype == torch.float64 and backend == "cuda":
        pytest.skip("the CUDA kernels take no float64")
    student, values, indices, labels = make((6, 77), 5, dtype, device)
    for reduction in ("mean", "none"):
        check_transformed(backend, student, values, indices, labels, STUDENT_TRANSFORMS[2], temperature=2.0,
                          rest_mass="bucket", reduction=reduction, hard_weight=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_transform_minus_inf_logits(backend):
    """-inf student logits: a scale keeps them -inf (probability 0); a softcap maps them to -c
    (tanh(-inf) = -1) with slope 0, as the reference: a zero gradient there either way."""
    device = require(backend)
    student, values, indices, labels = make((5, 60), 6, torch.float32, device)
    student[:, 40:47] = -math.inf
    keep = torch.ones(60, dtype=torch.bool)
    keep[40:47] = False
    topk = torch.where(keep, torch.randn(5, 60), -math.inf).log_softmax(-1).topk(6, dim=-1)  # top-k avoids the -inf
    labels = torch.where((labels >= 40) & (labels < 47), 3, labels)  # a label at -inf: an infinite CE
    values, indices = topk.values.to(device), topk.indices.to(device)
    for transform in (dict(student_logit_scale=0.5), dict(student_softcap=2.0)):
        grad = check_transformed(backend, student, values, indices, labels, transform, rest_mass="bucket",
                                 hard_weight=0.2, divergence="reverse_kl")
        assert (grad[:, 40:47] == 0).all() and grad.isfinite().all()


@pytest.mark.parametrize("name,value,error", [
    ("student_logit_scale", 0.0, ValueError), ("student_logit_scale", -2.0, ValueError),
    ("student_softcap", -1.0, ValueError), ("student_softcap", math.inf, ValueError),
    ("student_logit_scale", "2", TypeError),
])
def test_bad_student_transform_names_the_argument(name, value, error):
    student, values, indices, labels = make((3, 20), 4, torch.float32, "cpu")
    for backend in [b for b in ("torch", "cpu", "triton") if kdops.available_backends()[b].available]:
        with pytest.raises(error, match=name):
            kdops.sparse_distill_loss(student, values, indices, labels, backend=backend, **{name: value})
        with pytest.raises(error, match=name):
            kdops.fused_linear_sparse_distill_loss(torch.randn(3, 4), torch.randn(20, 4), values, indices, labels,
                                                   backend=backend, **{name: value})


def test_no_teacher_transform():
    """The teacher's top-k are log-probabilities: a teacher transform is not an option."""
    student, values, indices, labels = make((3, 20), 4, torch.float32, "cpu")
    with pytest.raises(TypeError, match="teacher_softcap"):
        kdops.sparse_distill_loss(student, values, indices, labels, teacher_softcap=2.0)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_bf16_gradient_is_rounded_once(backend):
    """The mean's 1 / count is folded into the kernel's float32 gradient before its one rounding
    to bf16: the error against float64 is that of one rounding (plus float32 noise), not two.
    (Not the Triton interpreter: its float32 -> bf16 conversion truncates, where a GPU rounds to
    nearest; measured: 518 of 1024 random values differ from torch's rounding.)"""
    device = require(backend)
    student, values, indices, labels = make((39, 1001), 16, torch.bfloat16, device)
    s = student.clone().requires_grad_(True)
    kdops.sparse_distill_loss(s, values, indices, labels, rest_mass="bucket", hard_weight=0.3,
                              backend=backend).backward()
    s64 = student.double().cpu().requires_grad_(True)
    reference.sparse_distill_loss(s64, values.double().cpu(), indices.cpu(), labels.cpu(), rest_mass="bucket",
                                  hard_weight=0.3).backward()
    one_rounding = (s64.grad.to(torch.bfloat16).double() - s64.grad).abs().max()
    error = (s.grad.cpu().double() - s64.grad).abs().max()
    assert error <= one_rounding * 1.01 + 1e-6 * s64.grad.abs().max(), (error, one_rounding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction,normalizer", [("mean", None), ("mean", 300), ("sum", None), ("none", None)])
def test_backward_holds_one_gradient(dtype, reduction, normalizer):
    """torch's CPU allocator: the sparse loss's backward allocates no second gradient-sized tensor
    in any dtype, and forward plus backward peak at one gradient (the kernel's, which becomes
    ``.grad``; a mean's 1 / count is in it already)."""
    from kdops.bench.measure import torch_cpu_peak_bytes

    require("cpu")
    student, values, indices, labels = make((256, 4099), 32, dtype, "cpu")
    grad_bytes = student.numel() * student.element_size()
    options = dict(rest_mass="bucket", hard_weight=0.2, reduction=reduction, normalizer=normalizer, backend="cpu")
    cotangent = torch.rand(256, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.0)
    s = student.clone().requires_grad_(True)
    loss = kdops.sparse_distill_loss(s, values, indices, labels, **options)
    backward = torch_cpu_peak_bytes(lambda: loss.backward(cotangent.to(loss.dtype)))
    assert s.grad.dtype == dtype
    assert backward <= 0.3 * grad_bytes, f"backward peak {backward} B for a {grad_bytes} B gradient"
    s2 = student.clone().requires_grad_(True)

    def step():
        kdops.sparse_distill_loss(s2, values, indices, labels, **options).backward(cotangent.to(loss.dtype))

    total = torch_cpu_peak_bytes(step)
    assert total <= 1.3 * grad_bytes, f"forward + backward peak {total} B for a {grad_bytes} B gradient"
    torch.testing.assert_close(s2.grad, s.grad, rtol=0, atol=0)
