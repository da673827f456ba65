"""kdops.attention_relation_loss against the float64 reference that materialises the relations."""
import pytest
import torch
import torch.nn.functional as F

import kdops
from kdops import reference
from kdops.ops import attention_relation as ops

from conftest import (
    KERNEL_BACKENDS,
    LOSS_TOL,
    RELATION_GRAD_TOL,
    assert_close,
    assert_close_to_max,
    interpreted,
    require,
)


def _inputs(batch, length, student=(4, 16), teacher=(12, 64), dtype=torch.float32, scale=1.0, three_d=False,
            device="cpu"):
    """(sa, sb, ta, tb): student [B, Hs, L, ds] with gradients, teacher [B, Ht, L, dt]."""
    def make(heads, dim, grad):
        x = (torch.randn(batch, heads, length, dim, dtype=torch.float64, device=device) * scale).to(dtype)
        if three_d:
            x = x.transpose(1, 2).reshape(batch, length, heads * dim)
        return x.requires_grad_(grad)
    return make(*student, True), make(*student, True), make(*teacher, False), make(*teacher, False)


def _padding(batch, length, fully_masked=True, device="cpu"):
    """A [B, L] mask: sample 0 keeps a random prefix (at least one token), the last sample is
    fully masked when ``fully_masked`` and batch > 1, the others keep everything."""
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    mask[0, int(torch.randint(1, length + 1, ())):] = 0
    if fully_masked and batch > 1:
        mask[-1] = 0
    return mask


def _check(backend, inputs, loss_tol=None, grad_tol=None, floor=0.0, **options):
    """Loss and gradients of ``backend`` vs the float64 reference on the same (upcast) inputs
    (``floor``: see assert_close_to_max)."""
    sa, sb, ta, tb = inputs
    got = kdops.attention_relation_loss(sa, sb, ta, tb, backend=backend, **options)
    ref_inputs = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
    expected = reference.attention_relation_loss(*ref_inputs, **options)
    assert got.dtype == (torch.float64 if sa.dtype == torch.float64 else torch.float32)
    assert_close(got, expected, loss_tol or LOSS_TOL[sa.dtype])
    weights = torch.rand_like(expected) if expected.dim() else torch.ones(())  # reduction="none": any weighting
    g_sa, g_sb = torch.autograd.grad((got * weights.to(got.dtype)).sum(), (sa, sb))
    e_sa, e_sb = torch.autograd.grad((expected * weights.double()).sum(), ref_inputs[:2])
    assert g_sa.dtype == sa.dtype and g_sa.shape == sa.shape
    # the size of one row's gradient terms, g_i c_s |b| (a gradient that cancels to 0 exactly, as
    # with one key, is rounding noise of that size)
    heads = options.get("relation_heads") or sa.shape[1]
    channels = sa.shape[1] * sa.shape[3] if sa.dim() == 4 else sa.shape[2]
    rows = heads * (sa.shape[0] * sa.shape[-2] if options.get("attention_mask") is None
                    else max(int((options["attention_mask"] != 0).sum()), 1))
    g = 1.0 / rows if options.get("reduction", "mean") == "mean" else 1.0
    size = float(torch.cat([sa.detach().flatten(), sb.detach().flatten()]).abs().max().double())
    floor = max(floor, g * size / ((channels / heads) ** 0.5 * options.get("temperature", 1.0)))
    for g, e in ((g_sa, e_sa), (g_sb, e_sb)):
        assert_close_to_max(g, e, grad_tol or RELATION_GRAD_TOL[sa.dtype], floor)
    return got


CASES = {  # name: (batch, length, options); student 4 x 16, teacher 12 x 64 -> 8 relation heads
    "L1": (2, 1, dict(relation_heads=2)),
    "L7-regroup": (2, 7, dict(relation_heads=8)),
    "L7-causal-jsd": (2, 7, dict(relation_heads=8, causal=True, divergence="jsd", beta=0.3)),
    "L33-padded-reverse": (3, 33, dict(relation_heads=8, mask=True, divergence="reverse_kl")),
    "L33-causal-padded-T": (2, 33, dict(relation_heads=4, causal=True, mask=True, temperature=3.0)),
    "L7-tvd-sum": (2, 7, dict(relation_heads=2, divergence="tvd", reduction="sum")),
    "L7-skew-none": (2, 7, dict(relation_heads=8, divergence="skew_reverse_kl", beta=0.2, reduction="none")),
}


def _options(batch, length, options, device):
    options = dict(options)
    if options.pop("mask", False):
        options["attention_mask"] = _padding(batch, length, device=device)
    return options


TRITON_CASES = ("L1", "L7-regroup", "L7-skew-none")  # the interpreter pays per program: few heads


@pytest.mark.parametrize("backend, case", [(b, c) for b in KERNEL_BACKENDS for c in CASES
                                           if b != "triton" or c in TRITON_CASES])
def test_matches_reference(backend, case):
    device = require(backend)
    batch, length, options = CASES[case]
    _check(backend, _inputs(batch, length, device=device), **_options(batch, length, options, device))


def test_triton_64_tiles(monkeypatch):
    """64 x 64 tiles (the kernels' are 32 x 32 for 16-bit inputs, 16 x 16 for float32 / float64, on
    GPU and interpreter): partial and causal tiles."""
    from kdops.backends.triton import attention_relation as kernels

    monkeypatch.setattr(kernels, "TILE_ROWS", 64)
    monkeypatch.setattr(kernels, "WIDE_TILE_ROWS", 64)
    device = require("triton")
    inputs = _inputs(2, 70, student=(2, 8), teacher=(2, 16), device=device)
    _check("triton", inputs, relation_heads=2, causal=True, attention_mask=_padding(2, 70, device=device),
           divergence="jsd")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_length_130_with_padding_and_causal(backend):
    """Several query and key blocks, partial last blocks, causal tiles skipped."""
    device = require(backend)
    inputs = _inputs(1, 130, student=(1, 8), teacher=(1, 24), device=device)
    _check(backend, inputs, causal=True, attention_mask=_padding(1, 130, fully_masked=False, device=device))


def test_length_1000_native_cpu():
    require("cpu")
    inputs = _inputs(1, 1000, student=(2, 16), teacher=(2, 32))
    _check("cpu", inputs, relation_heads=2, attention_mask=_padding(1, 1000))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    device = require(backend, dtype, "attention_relation")
    _check(backend, _inputs(2, 9, student=(2, 16), teacher=(4, 16), dtype=dtype, device=device), relation_heads=2,
           causal=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_extreme_scores(backend):
    """|scores| in the thousands: near one-hot relations, exp underflows to exact zeros. The
    gradient is a difference of terms p (log p_s - log p_t) b / sqrt(d), of size up to
    max|score| max|b| / sqrt(d), whose rounding survives the cancellation: that is the floor."""
    inputs = _inputs(2, 11, student=(2, 8), teacher=(2, 8), scale=30.0, dtype=torch.float64,
                     device=require(backend, torch.float64, "attention_relation"))
    sa, sb, ta, tb = (x.detach() for x in inputs)
    scores = torch.cat([(a @ b.transpose(-1, -2)).abs().flatten() for a, b in ((sa, sb), (ta, tb))]) / 8**0.5
    floor = float(scores.max() * torch.cat([sa.flatten(), sb.flatten()]).abs().max()) / 8**0.5
    for divergence in ("reverse_kl", "jsd")[: 1 if interpreted(backend) else 2]:  # the interpreter is slow
        _check(backend, inputs, floor=floor, relation_heads=2, divergence=divergence)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fully_masked_sample_counts_nothing(backend):
    device = require(backend)
    sa, sb, ta, tb = _inputs(2, 6, student=(2, 8), teacher=(2, 8), device=device)
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    mask[1] = False
    rows = kdops.attention_relation_loss(sa, sb, ta, tb, attention_mask=mask, reduction="none", backend=backend)
    assert rows.shape == (2, 2, 6) and bool((rows[1] == 0).all()) and bool((rows[0] > 0).all())
    mean = kdops.attention_relation_loss(sa, sb, ta, tb, attention_mask=mask, backend=backend)
    assert_close(mean, rows.sum() / 12, LOSS_TOL[torch.float32])
    g_sa, g_sb = torch.autograd.grad(mean, (sa, sb))
    assert bool((g_sa[1] == 0).all()) and bool((g_sb[1] == 0).all())
    none = kdops.attention_relation_loss(sa, sb, ta, tb, attention_mask=torch.zeros(2, 6, device=device),
                                         backend=backend)
    assert float(none.detach()) == 0.0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_same_tensor_and_hidden_layout(backend):
    """MiniLMv2's (q, q) relation with one tensor for a and b, and [B, L, H*d] inputs equal to
    their [B, H, L, d] form."""
    sa, _, ta, _ = _inputs(2, 7, student=(4, 8), teacher=(2, 16), device=require(backend))
    got = kdops.attention_relation_loss(sa, sa, ta, ta, relation_heads=4, backend=backend)
    (g,) = torch.autograd.grad(got, sa)
    ref = sa.detach().double().requires_grad_()
    expected = reference.attention_relation_loss(ref, ref, ta.double(), ta.double(), relation_heads=4)
    assert_close(got, expected, LOSS_TOL[torch.float32])
    assert_close_to_max(g, torch.autograd.grad(expected, ref)[0], RELATION_GRAD_TOL[torch.float32])
    hidden = [x.detach().transpose(1, 2).reshape(2, 7, -1) for x in (sa, ta)]
    flat = kdops.attention_relation_loss(hidden[0], hidden[0], hidden[1], hidden[1], relation_heads=4, backend=backend)
    assert_close(flat, got.detach(), LOSS_TOL[torch.float32])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_identical_models_give_zero(backend):
    sa, sb, _, _ = _inputs(1, 9, student=(2, 8), device=require(backend))
    loss = kdops.attention_relation_loss(sa, sb, sa.detach(), sb.detach(), backend=backend)
    assert abs(float(loss.detach())) < 1e-6


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck_float64(backend):
    device = require(backend, torch.float64, "attention_relation")
    length, heads, dim = (3, 1, 2) if interpreted(backend) else (6, 2, 4)  # the interpreter is slow
    sa, sb, ta, tb = _inputs(1, length, student=(heads, dim), teacher=(heads, 5), dtype=torch.float64, device=device)
    mask = torch.tensor([[1] * (length - 1) + [0]], device=device)
    fn = lambda a, b: kdops.attention_relation_loss(a, b, ta, tb, causal=True, attention_mask=mask,  # noqa: E731
                                                    divergence="jsd", backend=backend)
    assert torch.autograd.gradcheck(fn, (sa, sb))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck_and_compile(backend):
    require(backend)
    sa, sb, ta, tb = _inputs(2, 5, student=(2, 8), teacher=(2, 8))
    if backend != "torch":
        views = [x.detach().requires_grad_(x.requires_grad) for x in (sa, sb, ta, tb)]
        counted = _padding(2, 5).to(torch.uint8)
        torch.library.opcheck(torch.ops.kdops.attention_relation.default,
                              (*views, counted, True, 1.5, 2, 0.5, backend))
        constants = [x.detach() for x in views]  # the backward op has no autograd formula (no double backward)
        rows, stats = ops.attention_relation_op(*constants, counted, True, 1.5, 2, 0.5, backend)
        torch.library.opcheck(torch.ops.kdops.attention_relation_backward.default,
                              (torch.rand_like(rows), *constants, counted, stats, True, 1.5, 2, 0.5, backend))

    def step(a, b):
        return kdops.attention_relation_loss(a, b, ta, tb, causal=True, backend=backend)

    # the kernels sit inside custom ops, opaque to the compiler
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    copies = [[x.detach().clone().requires_grad_() for x in (sa, sb)] for _ in range(2)]
    eager, got = step(*copies[0]), compiled(*copies[1])
    eager.backward()
    got.backward()
    assert_close(got, eager, LOSS_TOL[torch.float32])
    for g, e in zip(copies[1], copies[0]):
        assert_close_to_max(g.grad, e.grad, RELATION_GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_torch_backend_is_the_reference_and_teacher_is_constant(backend):
    sa, sb, ta, tb = _inputs(2, 5, student=(2, 8), teacher=(2, 8), device=require(backend))
    ta.requires_grad_(True)
    loss = kdops.attention_relation_loss(sa, sb, ta, tb, backend="torch")
    assert ta.grad is None
    got = kdops.attention_relation_loss(sa, sb, ta, tb, backend=backend)
    got.backward()
    assert ta.grad is None or bool((ta.grad == 0).all())
    assert_close(got, loss.detach(), LOSS_TOL[torch.float32])
    assert ops.implementation("torch", sa.device, sa.dtype) == "torch"


def test_module_wrapper():
    sa, sb, ta, tb = _inputs(2, 5, student=(2, 8), teacher=(4, 8))
    crit = kdops.nn.AttentionRelationLoss(relation_heads=2, causal=True, divergence="jsd")
    expected = kdops.attention_relation_loss(sa, sb, ta, tb, relation_heads=2, causal=True, divergence="jsd")
    assert_close(crit(sa, sb, ta, tb), expected.detach(), LOSS_TOL[torch.float32])


def _bad(**change):
    sa, sb, ta, tb = (x.detach() for x in _inputs(2, 5, student=(2, 8), teacher=(3, 8)))
    args = dict(student_a=sa, student_b=sb, teacher_a=ta, teacher_b=tb, relation_heads=2)
    args.update(change)
    return args


BAD = {
    "student_a": (_bad(student_a=torch.ones(2, 5, 16, dtype=torch.long)), TypeError),
    "student_b": (_bad(student_b=torch.randn(2, 2, 5, 4)), ValueError),
    "teacher_b": (_bad(teacher_b=torch.randn(2, 3, 5, 8, dtype=torch.float64)), TypeError),
    "teacher_a": (_bad(teacher_a=torch.randn(2, 3, 6, 8), teacher_b=torch.randn(2, 3, 6, 8)), ValueError),
    "relation_heads": (_bad(relation_heads=5), ValueError),
    "relation_heads ": (_bad(relation_heads=None), ValueError),
    "attention_mask": (_bad(attention_mask=torch.ones(2, 4)), ValueError),
    "causal": (_bad(causal=1), TypeError),
    "temperature": (_bad(temperature=0.0), ValueError),
    "divergence": (_bad(divergence="kl"), ValueError),
    "reduction": (_bad(reduction="avg"), ValueError),
    "beta": (_bad(divergence="jsd", beta=1.0), ValueError),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_names_the_argument(name):
    args, error = BAD[name]
    for backend in ["torch", "cpu"]:  # validation precedes the dispatch: the same error with or without kdops._C
        with pytest.raises(error, match=name.strip()):
            kdops.attention_relation_loss(**args, backend=backend)


# --------------------------------------------------------------------------- DeiT hard distillation


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_hard_distillation_is_ce_against_the_teacher_argmax(backend):
    device = require(backend)
    student = torch.randn(6, 11, device=device, requires_grad=True)
    teacher = torch.randn(6, 11, device=device)
    teacher[0, 7] = teacher[0, 2] = teacher[0].max() + 1.0  # a tie: the lowest index, 2, wins
    labels = torch.tensor([1, 2, -100, 4, 5, 6], device=device)
    got = kdops.distill_loss(student, teacher, labels, divergence="hard", temperature=2.0, hard_weight=0.3,
                             backend=backend, reduction="none")
    target = teacher.argmax(-1)
    assert int(target[0]) == 2
    soft = F.cross_entropy(student / 2.0, target, reduction="none") * 4.0
    hard = F.cross_entropy(student, labels.clamp(min=0), reduction="none")
    expected = torch.where(labels != -100, 0.3 * hard + 0.7 * soft, torch.zeros((), device=device))
    assert_close(got, expected, LOSS_TOL[torch.float32])
    g, e = torch.autograd.grad(got.sum(), student)[0], torch.autograd.grad(expected.sum(), student)[0]
    assert_close(g, e, LOSS_TOL[torch.float32])
    mixture = torch.stack([teacher, torch.randn(6, 11, device=device)])
    log_mix = torch.logsumexp(torch.log_softmax(mixture / 2.0, -1), 0)
    two = kdops.distill_loss(student, mixture, divergence="hard", temperature=2.0, backend=backend)
    assert_close(two, F.cross_entropy(student / 2.0, log_mix.argmax(-1)) * 4.0, LOSS_TOL[torch.float32])


def test_benchmark_reports_a_method_over_the_memory_cap(tmp_path):
    """benchmarks/bench_attention_relation.py: a run that fits gives time and peak memory; one whose
    L x L relations pass the address-space cap reports that it does not fit (each in its own process)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_attention_relation.py"
    root = str(script.parent.parent)  # kdops importable from the checkout, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}

    def one(method, length, cap_gib):
        done = subprocess.run([sys.executable, str(script), "--one", method, str(length), "--batch", "1", "--heads",
                               "1", "--dim", "4", "--repeats", "1", "--memory-cap-gib", str(cap_gib)],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    fits = one("kdops", 64, 16)
    assert fits["seconds"] > 0 and fits["peak_mib"] >= 0 and "error" not in fits
    over = one("torch", 65536, 12)  # one [1, 1, L, L] float32 relation matrix is 16 GiB
    assert over["error"].startswith("does not fit in the 12 GiB cap"), over
