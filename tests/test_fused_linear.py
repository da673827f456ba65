"""kdops.fused_linear_distill_loss against distill_loss on materialised logits and the float64
reference: values and the gradients to hidden states, weight and bias."""
import pytest
import torch

import kdops
from kdops import reference
from kdops.divergences import DIVERGENCES
from kdops.ops._common import DistillOptions

from conftest import BACKENDS, GRAD_TOL, LOSS_TOL, assert_close, beta_for, require

# the blockwise kernel's cases reach it on a GPU too (the automatic choice takes it off a GPU only)
pytestmark = pytest.mark.usefixtures("blockwise_everywhere")


def make(n, hs, ht, v, dtype, device, bias=True, ignore_frac=0.3):
    g = lambda *shape: (torch.randn(*shape) / shape[-1] ** 0.25).to(dtype).to(device)
    h, w, th, tw = g(n, hs), g(v, hs), g(n, ht), g(v, ht)
    b = g(v) if bias else None
    tb = g(v) if bias else None
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < ignore_frac] = -100
    return h, w, b, th, tw, tb, labels.to(device)


def compare(backend, tensors, chunk_size=None, dtype_tol=None, **options):
    h, w, b, th, tw, tb, labels = tensors
    params = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (h, w, b)]
    out = kdops.fused_linear_distill_loss(params[0], params[1], th, tw, labels, student_bias=params[2],
                                          teacher_bias=tb, chunk_size=chunk_size, backend=backend, **options)
    cotangent = torch.rand(out.shape, dtype=torch.float64, device=out.device) + 0.5  # row weights for reduction="none"
    out.backward(cotangent.to(out.dtype))
    ref_params = [x.detach().double().requires_grad_(True) if x is not None else None for x in (h, w, b)]
    ref = reference.fused_linear_distill_loss(
        ref_params[0], ref_params[1], th.double(), tw.double(), labels, student_bias=ref_params[2],
        teacher_bias=None if tb is None else tb.double(), **options)
    ref.backward(cotangent)
    dtype = h.dtype
    loss_tol = LOSS_TOL[dtype] if dtype in (torch.float32, torch.float64) else (2e-2, 1e-3)
    assert_close(out, ref, loss_tol, scale=float(ref.detach().abs().max()) if ref.numel() else 1.0)
    for p, r in zip(params, ref_params):
        if p is not None:
            assert p.grad.dtype == p.dtype
            tol = GRAD_TOL[dtype] if dtype in (torch.float32, torch.float64) else (5e-2, 5e-3)
            assert_close(p.grad, r.grad, tol, scale=float(r.grad.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence(backend, divergence):
    device = require(backend)
    tensors = make(11, 8, 6, 37, torch.float32, device)
    compare(backend, tensors, chunk_size=4, temperature=2.0, divergence=divergence,
            beta=beta_for(divergence), hard_weight=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 3, 64, None])
def test_reductions_and_chunks(backend, reduction, chunk_size):
    device = require(backend)
    tensors = make(10, 5, 9, 23, torch.float32, device)
    compare(backend, tensors, chunk_size=chunk_size, reduction=reduction, temperature=3.0, hard_weight=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes_without_bias(backend, dtype):
    device = require(backend)
    if backend != "torch" and dtype == torch.float64 and backend == "cuda":
        pytest.skip("the CUDA kernels take no float64")
    tensors = make(9, 16, 12, 41, dtype, device, bias=False)
    compare(backend, tensors, chunk_size=4, divergence="reverse_kl", temperature=1.5)


# The blockwise Triton kernel (interpreter blocks: BM = BV = BK = 16): N, V, Hs, Ht not multiples
# of the blocks and Hs != Ht, a third of the rows ignored, each dtype with its bias / reduction.
BLOCKWISE_CASES = {  # dtype, bias, reduction, hard_weight
    "fp32-bias-mean-hard": (torch.float32, True, "mean", 0.3),
    "bf16-none-hard": (torch.bfloat16, False, "none", 0.3),
    "fp16-bias-sum": (torch.float16, True, "sum", 0.0),
}


@pytest.mark.parametrize("case", list(BLOCKWISE_CASES))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_blockwise_masks(divergence, case):
    device = require("triton")
    dtype, bias, reduction, hard_weight = BLOCKWISE_CASES[case]
    tensors = make(37, 20, 18, 53, dtype, device, bias=bias)
    compare("triton", tensors, temperature=1.7, divergence=divergence, beta=beta_for(divergence),
            hard_weight=hard_weight, reduction=reduction)


def test_blockwise_strides_teacher_dtype_and_frozen_hidden():
    """Transposed weight views, a float32 teacher for a bfloat16 student, a gradient to the
    weight and bias only, and no labels (every row counts)."""
    device = require("triton")
    h, w, b, th, tw, tb, _ = make(19, 17, 33, 40, torch.bfloat16, device)
    w = w.t().contiguous().t().requires_grad_(True)  # strides (1, V)
    b.requires_grad_(True)
    th, tw = th.float(), tw.float().t().contiguous().t()
    options = dict(temperature=2.0, divergence="jsd", beta=0.4)
    loss = kdops.fused_linear_distill_loss(h, w, th, tw, student_bias=b, teacher_bias=tb.float(),
                                           backend="triton", **options)
    loss.backward()
    w64, b64 = (x.detach().double().requires_grad_(True) for x in (w, b))
    ref = reference.fused_linear_distill_loss(h.double(), w64, th.double(), tw.double(), student_bias=b64,
                                              teacher_bias=tb.double(), **options)
    ref.backward()
    assert_close(loss, ref, (2e-2, 1e-3))
    for p, r in ((w, w64), (b, b64)):
        assert p.grad.dtype == torch.bfloat16
        assert_close(p.grad, r.grad, (5e-2, 5e-3), scale=float(r.grad.abs().max()))


def test_triton_takes_the_blockwise_kernel(monkeypatch):
    """The triton backend does not take the chunked path for float32; ignored rows get exactly
    zero losses and gradients."""
    device = require("triton")
    from kdops.ops import fused_linear

    def chunked(*args, **kwargs):
        raise AssertionError("the chunked path ran")

    monkeypatch.setattr(fused_linear, "lm_head_rows", chunked)
    h, w, b, th, tw, tb, labels = make(20, 16, 16, 32, torch.float32, device)
    h.requires_grad_(True)
    for reduction in ("mean", "none"):
        h.grad = None
        loss = kdops.fused_linear_distill_loss(h, w, th, tw, labels, hard_weight=0.5, reduction=reduction,
                                               backend="triton")
        loss.sum().backward()
        assert (h.grad[labels == -100] == 0).all()
        if reduction == "none":
            assert (loss[labels == -100] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_all_rows_ignored_and_frozen_weight(backend):
    device = require(backend)
    h, w, b, th, tw, tb, _ = make(6, 4, 4, 13, torch.float32, device)
    labels = torch.full((6,), -100, device=device)
    h.requires_grad_(True)
    loss = kdops.fused_linear_distill_loss(h, w, th, tw, labels, hard_weight=0.5, backend=backend)
    loss.backward()
    assert loss.item() == 0 and (h.grad == 0).all()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_float64(backend):
    device = require(backend)
    h, w, b, th, tw, tb, labels = make(5, 3, 4, 7, torch.float64, device)
    def f(h, w, b):
        return kdops.fused_linear_distill_loss(h, w, th, tw, labels, student_bias=b, teacher_bias=tb,
                                               divergence="skew_reverse_kl", beta=0.2, hard_weight=0.4,
                                               reduction="none", chunk_size=2, backend=backend)
    inputs = tuple(x.requires_grad_(True) for x in (h, w, b))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_leading_dims_and_module():
    h, w, b, th, tw, tb, labels = make(12, 6, 5, 19, torch.float32, "cpu")
    crit = kdops.nn.FusedLinearDistillLoss(temperature=2.0, hard_weight=0.2, chunk_size=5)
    got = crit(h.view(3, 4, 6), w, th.view(3, 4, 5), tw, labels.view(3, 4), b, tb)
    expected = kdops.fused_linear_distill_loss(h, w, th, tw, labels, student_bias=b, teacher_bias=tb,
                                               temperature=2.0, hard_weight=0.2, chunk_size=5)
    assert_close(got, expected, LOSS_TOL[torch.float32])


def test_chunk_size_from_memory_budget():
    from kdops.ops._chunked import CHUNK_BUDGET_BYTES, chunk_rows
    rows = chunk_rows(16384, 128256, torch.bfloat16, None)  # float32 logits: 4 bytes per element
    assert 1 <= rows < 16384 and rows * 128256 * (3 * 4 + 4) <= CHUNK_BUDGET_BYTES
    assert chunk_rows(10, 100, torch.float32, None) == 10
    assert chunk_rows(10, 100, torch.float32, 3) == 3


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("transforms, entropy", [
    ({}, False),
    (dict(student_logit_scale=0.7, student_softcap=2.5, teacher_logit_scale=1.2, teacher_softcap=3.0), True),
], ids=["plain", "transforms-entropy"])
def test_opcheck(backend, transforms, entropy):
    device = require(backend)
    h, w, b, th, tw, tb, labels = make(7, 4, 3, 11, torch.float32, device)
    h.requires_grad_(True)
    w.requires_grad_(True)
    options = DistillOptions(2, 2.0, 0.5, 0.3, 2.8, -100, **transforms)
    for needs in ([True, True, False], [False, False, False]):  # gradients in forward / in backward
        args = (h, w, b, th, tw, tb, None, labels, None, needs, 3, entropy, backend, *options)
        torch.library.opcheck(torch.ops.kdops.fused_linear_distill.default, args)


def test_torch_compile_fullgraph():
    h, w, b, th, tw, tb, labels = make(8, 6, 5, 21, torch.float32, "cpu")

    def step(h, w):
        return kdops.fused_linear_distill_loss(h, w, th, tw, labels, temperature=2.0, hard_weight=0.3, chunk_size=3)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    p1 = [x.clone().requires_grad_(True) for x in (h, w)]
    p2 = [x.clone().requires_grad_(True) for x in (h, w)]
    step(*p1).backward()
    compiled(*p2).backward()
    for a, c in zip(p1, p2):
        assert_close(c.grad, a.grad, GRAD_TOL[torch.float32])


def _bad_calls():
    h, w, th, tw = torch.randn(4, 3), torch.randn(10, 3), torch.randn(4, 5), torch.randn(10, 5)
    return [
        ((h, torch.randn(10, 4), th, tw), {}, ValueError, "student_weight"),
        ((h, w, th, torch.randn(11, 5)), {}, ValueError, "vocabulary size"),
        ((h, w, torch.randn(3, 5), tw), {}, ValueError, "teacher_hidden"),
        ((h, w.double(), th, tw), {}, TypeError, "student_weight"),
        ((h.long(), w, th, tw), {}, TypeError, "student_hidden"),
        ((h, w, th, tw), dict(student_bias=torch.randn(9)), ValueError, "student_bias"),
        ((h, w, th, tw), dict(chunk_size=0), ValueError, "chunk_size"),
        ((h, w, th, tw), dict(temperature=0), ValueError, "temperature"),
        ((h, w, th, tw, torch.zeros(5, dtype=torch.long)), {}, ValueError, "labels"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    args, kwargs, error, text = _bad_calls()[case]
    with pytest.raises(error, match=text):
        kdops.fused_linear_distill_loss(*args, **kwargs)


# The logit transforms in the blockwise Triton kernel (the dispatch no longer reroutes them to
# the chunked path): against the float64 reference and against the chunked path.
BLOCKWISE_TRANSFORMS = {
    "student-softcap": dict(student_softcap=1.5),
    "teacher-scale-softcap": dict(teacher_logit_scale=0.5, teacher_softcap=1.2),
    "both-scales": dict(student_logit_scale=0.4, teacher_logit_scale=1.7),
    "all": dict(student_logit_scale=1.3, student_softcap=1.2, teacher_softcap=1.0),
}


def _no_chunked_path(monkeypatch):
    from kdops.ops import fused_linear

    def chunked(*args, **kwargs):
        raise AssertionError("the chunked path ran")

    monkeypatch.setattr(fused_linear, "lm_head_rows", chunked)


@pytest.mark.parametrize("case", list(BLOCKWISE_CASES))
@pytest.mark.parametrize("transform", list(BLOCKWISE_TRANSFORMS))
def test_blockwise_logit_transforms(monkeypatch, case, transform):
    """Logits reach |z| ~ 3 (past the softcaps): each dtype's bias / reduction / hard term, a
    third of the rows ignored; the chunked path must not run."""
    device = require("triton")
    dtype, bias, reduction, hard_weight = BLOCKWISE_CASES[case]
    tensors = make(29, 20, 18, 45, dtype, device, bias=bias)
    tensors = tuple(x if x is None or x.dtype == torch.long else x * 2 for x in tensors)
    with monkeypatch.context() as m:
        _no_chunked_path(m)
        compare("triton", tensors, temperature=1.3, divergence="jsd", beta=0.3, hard_weight=hard_weight,
                reduction=reduction, **BLOCKWISE_TRANSFORMS[transform])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_blockwise_transforms_equal_the_chunked_path(divergence):
    """The blockwise kernel's loss and gradients against the chunked path's (deterministic mode
    takes it) with every transform at once, float32."""
    device = require("triton")
    h, w, b, th, tw, tb, labels = make(23, 16, 12, 37, torch.float32, device)
    options = dict(student_bias=b, teacher_bias=tb, temperature=1.7, divergence=divergence, beta=beta_for(divergence),
                   hard_weight=0.2, backend="triton", **BLOCKWISE_TRANSFORMS["all"])
    results = []
    for deterministic in (False, True):
        hs, ws = (x.detach().clone().requires_grad_(True) for x in (h * 2, w))
        torch.use_deterministic_algorithms(deterministic)
        try:
            loss = kdops.fused_linear_distill_loss(hs, ws, th * 2, tw, labels, **options)
            loss.backward()
        finally:
            torch.use_deterministic_algorithms(False)
        results.append((loss.detach(), hs.grad, ws.grad))
    for blockwise, chunked in zip(*results):
        assert_close(blockwise, chunked, LOSS_TOL[torch.float32], scale=float(chunked.abs().max()))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_out_of_range_label_gives_nan_rows(backend, reduction):
    """An out-of-range hard label: eager raises a ValueError naming labels; under torch.compile
    (no eager check) the loss of its row and that row of grad_hidden are NaN (so is grad_weight,
    a sum over rows), on the blockwise kernel and the chunked path alike, the other rows finite."""
    device = require(backend)
    h, w, b, th, tw, tb, _ = make(6, 8, 8, 29, torch.float32, device)
    labels = torch.tensor([29 + 3, 1, -100, -5, 2, 7], device=device)
    bad = torch.tensor([True, False, False, True, False, False])

    def step(h, w):
        return kdops.fused_linear_distill_loss(h, w, th, tw, labels, hard_weight=0.5, reduction=reduction,
                                               backend=backend)

    hs, ws = (x.clone().requires_grad_(True) for x in (h, w))
    with pytest.raises(ValueError, match="labels"):
        step(hs, ws)
    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(hs, ws)
    loss.sum().backward()
    if reduction == "none":
        assert loss[bad].isnan().all() and loss[~bad].isfinite().all(), loss
    else:
        assert loss.isnan()
    assert hs.grad[bad].isnan().all() and hs.grad[~bad].isfinite().all(), hs.grad
    assert ws.grad.isnan().all()


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("normalizer", [None, 50])
def test_bf16_weight_gradients_are_rounded_once(backend, normalizer):
    """A mean's 1 / count (or 1 / normalizer) is folded into the float32 gradients before their
    one rounding to bf16: grad_weight / grad_bias (float32 until then) are within one rounding of
    the float64 values (plus float32 noise), and backward does not scale them again. grad_hidden
    is not: its G @ W takes G rounded to W's dtype, as autograd through bf16 logits does. (Not
    the Triton interpreter: its float32 -> bf16 conversion truncates.)"""
    device = require(backend)
    h, w, b, th, tw, tb, labels = make(39, 24, 16, 1001, torch.bfloat16, device)
    params = [x.clone().requires_grad_(True) for x in (w, b)]
    kdops.fused_linear_distill_loss(h, params[0], th, tw, labels, student_bias=params[1], teacher_bias=tb,
                                    hard_weight=0.3, temperature=2.0, normalizer=normalizer, chunk_size=16,
                                    backend=backend).backward()
    ref = [x.detach().double().cpu().requires_grad_(True) for x in (w, b)]
    reference.fused_linear_distill_loss(h.double().cpu(), ref[0], th.double().cpu(), tw.double().cpu(), labels.cpu(),
                                        student_bias=ref[1], teacher_bias=tb.double().cpu(), hard_weight=0.3,
                                        temperature=2.0, normalizer=normalizer).backward()
    for p, r in zip(params, ref):
        one_rounding = (r.grad.to(torch.bfloat16).double() - r.grad).abs().max()
        error = (p.grad.cpu().double() - r.grad).abs().max()
        assert error <= one_rounding * 1.01 + 1e-6 * r.grad.abs().max(), (error, one_rounding)


@pytest.mark.parametrize("backend,dtype,normalizer", [
    ("cpu", torch.float32, None), ("cpu", torch.bfloat16, None), ("cpu", torch.bfloat16, 77),
    ("triton", torch.bfloat16, 77)], ids=str)
def test_backward_scales_nothing(backend, dtype, normalizer):
    """Gradients computed in forward with a mean's 1 / count (or 1 / normalizer) folded in:
    ``loss.backward()`` allocates nothing gradient-sized (torch's CPU allocator): no scaling, and
    no materialised zero gradients for the op's gradient outputs (it measured one grad_weight
    before ``set_materialize_grads(False)``)."""
    from kdops.bench.measure import torch_cpu_peak_bytes

    device = require(backend)
    if device != "cpu":
        pytest.skip("a CPU allocator measurement")
    h, w, b, th, tw, tb, labels = make(32, 64, 16, 1001, dtype, device)
    params = [x.clone().requires_grad_(True) for x in (h, w, b)]
    loss = kdops.fused_linear_distill_loss(params[0], params[1], th, tw, labels, student_bias=params[2],
                                           teacher_bias=tb, hard_weight=0.2, normalizer=normalizer, backend=backend)
    grad_bytes = sum(x.numel() * x.element_size() for x in (h, w))
    backward = torch_cpu_peak_bytes(loss.backward)
    assert backward <= 0.05 * grad_bytes, f"backward peak {backward} B for {grad_bytes} B of gradients"
    assert all(p.grad.dtype == dtype for p in params)
