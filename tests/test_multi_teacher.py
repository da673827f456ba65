"""Multi-teacher distillation (issue 7): ``distill_loss`` / ``fused_linear_distill_loss`` with K
teachers mixed as ``p_t = sum_k w_k softmax(t_k / T)``, on every backend available here, against
the float64 reference."""
import pytest
import torch

import kdops
from kdops import reference
from kdops.divergences import DIVERGENCES
from kdops.ops._common import DistillOptions

from conftest import BACKENDS, GRAD_TOL, KERNEL_BACKENDS, LOSS_TOL, assert_close, beta_for, require


def random_weights(k):
    w = torch.rand(k, dtype=torch.float64) + 0.1
    return w / w.sum()


def make(lead, vocab, k, dtype, device, ignore_frac=0.3):
    """Student ``(*lead, V)``, K teachers ``(K, *lead, V)`` and labels with some ignored rows."""
    student = (torch.randn(*lead, vocab) * 3).to(dtype).to(device)
    teachers = (torch.randn(k, *lead, vocab) * 3).to(dtype).to(device)
    labels = torch.randint(0, vocab, lead)
    labels[torch.rand(lead) < ignore_frac] = -100
    return student, teachers, labels.to(device)


def check(backend, student, teachers, labels, weights, **options):
    """kdops's loss and student gradient against the float64 reference; returns them."""
    s = student.detach().clone().requires_grad_(True)
    loss = kdops.distill_loss(s, teachers, labels, teacher_weights=weights, backend=backend, **options)
    loss.sum().backward()
    s64 = student.detach().double().requires_grad_(True)
    w64 = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    ref = reference.distill_loss(s64, teachers.double(), labels, teacher_weights=w64, **options)
    ref.sum().backward()
    dtype = student.dtype
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert s.grad.dtype == dtype
    assert_close(loss, ref, LOSS_TOL[dtype], scale=float(ref.detach().abs().max()))
    assert_close(s.grad, s64.grad, GRAD_TOL[dtype])
    return loss, s.grad


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, k, divergence):
    device = require(backend)
    student, teachers, labels = make((3,), 37, k, torch.float32, device)
    check(backend, student, teachers, labels, random_weights(k), divergence=divergence,
          beta=beta_for(divergence), hard_weight=0.3, temperature=1.7, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dtypes_odd_shapes(backend, dtype):
    device = require(backend)
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the cuda backend takes no float64")
    # leading shape (2, 3), V = 71 (not a multiple of any block), default uniform weights
    student, teachers, labels = make((2, 3), 71, 3, dtype, device)
    check(backend, student, teachers, labels, None, divergence="jsd", beta=0.4, hard_weight=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_teacher_is_the_single_teacher_path(backend):
    device = require(backend)
    student, teachers, labels = make((4,), 29, 1, torch.float32, device)
    for divergence in ("forward_kl", "skew_reverse_kl"):
        results = []
        for teacher, weights in ((teachers[0], None), (teachers, None), (teachers, [1.0])):
            s = student.clone().requires_grad_(True)
            loss = kdops.distill_loss(s, teacher, labels, teacher_weights=weights, divergence=divergence,
                                      hard_weight=0.4, backend=backend, reduction="none")
            loss.sum().backward()
            results.append((loss, s.grad))
        for loss, grad in results[1:]:
            assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_teacher_logits(backend):
    """-inf logits in one teacher (that teacher gives them probability 0, the mixture does not),
    and a column that every teacher gives probability 0."""
    device = require(backend)
    student, teachers, labels = make((4,), 23, 3, torch.float32, device, ignore_frac=0.0)
    teachers[1, :, :7] = float("-inf")
    teachers[:, 2, 10] = float("-inf")
    weights = [0.25, 0.5, 0.25]
    for divergence in ("forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"):
        loss, grad = check(backend, student, teachers, labels, weights, divergence=divergence,
                           beta=beta_for(divergence), reduction="none")
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # reverse KL: +inf only on the row where the mixture has a zero
    loss = kdops.distill_loss(student, teachers, teacher_weights=weights, divergence="reverse_kl",
                              backend=backend, reduction="none")
    assert torch.isinf(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck_float64(backend):
    device = require(backend)
    student, teachers, labels = make((3,), 9, 3, torch.float64, device)
    student.requires_grad_(True)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    for divergence in ("forward_kl", "jsd"):
        def loss(s):
            return kdops.distill_loss(s, teachers, labels, teacher_weights=weights, divergence=divergence,
                                      hard_weight=0.3, backend=backend, reduction="none")

        assert torch.autograd.gradcheck(loss, (student,))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_strided_teachers_and_zero_weight(backend):
    """Teachers from a (N, K, V) tensor (teacher stride V, row stride K * V); a zero weight drops
    its teacher exactly."""
    device = require(backend)
    stacked = (torch.randn(5, 3, 31) * 3).to(device)
    student = (torch.randn(5, 31) * 3).to(device)
    teachers = stacked.transpose(0, 1)
    check(backend, student, teachers, None, [0.5, 0.2, 0.3])
    mixed = kdops.distill_loss(student, teachers, teacher_weights=[0.0, 0.4, 0.6], backend=backend)
    two = kdops.distill_loss(student, teachers[1:], teacher_weights=[0.4, 0.6], backend=backend)
    assert_close(mixed, two, LOSS_TOL[torch.float32])


def test_teacher_weights_errors():
    student, teachers, _ = make((4,), 10, 3, torch.float32, "cpu")
    bad = [
        ([0.5, 0.5], "3 entries"),
        ([0.5, 0.6, -0.1], ">= 0"),
        ([0.4, 0.4, 0.4], "sum to 1"),
        ([0.5, float("nan"), 0.5], ">= 0"),
        (torch.tensor([[0.2, 0.3, 0.5]]), r"shape \(3,\)"),
        (torch.tensor([0.3, 0.3, 0.3]), "sum to 1"),
    ]
    for weights, message in bad:
        with pytest.raises(ValueError, match=message):
            kdops.distill_loss(student, teachers, teacher_weights=weights)
    with pytest.raises(TypeError, match="teacher_weights"):
        kdops.distill_loss(student, teachers, teacher_weights="abc")
    with pytest.raises(ValueError, match="needs K teachers"):
        kdops.distill_loss(student, teachers[0], teacher_weights=[1.0])
    with pytest.raises(ValueError, match="K >= 1"):
        kdops.distill_loss(student, teachers[:0])
    with pytest.raises(ValueError, match=r"\(K, \.\.\., V\)"):
        kdops.distill_loss(student, teachers[:, :3])
    # within the tolerance: accepted (not normalised)
    kdops.distill_loss(student, teachers, teacher_weights=[1 / 3, 1 / 3, 1 / 3 + 1e-7])


def test_tensor_weights_equal_list_weights_and_modules():
    student, teachers, labels = make((6,), 17, 2, torch.float32, "cpu")
    as_list = kdops.distill_loss(student, teachers, labels, teacher_weights=[0.3, 0.7], hard_weight=0.5)
    # weights are used in float64: a float64 tensor is bit-identical to the list; a float32 tensor holds
    # 0.3 and 0.7 rounded to float32, so it may differ in the last bit of the loss, never more.
    weights_f64 = torch.tensor([0.3, 0.7], dtype=torch.float64)
    as_f64 = kdops.distill_loss(student, teachers, labels, teacher_weights=weights_f64, hard_weight=0.5)
    as_f32 = kdops.distill_loss(student, teachers, labels, teacher_weights=torch.tensor([0.3, 0.7]), hard_weight=0.5)
    module = kdops.nn.DistillLoss(teacher_weights=[0.3, 0.7], hard_weight=0.5)
    assert torch.equal(as_list, as_f64) and torch.equal(as_list, module(student, teachers, labels))
    torch.testing.assert_close(as_f32, as_list, rtol=1e-6, atol=0)


def make_linear(n, hs, hts, vocab, dtype, device, biases):
    g = lambda *shape: torch.randn(*shape, dtype=dtype, device=device)  # noqa: E731
    h, w = g(n, hs), g(vocab, hs) * 0.5
    teachers = [(g(n, ht), g(vocab, ht) * 0.5, g(vocab) if bias else None) for ht, bias in zip(hts, biases)]
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[::3] = -100
    return h, w, teachers, labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_matches_materialised(backend):
    device = require(backend)
    dtype = torch.float64 if backend != "cuda" else torch.float32
    h, w, teachers, labels = make_linear(7, 6, (4, 5, 3), 19, dtype, device, (False, True, False))
    ths, tws, tbs = map(list, zip(*teachers))
    weights = [0.5, 0.2, 0.3]
    options = dict(temperature=2.0, divergence="skew_forward_kl", beta=0.3, hard_weight=0.25)
    for reduction in ("mean", "none"):
        hh, ww = (x.detach().clone().requires_grad_(True) for x in (h, w))
        loss = kdops.fused_linear_distill_loss(hh, ww, ths, tws, labels, teacher_bias=tbs, teacher_weights=weights,
                                               reduction=reduction, chunk_size=3, backend=backend, **options)
        loss.sum().backward()
        h64, w64 = (x.detach().double().clone().requires_grad_(True) for x in (h, w))
        logits = torch.stack([torch.nn.functional.linear(th.double(), tw.double(), None if tb is None else tb.double())
                              for th, tw, tb in teachers])
        ref = reference.distill_loss(h64 @ w64.T, logits, labels,
                                     teacher_weights=torch.tensor(weights, dtype=torch.float64),
                                     reduction=reduction, **options)
        ref.sum().backward()
        tol = LOSS_TOL[dtype] if dtype == torch.float64 else (1e-4, 1e-5)
        assert_close(loss, ref, tol, scale=float(ref.detach().abs().max()))
        assert_close(hh.grad, h64.grad, tol, scale=float(h64.grad.abs().max()))
        assert_close(ww.grad, w64.grad, tol, scale=float(w64.grad.abs().max()))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_fused_linear_one_teacher_list_is_single_teacher(backend):
    device = require(backend)
    h, w, teachers, labels = make_linear(6, 5, (4,), 13, torch.float32, device, (True,))
    (th, tw, tb), = teachers
    single = kdops.fused_linear_distill_loss(h, w, th, tw, labels, teacher_bias=tb, backend=backend)
    listed = kdops.fused_linear_distill_loss(h, w, [th], [tw], labels, teacher_bias=[tb], backend=backend)
    module = kdops.nn.FusedLinearDistillLoss(backend=backend, teacher_weights=[1.0])
    assert torch.equal(single, listed) and torch.equal(single, module(h, w, [th], [tw], labels, None, [tb]))


def test_fused_linear_errors():
    h, w, teachers, labels = make_linear(4, 5, (3, 3), 11, torch.float32, "cpu", (False, False))
    ths, tws, _ = map(list, zip(*teachers))
    with pytest.raises(ValueError, match="same K"):
        kdops.fused_linear_distill_loss(h, w, ths, tws[:1])
    with pytest.raises(TypeError, match="lists/tuples"):
        kdops.fused_linear_distill_loss(h, w, ths, tws[0])
    with pytest.raises(ValueError, match=r"teacher_weight\[1\]"):
        kdops.fused_linear_distill_loss(h, w, ths, [tws[0], tws[1][:5]])
    with pytest.raises(ValueError, match="sum to 1"):
        kdops.fused_linear_distill_loss(h, w, ths, tws, teacher_weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="needs K teachers"):
        kdops.fused_linear_distill_loss(h, w, ths[0], tws[0], teacher_weights=[1.0])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    device = require(backend)
    student, teachers, labels = make((4,), 23, 3, torch.float32, device)
    student.requires_grad_(True)
    log_w = random_weights(3).log().float().to(device)
    options = DistillOptions(2, 2.0, 0.5, 0.3, 2.8, -100)
    args = (student, teachers, labels, log_w, None, False, True, backend, *options)
    torch.library.opcheck(torch.ops.kdops.distill_rows.default, args)
    h, w, lin, labels = make_linear(7, 4, (3, 5), 11, torch.float32, device, (True, False))
    h.requires_grad_(True)
    ths, tws, tbs = map(list, zip(*lin))
    log_w = random_weights(2).log().float().to(device)
    for needs in ([True, False, False], [False, False, False]):  # gradients in forward / in backward
        args = (h, w, None, ths, tws, tbs, log_w, labels, None, needs, 3, False, backend, *options)  # no entropy
        torch.library.opcheck(torch.ops.kdops.fused_linear_multi_distill.default, args)


def test_torch_compile_fullgraph():
    student, teachers, labels = make((6,), 40, 3, torch.float32, "cpu")
    h, w, lin, hl = make_linear(6, 5, (4, 3), 17, torch.float32, "cpu", (False, True))
    ths, tws, tbs = map(list, zip(*lin))

    def step(s, h, w):
        a = kdops.distill_loss(s, teachers, labels, teacher_weights=[0.2, 0.3, 0.5], divergence="jsd", hard_weight=0.2)
        b = kdops.fused_linear_distill_loss(h, w, ths, tws, hl, teacher_bias=tbs, teacher_weights=[0.6, 0.4],
                                            chunk_size=4)
        return a + b

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inputs = [x.clone().requires_grad_(True) for x in (student, h, w)]
    eager_inputs = [x.clone().requires_grad_(True) for x in (student, h, w)]
    got, expected = compiled(*inputs), step(*eager_inputs)
    got.backward()
    expected.backward()
    assert_close(got, expected, LOSS_TOL[torch.float32])
    for a, b in zip(inputs, eager_inputs):
        assert_close(a.grad, b.grad, GRAD_TOL[torch.float32])


def _clear_mixture(lead, vocab, k, dtype, device, weights, temperature):
    """``make``'s inputs whose mixture argmax (float64) leads the runner-up by > 1e-3 in every
    row, so that float32 rounding cannot move it."""
    w64 = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    for _ in range(50):
        student, teachers, labels = make(lead, vocab, k, dtype, device)
        log_pt = reference.teacher_log_probs(teachers.double(), temperature, w64, student.dim())
        if vocab == 1:
            return student, teachers, labels
        top = log_pt.topk(2, -1).values
        if ((top[..., 0] - top[..., 1]) > 1e-3).all():
            return student, teachers, labels
    raise AssertionError("no well-separated mixture drawn")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 1031])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_target_of_the_mixture(backend, vocab, dtype):
    """DeiT's hard target with K = 3 weighted teachers: the argmax of the mixture's log p_t (which
    need not be any teacher's argmax); ignored rows; every reduction."""
    device = require(backend)
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the cuda backend takes no float64")
    weights = random_weights(3)
    student, teachers, labels = _clear_mixture((2, 3), vocab, 3, dtype, device, weights, 1.5)
    for reduction in ("none", "mean"):
        check(backend, student, teachers, labels, weights, divergence="hard", hard_weight=0.3, temperature=1.5,
              reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_target_of_the_mixture_ties_and_nan(backend):
    """Three columns of every row where each teacher holds its own maximum (equal columns across
    the teachers: the mixture's log p_t ties exactly there): the lowest index wins; a NaN in one
    teacher makes that row NaN."""
    device = require(backend)
    weights = [0.5, 0.2, 0.3]
    student, teachers, labels = make((4,), 200, 3, torch.float32, device)
    labels = labels.clamp(min=0)
    top = teachers.amax(-1, keepdim=True) + 2.0  # [K, N, 1]
    first = torch.empty(4, dtype=torch.long)
    for r in range(4):
        cols = torch.randperm(200)[:3]
        teachers[:, r, cols] = top[:, r]
        first[r] = cols.min()
    _, grad = check(backend, student, teachers, labels, weights, divergence="hard", temperature=1.0,
                    reduction="sum")
    assert (grad.argmin(-1).cpu() == first).all()
    teachers[2, 1, 13] = float("nan")
    loss = kdops.distill_loss(student, teachers, labels, teacher_weights=weights, divergence="hard",
                              reduction="none", backend=backend)
    assert loss[1].isnan() and loss[[0, 2, 3]].isfinite().all()
