"""The reduction epilogue of kdops.ops._common: ``normalizer=`` (the row sum divided by it, as
Transformers' ``num_items_in_batch``) on the four distillation losses, their modules and the
reference, on every backend available here."""
import pytest
import torch

import kdops
from kdops import reference

from conftest import LOSS_TOL, assert_close, require


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
