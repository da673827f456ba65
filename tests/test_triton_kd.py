"""The Triton KD kernel (kdops.backends.triton.kd.kd_forward) against the float64 reference row loss and
its autograd gradient. Without a GPU it runs under the interpreter (conftest sets
TRITON_INTERPRET=1), so the shapes stay tiny."""
import pytest
import torch

import kdops
from kdops._codes import KD_DIVERGENCES
from kdops.ops._common import distill_options
from kdops.reference import distill_row_loss

from conftest import GRAD_TOL, LOSS_TOL, assert_close, huge_logits_grad_tol

if not kdops.available_backends()["triton"].available:
    pytest.skip(kdops.available_backends()["triton"].reason, allow_module_level=True)

from kdops.backends.triton.kd import kd_forward  # noqa: E402  (after the skip: triton may be missing)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32 reverse-KL gradients p_s (l_s - l_t - D) / T cancel terms of the size of the log-probabilities
# l, each rounded by eps |l|: a few 1e-7 absolute at T = 1, beyond GRAD_TOL's fp32 atol of 1e-7.
GRAD_TOL = {**GRAD_TOL, torch.float32: (GRAD_TOL[torch.float32][0], 1e-6)}


def kd(student, teacher, labels, divergence, *, temperature=2.0, beta=0.3, hard_weight=0.0,
       compute_grad=True):
    options = distill_options(temperature=temperature, divergence=divergence, beta=beta, hard_weight=hard_weight,
                              scale_by_temperature_squared=True, ignore_index=IGNORE, reduction="none",
                              labels=labels, vocab=None, hard_target=True)
    return kd_forward(student, teacher, labels, options, compute_grad)


def reference(student, teacher, labels, divergence, *, temperature=2.0, beta=0.3, hard_weight=0.0):
    """Row losses and their student gradient in float64, from the same (upcast) logits."""
    s = student.detach().double().requires_grad_(True)
    rows, _ = distill_row_loss(s, teacher.double(), labels, temperature=temperature,
                               divergence=divergence, beta=beta, hard_weight=hard_weight,
                               ignore_index=IGNORE)
    rows.sum().backward()
    return rows.detach(), s.grad


def check(student, teacher, labels=None, divergence="forward_kl", check_grad=True, grad_tol=None, **options):
    loss, grad = kd(student, teacher, labels, divergence, **options)
    ref_loss, ref_grad = reference(student, teacher, labels, divergence, **options)
    dtype = student.dtype
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == student.shape[:1]
    assert grad.dtype == dtype and grad.shape == student.shape and grad.is_contiguous()
    finite = ref_loss[ref_loss.isfinite()]
    assert_close(loss, ref_loss, LOSS_TOL[dtype], scale=float(finite.abs().max()) if finite.numel() else 1.0)
    if check_grad:
        assert_close(grad, ref_grad, grad_tol or GRAD_TOL[dtype])
    return loss, grad


def logits(n, v, dtype, spread=3.0):
    return (torch.randn(n, v) * spread).to(dtype).to(DEVICE)


def labels_for(n, v, ignored=(1, 3)):
    labels = torch.randint(0, v, (n,))
    labels[list(ignored)] = IGNORE
    return labels.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("divergence", KD_DIVERGENCES)
def test_matches_reference(divergence, dtype):
    """5 rows (two ignored), V = 130 (two blocks and a partial one), with a hard-label term."""
    student, teacher = logits(5, 130, dtype), logits(5, 130, dtype)
    labels = labels_for(5, 130)
    _, grad = check(student, teacher, labels, divergence, hard_weight=0.3)
    assert (grad[[1, 3]] == 0).all()


@pytest.mark.parametrize("vocab", [1, 7])
@pytest.mark.parametrize("divergence", KD_DIVERGENCES)
def test_single_row_small_vocab(divergence, vocab):
    check(logits(1, vocab, torch.float32), logits(1, vocab, torch.float32), None, divergence,
          temperature=1.0)


@pytest.mark.parametrize("divergence", KD_DIVERGENCES)
def test_labels_without_hard_term(divergence):
    """hard_weight = 0: labels only mask rows; every row ignored gives zeros everywhere."""
    student, teacher = logits(5, 7, torch.float32), logits(5, 7, torch.float32)
    check(student, teacher, labels_for(5, 7), divergence, temperature=1.5, beta=0.6)
    loss, grad = kd(student, teacher, labels_for(5, 7, ignored=range(5)), divergence, hard_weight=0.3)
    assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # reverse_kl: inf - inf in grad
@pytest.mark.parametrize("divergence", KD_DIVERGENCES)
def test_masked_teacher_vocabulary(divergence):
    """Teacher logits -inf on a whole first block and a few more columns (p_t = 0 there)."""
    student, teacher = logits(3, 130, torch.float32), logits(3, 130, torch.float32)
    teacher[:, :70] = float("-inf")
    teacher[:, 100:130:7] = float("-inf")
    labels = labels_for(3, 130, ignored=[1])
    # KL(p_s || p_t) is +inf where p_t = 0 < p_s: compare the losses only.
    loss, _ = check(student, teacher, labels, divergence, hard_weight=0.3,
                    check_grad=divergence != "reverse_kl")
    if divergence == "reverse_kl":
        assert loss[0] == float("inf") and loss[1] == 0


@pytest.mark.parametrize("divergence", KD_DIVERGENCES)
def test_large_logits(divergence):
    student, teacher = logits(2, 130, torch.float32, 1e4), logits(2, 130, torch.float32, 1e4)
    grad_tol = huge_logits_grad_tol(divergence, float((student - teacher).abs().max()))
    check(student, teacher, labels_for(2, 130, ignored=[]), divergence, grad_tol=grad_tol, hard_weight=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows(dtype):
    """Rows that are not contiguous with each other (row strides 140 and 260)."""
    student = logits(4, 140, dtype)[:, 5:135]
    teacher = logits(4, 260, dtype)[:, 100:230]
    assert student.stride(0) == 140 and teacher.stride(0) == 260
    check(student, teacher, labels_for(4, 130, ignored=[2]), "jsd", hard_weight=0.3)


@pytest.mark.parametrize("divergence", ["forward_kl", "tvd", "hard"])
def test_without_gradient(divergence):
    """compute_grad=False: the same losses, and an empty gradient."""
    student, teacher = logits(5, 130, torch.float32), logits(5, 130, torch.float32)
    labels = labels_for(5, 130)
    loss, grad = kd(student, teacher, labels, divergence, hard_weight=0.3, compute_grad=False)
    assert grad.numel() == 0
    assert torch.equal(loss, kd(student, teacher, labels, divergence, hard_weight=0.3)[0])


@pytest.mark.parametrize("teachers", [0, 3], ids=["one", "mixture"])
def test_hard_target_with_gpu_blocks(monkeypatch, teachers):
    """The GPU's 4096-lane blocks (the interpreter's own are 64 lanes): V = 2 * 4096 + 37; each
    row's teacher maximum is tied within a block, across blocks, or once in the tail: the lowest
    index is the target."""
    import kdops.backends.triton.kd as module

    monkeypatch.setattr(module, "_MAX_BLOCK_V", 4096)
    vocab = 2 * 4096 + 37
    student = logits(5, vocab, torch.float32)
    teacher = (torch.randn(*((teachers,) if teachers else ()), 5, vocab) * 3).to(DEVICE)
    top = float(teacher.abs().max()) + 2.0
    ties = [[10, 3000], [4095, 4096, 8000], [5000, vocab - 1], [vocab - 5]]
    for r, cols in enumerate(ties):
        teacher[..., r, cols] = top
    labels = torch.tensor([3, 4096, vocab - 1, 0, IGNORE], device=DEVICE)
    s = student.clone().requires_grad_(True)
    loss = kdops.distill_loss(s, teacher, labels, divergence="hard", hard_weight=0.25, reduction="none",
                              backend="triton")
    loss.sum().backward()
    s64 = student.double().requires_grad_(True)
    ref = kdops.reference.distill_loss(s64, teacher.double(), labels, divergence="hard", hard_weight=0.25,
                                       reduction="none")
    ref.sum().backward()
    assert_close(loss, ref, LOSS_TOL[torch.float32], scale=float(ref.abs().max()))
    assert_close(s.grad, s64.grad, GRAD_TOL[torch.float32])
    soft = s.grad - 0.25 * (torch.softmax(student, -1) - torch.nn.functional.one_hot(labels.clamp(min=0), vocab))
    assert [int(soft[r].argmin()) for r in range(4)] == [10, 4095, 5000, vocab - 5]
