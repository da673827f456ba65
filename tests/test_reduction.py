"""The reduction epilogue of kdops.ops._common: ``normalizer=`` (the row sum divided by it, as
Transformers' ``num_items_in_batch``) on the four distillation losses, their modules and the
reference, on every backend available here."""
import pytest
import torch

import kdops
from kdops import reference

from conftest import LOSS_TOL, assert_close, interpreted, require


def _inputs(backend):
    device = require(backend)
    n, hidden, vocab, k = 10, 6, 23, 5
    h, w = torch.randn(n, hidden, device=device), torch.randn(vocab, hidden, device=device)
    th, tw = torch.randn(n, 4, device=device), torch.randn(vocab, 4, device=device)
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[::3] = -100
    topk = torch.log_softmax(th @ tw.T, -1).topk(k)
    return dict(h=h, w=w, th=th, tw=tw, labels=labels, values=topk.values, indices=topk.indices)


def _losses(x):
    """Each loss as a function of the student tensor it differentiates and its keyword options."""
    return {
        "distill_loss": (x["h"] @ x["w"].T, lambda s, **o: kdops.distill_loss(
            s, x["th"] @ x["tw"].T, x["labels"], **o)),
        "fused_linear_distill_loss": (x["h"], lambda s, **o: kdops.fused_linear_distill_loss(
            s, x["w"], x["th"], x["tw"], x["labels"], chunk_size=3, **o)),
        "sparse_distill_loss": (x["h"] @ x["w"].T, lambda s, **o: kdops.sparse_distill_loss(
            s, x["values"], x["indices"], x["labels"], **o)),
        "fused_linear_sparse_distill_loss": (x["h"], lambda s, **o: kdops.fused_linear_sparse_distill_loss(
            s, x["w"], x["values"], x["indices"], x["labels"], chunk_size=3, **o)),
    }


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("loss", ["distill_loss", "fused_linear_distill_loss", "sparse_distill_loss",
                                  "fused_linear_sparse_distill_loss"])
def test_normalizer_divides_the_row_sum(backend, loss):
    student, fn = _losses(_inputs(backend))[loss]
    options = dict(temperature=2.0, hard_weight=0.3, backend=backend)
    s_sum = student.detach().clone().requires_grad_(True)
    total = fn(s_sum, reduction="sum", **options)
    total.backward()
    for normalizer in (37, torch.tensor(37.0, device=student.device), torch.tensor([37], device=student.device)):
        s = student.detach().clone().requires_grad_(True)
        got = fn(s, normalizer=normalizer, **options)
        got.backward()
        assert got.shape == ()
        assert_close(got, total.detach() / 37, LOSS_TOL[torch.float32])
        assert_close(s.grad, s_sum.grad / 37, LOSS_TOL[torch.float32])
    # unlike the mean over the counted rows
    mean = fn(student, **options)
    assert not torch.allclose(mean, total / 37)


def test_reference_and_modules_take_the_normalizer():
    x = _inputs("torch")
    s, t = x["h"] @ x["w"].T, x["th"] @ x["tw"].T
    ref_total = reference.distill_loss(s, t, x["labels"], reduction="sum")
    assert_close(reference.distill_loss(s, t, x["labels"], normalizer=4), ref_total / 4, LOSS_TOL[torch.float32])
    ref_sparse = reference.sparse_distill_loss(s, x["values"], x["indices"], x["labels"], reduction="sum")
    assert_close(reference.sparse_distill_loss(s, x["values"], x["indices"], x["labels"], normalizer=4),
                 ref_sparse / 4, LOSS_TOL[torch.float32])
    n = torch.tensor(4)
    assert_close(kdops.nn.DistillLoss()(s, t, x["labels"], normalizer=n),
                 kdops.distill_loss(s, t, x["labels"], reduction="sum") / 4, LOSS_TOL[torch.float32])
    assert_close(kdops.nn.FusedLinearDistillLoss()(x["h"], x["w"], x["th"], x["tw"], x["labels"], normalizer=n),
                 kdops.fused_linear_distill_loss(x["h"], x["w"], x["th"], x["tw"], x["labels"], reduction="sum") / 4,
                 LOSS_TOL[torch.float32])
    assert_close(kdops.nn.SparseDistillLoss()(s, x["values"], x["indices"], x["labels"], normalizer=n),
                 kdops.sparse_distill_loss(s, x["values"], x["indices"], x["labels"], reduction="sum") / 4,
                 LOSS_TOL[torch.float32])


def test_normalizer_under_torch_compile():
    x = _inputs("cpu")

    def step(h, n):
        return kdops.fused_linear_distill_loss(h, x["w"], x["th"], x["tw"], x["labels"], chunk_size=4, normalizer=n)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    n = torch.tensor(9.0)
    assert_close(compiled(x["h"], n), step(x["h"], n), LOSS_TOL[torch.float32])


@pytest.mark.parametrize("normalizer, reduction, error, text", [
    (0, "mean", ValueError, "> 0"),
    (2.5, "mean", TypeError, "int or a one-element tensor"),
    (True, "mean", TypeError, "int or a one-element tensor"),
    (torch.ones(2), "mean", ValueError, "one-element"),
    (4, "sum", ValueError, "reduction='mean'"),
    (4, "none", ValueError, "reduction='mean'"),
])
def test_bad_normalizer_names_the_argument(normalizer, reduction, error, text):
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(error, match=text):
        kdops.distill_loss(s, t, normalizer=normalizer, reduction=reduction)
    with pytest.raises(error, match="normalizer"):
        kdops.fused_linear_sparse_distill_loss(torch.randn(3, 2), torch.randn(5, 2), torch.randn(3, 2),
                                               torch.zeros(3, 2, dtype=torch.long) + torch.arange(2),
                                               normalizer=normalizer, reduction=reduction)


# ---- the saved-gradient backward (issue 16): one rounding, no gradient-sized temporaries ----

_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def _half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` at |x| (float64): the most one rounding to ``dtype`` moves x."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(x.abs().clamp(min=info.tiny)))
    return torch.exp2(exponent - _MANTISSA_BITS[dtype] - 1)


def _dense(backend, shape, dtype, reduction, normalizer):
    device = require(backend)
    student = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    teacher = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    labels[::4] = -100
    if normalizer == "tensor":
        normalizer = torch.tensor(123.0, device=device)
    options = dict(temperature=2.0, hard_weight=0.3, reduction=reduction, normalizer=normalizer)
    return student.to(device), teacher.to(device), labels.to(device), options


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction,normalizer", [("mean", None), ("mean", 7), ("mean", "tensor"), ("sum", None),
                                                  ("none", None)])
def test_16bit_gradient_is_rounded_once(backend, dtype, reduction, normalizer):
    """The kernel folds the mean's 1 / count (1 / normalizer) into its float32 gradient before
    the one rounding to the student's dtype, and backward by grad_output = 1 changes nothing:
    every element is within half an ulp of the float64 gradient (plus float32 noise). Rounding
    the saved gradient, then its product with 1 / count, misses that bound (39 x 1001: 1.6e-3
    of max|g| against 1.0e-3)."""
    student, teacher, labels, options = _dense(backend, (39, 1001), dtype, reduction, normalizer)
    s = student.clone().requires_grad_(True)
    loss = kdops.distill_loss(s, teacher, labels, backend=backend, **options)
    loss.backward(torch.ones_like(loss))
    s64 = student.double().cpu().requires_grad_(True)
    if isinstance(options["normalizer"], torch.Tensor):
        options["normalizer"] = options["normalizer"].cpu()
    reference.distill_loss(s64, teacher.double().cpu(), labels.cpu(), **options).sum().backward()
    g64 = s64.grad
    error = (s.grad.cpu().double() - g64).abs()
    bound = _half_ulp(g64, dtype) + 1e-6 * float(g64.abs().max())
    if dtype == torch.bfloat16 and interpreted(backend):
        bound = 2 * bound  # Triton's interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest)
    assert (error <= bound).all(), f"{int((error > bound).sum())} elements rounded more than once"


@pytest.mark.parametrize("backend,dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16), ("cpu", torch.float16),
                                           ("cpu", torch.float64)], ids=str)
@pytest.mark.parametrize("reduction,normalizer", [("mean", None), ("mean", "tensor"), ("sum", None),
                                                  ("none", None)])
def test_backward_holds_one_gradient(backend, dtype, reduction, normalizer):
    """torch's CPU allocator: backward allocates no second gradient-sized tensor in any dtype
    (a 16-bit gradient scaled by float32 row weights goes in blocks of rows), and forward plus
    backward peak at one gradient (the kernel's, which becomes ``.grad``). The backward is the
    same for every kernel backend (kdops.ops.saved_grad); the cpu kernel's forward allocates
    nothing else."""
    from kdops.bench.measure import torch_cpu_peak_bytes

    if torch.cuda.is_available():
        pytest.skip("a CPU allocator measurement")
    student, teacher, labels, options = _dense(backend, (256, 4099), dtype, reduction, normalizer)
    grad_bytes = student.numel() * student.element_size()
    cotangent = torch.rand(256, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.0)
    s = student.clone().requires_grad_(True)
    loss = kdops.distill_loss(s, teacher, labels, backend=backend, **options)
    backward = torch_cpu_peak_bytes(lambda: loss.backward(cotangent.to(loss.dtype)))
    assert s.grad.dtype == dtype
    assert backward <= 0.3 * grad_bytes, f"backward peak {backward} B for a {grad_bytes} B gradient"
    s2 = student.clone().requires_grad_(True)

    def step():
        kdops.distill_loss(s2, teacher, labels, backend=backend, **options).backward(cotangent.to(loss.dtype))

    total = torch_cpu_peak_bytes(step)
    assert total <= 1.3 * grad_bytes, f"forward + backward peak {total} B for a {grad_bytes} B gradient"
    torch.testing.assert_close(s2.grad, s.grad, rtol=0, atol=0)
