"""Property-based tests (hypothesis) of every public loss on every backend available here against
the float64 reference, values and gradients: shapes from empty / one element up, vocabularies from
1, any leading dims, contiguous / transposed / sliced / expanded inputs, option combinations,
float64 / float32 / bfloat16 / float16, ignored rows in any pattern, extreme and -inf logits.

Profiles: ``ci`` (default: a fixed example budget per test, random draws from a printed seed) and
``nightly`` (``KDOPS_HYPOTHESIS_PROFILE=nightly``: 25 times the examples). A failure prints the
shrunk example (hypothesis's "Falsifying example") and the seed: ``KDOPS_HYPOTHESIS_SEED=<seed>``
replays the run. Tensors are drawn from a torch generator whose seed is part of the example.
The Triton kernels run under the interpreter on CPU: their examples are kept tiny.
"""
import math
import os
import random

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, seed, settings
from hypothesis import strategies as st

import kdops
from kdops import reference
from kdops.divergences import BETA_RANGES, DIVERGENCES

from conftest import GRAD_TOL, LOSS_TOL, RELATION_GRAD_TOL, RELATION_LOSS_TOL, assert_close, huge_logits_grad_tol

PROFILE = os.environ.get("KDOPS_HYPOTHESIS_PROFILE", "ci")
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=False, **_COMMON)
settings.register_profile("nightly", derandomize=False, **_COMMON)
settings.load_profile(PROFILE)
EXAMPLES_FACTOR = {"ci": 1, "nightly": 25}[PROFILE]
SEED = int(os.environ.get("KDOPS_HYPOTHESIS_SEED") or random.SystemRandom().randrange(2**32))

BACKENDS = ["torch", "cpu", "triton"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]
FINITE_MAX = {torch.float16: 6e4}  # extreme logits stay finite in float16


@pytest.fixture(autouse=True)
def _print_hypothesis_seed():
    print(f"hypothesis profile {PROFILE}, seed: KDOPS_HYPOTHESIS_SEED={SEED}")  # shown with a failure


def require(backend: str) -> None:
    status = kdops.available_backends()[backend]
    if not status.available:
        pytest.skip(f"backend {backend!r} unavailable: {status.reason}")


def interpreted(backend: str) -> bool:
    return backend == "triton" and not torch.cuda.is_available()


def budget(backend: str, examples: int) -> settings:
    """``examples`` per test (a quarter on the Triton interpreter), times the profile's factor."""
    n = max(4, examples // 4) if interpreted(backend) else examples
    return settings(max_examples=n * EXAMPLES_FACTOR)


def prop(examples: int):
    """One property test per backend: ``fn(backend, data)`` over ``examples`` draws."""
    def wrap(fn):
        @pytest.mark.parametrize("backend", BACKENDS)
        def test(backend):
            require(backend)
            seed(SEED)(budget(backend, examples)(given(data=st.data())(lambda data: fn(backend, data))))()
        test.__name__ = fn.__name__
        test.__doc__ = fn.__doc__
        return test
    return wrap


# ------------------------------------------------------------------------------- drawing inputs


def generator(data) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="tensor seed"))


def lead_shape(data, backend: str, max_rows: int = 12) -> tuple:
    """Leading dims: none, or up to three of size 0..4 with at most ``max_rows`` rows."""
    rows = 4 if interpreted(backend) else max_rows
    return tuple(data.draw(st.lists(st.integers(0, 4), max_size=3).filter(lambda s: math.prod(s) <= rows),
                           label="leading shape"))


def values(gen: torch.Generator, shape: tuple, scale: float, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    limit = FINITE_MAX.get(dtype)
    return (x if limit is None else x.clamp(-limit, limit)).to(dtype)


def store(x: torch.Tensor, how: str) -> torch.Tensor:
    """A leaf holding the values of ``x`` in the memory layout ``how``, from which :func:`view`
    gives them back: ``transposed`` (last dim outermost), ``sliced`` (every other element of a
    wider tensor), ``expanded`` (one row broadcast: every row becomes the first one)."""
    if how == "transposed" and x.dim() >= 2:
        return x.movedim(-1, 0).contiguous()
    if how == "sliced":
        wide = torch.full((*x.shape[:-1], 2 * x.shape[-1] + 1), 7.0, dtype=x.dtype)
        wide[..., 1::2] = x
        return wide
    if how == "expanded" and x.dim() >= 2:
        return x.reshape(-1, x.shape[-1])[:1].clone()
    return x.clone()


def view(leaf: torch.Tensor, how: str, shape: tuple) -> torch.Tensor:
    """The tensor of ``shape`` that :func:`store` laid out as ``leaf`` (differentiable)."""
    if how == "transposed" and len(shape) >= 2:
        return leaf.movedim(0, -1)
    if how == "sliced":
        return leaf[..., 1::2]
    if how == "expanded" and len(shape) >= 2:
        return leaf.expand(math.prod(shape[:-1]), shape[-1]).view(shape)
    return leaf


def expanded_copies(how: str, shape: tuple) -> int:
    """How many elements of the view of ``shape`` share one leaf element in layout ``how``: an
    expanded leaf's gradient sums that many gradients, each rounded on its own, whose errors
    survive their cancellation (cosine affinity of two equal (5, 5, 3) rows, whose 50 elements
    share 3: an exact 0 came out 3.5e-6, 1.1 times one element's bound; KDOPS_TEST_SEED=1961405885)."""
    return math.prod(shape[:-1]) if how == "expanded" and len(shape) >= 2 else 1


def laid_out(x: torch.Tensor, how: str) -> torch.Tensor:
    """``x`` (a constant) in layout ``how`` (``expanded``: every row the first one)."""
    return view(store(x, how), how, tuple(x.shape))


def draw_labels(data, gen: torch.Generator, lead: tuple, vocab: int, required: bool):
    """(labels or None, ignore_index): each row ignored with a drawn probability (0, 1/2, 1)."""
    ignore_index = data.draw(st.sampled_from([-100, -1, 0]), label="ignore_index")
    if not required and data.draw(st.booleans(), label="no labels"):
        return None, ignore_index
    labels = torch.randint(0, vocab, lead, generator=gen)
    p_ignore = data.draw(st.sampled_from([0.0, 0.5, 1.0]), label="ignored fraction")
    labels[torch.rand(lead, generator=gen) < p_ignore] = ignore_index
    return labels, ignore_index


def draw_options(data, labels) -> dict:
    divergence = data.draw(st.sampled_from(DIVERGENCES), label="divergence")
    beta = 0.5
    if divergence in BETA_RANGES:
        low, _, inclusive = BETA_RANGES[divergence]
        beta = data.draw(st.sampled_from(([low] if inclusive else []) + [1e-6, 0.1, 0.5, 0.9]), label="beta")
    hard_weight = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="hard_weight") if labels is not None else 0.0
    return dict(
        temperature=data.draw(st.sampled_from([0.5, 1.0, 2.0, 7.3]), label="temperature"),
        divergence=divergence, beta=beta, hard_weight=hard_weight,
        scale_by_temperature_squared=data.draw(st.booleans(), label="scale_by_temperature_squared"),
        reduction=data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"),
    )


def backward_weights(gen: torch.Generator, loss: torch.Tensor) -> torch.Tensor:
    """Upstream gradient: random per row for ``reduction="none"`` (catches per-row scaling)."""
    return torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5


def run_both(fn, ref_fn, leaves: list, make_args, gen: torch.Generator, sizes: bool = False):
    """``fn(*make_args(leaves))`` and ``ref_fn(*make_args(float64 leaves))`` with the gradients
    of ``sum(weights * loss)`` to each leaf (None for leaves that get none). ``sizes``: also the
    reference gradient of each leaf without cancellation, ``sum |g|`` over the elements of the
    views ``make_args`` takes of it (an expanded leaf's gradient is the sum of its rows')."""
    mine = [x.detach().clone().requires_grad_(True) for x in leaves]
    ref = [x.detach().double().requires_grad_(True) for x in leaves]
    loss = fn(*make_args(mine))
    ref_args = make_args(ref)
    views = [a for a in ref_args if isinstance(a, torch.Tensor) and a.requires_grad and not a.is_leaf] if sizes else []
    for v in views:
        v.retain_grad()
    expected = ref_fn(*ref_args)
    weights = backward_weights(gen, expected)
    if loss.requires_grad:
        (loss * weights.to(loss.dtype)).sum().backward()
    if expected.requires_grad:
        (expected * weights).sum().backward(retain_graph=bool(views))
    result = (loss, [x.grad for x in mine], expected.detach(), [x.grad for x in ref])
    if not sizes:
        return result
    used = [v for v in views if v.grad is not None]
    magnitudes = [x.grad if x.grad is None else (
        x.grad.abs() if not used else torch.autograd.grad(used, x, [v.grad.abs() for v in used], allow_unused=True)[0])
        for x in ref]
    return result + (magnitudes,)


def check_grads(grads, ref_grads, tol, dtypes, sizes=None):
    """Gradients within ``tol`` of the reference: atol relative to the largest element, rtol to
    each element, or to its size without cancellation (``sizes`` of :func:`run_both`): an
    expanded leaf sums N rows' gradients, each rounded to the dtype (one rounding per row and
    element, as the rule of one rounding requires), whose errors survive their cancellation."""
    for i, (grad, ref_grad, dtype) in enumerate(zip(grads, ref_grads, dtypes)):
        if ref_grad is None:
            assert grad is None or not grad.any()
            continue
        assert grad is not None and grad.dtype == dtype and grad.shape == ref_grad.shape
        if not ref_grad.numel():
            continue
        size = ref_grad.abs() if sizes is None or sizes[i] is None else sizes[i]
        rtol, atol = tol
        allowed = rtol * size + atol * max(float(size.max()), 1.0)
        err = (grad.double() - ref_grad).abs()
        same = (grad.double() == ref_grad) | (grad.isnan() & ref_grad.isnan())
        bad = ~((err <= allowed) | same)
        assert not bad.any(), (
            f"gradient {i}: {int(bad.sum())} / {bad.numel()} elements off by more than rtol {rtol} x size + atol "
            f"{atol} x max size: first at {tuple(bad.nonzero()[0].tolist())}: {float(grad[bad][0])} vs "
            f"{float(ref_grad[bad][0])} (size {float(size[bad][0])}); greatest error {float(err[~same].max())}")


def finite_scale(x: torch.Tensor) -> float:
    finite = x[torch.isfinite(x)]
    return float(finite.abs().max()) if finite.numel() else 1.0


def check_loss(loss, expected, dtype, soft_weight: float = 1.0):
    """Values within LOSS_TOL of the reference (infinite ones equal: reverse KL where p_t = 0);
    atol relative to the largest value, or to the soft weight (T^2: the divergence's float32
    rounding, e.g. of log M = log(beta + (1 - beta)) at V = 1, is multiplied by it)."""
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == expected.shape
    assert_close(loss, expected, LOSS_TOL[dtype], scale=max(finite_scale(expected), soft_weight))


def soft_weight(options: dict) -> float:
    return options["temperature"] ** 2 if options["scale_by_temperature_squared"] else 1.0


def fused_grad_tol(dtype: torch.dtype) -> tuple:
    """GRAD_TOL, but (2e-4, 2e-5) for float32: h and W's gradients sum V and N logit gradients."""
    return (2e-4, 2e-5) if dtype == torch.float32 else GRAD_TOL[dtype]


def check_fused(loss, expected, grads, ref_grads, dtype, logit_size: float, temperature: float, sizes=None):
    """Loss and gradients of a fused linear op. bf16 / fp16 logits are rounded to the input dtype
    (chunked path) before the loss, so against float64 logits each row's loss carries up to
    2 ulp(max|logit|) / T (times T^2, the largest soft weight) from their rounding, and the
    gradients as much relative to their largest element. ``sizes``: the gradients without
    cancellation (:func:`linear_grad_sizes`), to which rtol applies."""
    if dtype in (torch.float32, torch.float64):
        check_loss(loss, expected, dtype, max(temperature**2, 1.0))
        # gradients to h and W are sums over V and N of logit gradients: compare to their largest
        check_grads(grads, ref_grads, fused_grad_tol(dtype), [dtype] * len(grads), sizes)
        return
    rounding = 2 * torch.finfo(dtype).eps * logit_size / temperature
    rows = 1 if expected.dim() else 12  # "sum" adds the rows' errors
    assert_close(loss, expected, (GRAD_TOL[dtype][0], rows * rounding * max(temperature**2, 1.0) + 1e-6))
    check_grads(grads, ref_grads, (GRAD_TOL[dtype][0], rounding + GRAD_TOL[dtype][1]), [dtype] * len(grads), sizes)


def linear_grad_sizes(leaves: list, make_args, loss_of_logits, logit_error=None, rtol: float = 1.0) -> list:
    """Each leaf's reference gradient without cancellation, on the leaf's layout: |dL/dz| carried
    through |W| to h, through |h| to W and summed over rows to b (z = h W^T + b). ``logit_error(z)``:
    the float32 rounding bound of each logit's gradient beyond ``rtol`` times it, carried the same
    way (in units of ``rtol``). Those sums keep the logit gradients' rounding while their values
    cancel (found: reverse KL, V = 3..5, Hs = 1, |W| ~ 30, T = 0.5: an h-gradient 3.5e-4, then 32 %
    off relative to itself; KDOPS_HYPOTHESIS_SEED=12)."""
    ref = [x.detach().double().requires_grad_(True) for x in leaves]
    h, w, *b = make_args(ref)[:3]
    b = [x for x in b if x is not None]
    z = torch.nn.functional.linear(h.detach(), w.detach(), b[0].detach() if b else None).requires_grad_(True)
    loss = loss_of_logits(z)
    if not loss.requires_grad:
        return None
    g = torch.autograd.grad(1.5 * loss.sum(), z)[0].abs()  # 1.5: backward_weights' largest
    if logit_error is not None:
        g = g + logit_error(z.detach()) / rtol
    rows = g.reshape(-1, g.shape[-1])
    logical = [(rows @ w.detach().abs()).reshape(h.shape), rows.T @ h.detach().abs().reshape(-1, h.shape[-1])]
    return list(torch.autograd.grad([h, w, *b], ref, logical + [rows.sum(0)] * len(b), allow_unused=True))


def close_to_max(actual, expected, tol, dtype, floor=0.0):
    """:func:`assert_close_to_max` plus the spacing of ``dtype``'s subnormals (float16: 2^-24),
    the absolute rounding of gradients that small."""
    rtol, atol = tol
    scale = max(float(expected.detach().abs().max()) if expected.numel() else 0.0, floor)
    info = torch.finfo(dtype)
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol,
                               atol=atol * scale + info.tiny * info.eps, equal_nan=True)


def grad_tol(dtype: torch.dtype, divergence: str, log_ratio: float) -> tuple:
    """GRAD_TOL, with the rounding bound of a float32 log-ratio term at huge logits (conftest)."""
    if dtype == torch.float64:
        return GRAD_TOL[dtype]
    return huge_logits_grad_tol(divergence, log_ratio, GRAD_TOL[dtype])


# ------------------------------------------------------------------------------- response-based


def draw_sizes(data, backend, max_vocab):
    """(generator, dtype, leading shape, V in [1, max_vocab]) of a response-based property test."""
    gen = generator(data)
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    lead = lead_shape(data, backend)
    return gen, dtype, lead, data.draw(st.integers(1, max_vocab), label="V")


@prop(examples=32)
def test_distill_loss(backend, data):
    """distill_loss: every divergence, hard mix, K teachers, layouts, dtypes, -inf / huge logits."""
    gen, dtype, lead, vocab = draw_sizes(data, backend, 140 if interpreted(backend) else 300)
    n_teachers = data.draw(st.sampled_from([0, 0, 1, 2, 3]), label="K (0: single-teacher shape)")
    scale = data.draw(st.sampled_from([1.0, 5.0, 1e4]), label="logit scale")
    masked = data.draw(st.booleans(), label="-inf teacher logits")
    s_layout = data.draw(st.sampled_from(LAYOUTS), label="student layout")
    t_layout = data.draw(st.sampled_from(LAYOUTS[:3]), label="teacher layout")
    labels, ignore_index = draw_labels(data, gen, lead, vocab, required=False)
    options = draw_options(data, labels)
    shape = (*lead, vocab)
    t_shape = (n_teachers, *shape) if n_teachers else shape
    teacher = values(gen, t_shape, scale, dtype)
    if masked and vocab > 1:
        mask = torch.rand(t_shape, generator=gen) < 0.4
        mask[..., 0] = False  # every row keeps a finite teacher logit
        teacher = teacher.masked_fill(mask, -math.inf)
    weights = None
    if n_teachers > 1 and data.draw(st.booleans(), label="teacher_weights"):
        w = torch.rand(n_teachers, generator=gen, dtype=torch.float64)
        weights = (w / w.sum()).tolist()
    teacher = laid_out(teacher, t_layout)
    note(f"shape {shape}, teachers {t_shape}, dtype {dtype}, layouts {s_layout}/{t_layout}, options {options}")
    # reverse KL (and skew reverse KL at beta = 0) is +inf where p_t = 0 < p_s
    infinite = masked and (options["divergence"] == "reverse_kl" or
                           (options["divergence"] == "skew_reverse_kl" and options["beta"] == 0))

    def args(leaves):
        (s,) = leaves
        return view(s, s_layout, shape), teacher, labels

    def mine(s, t, y):
        return kdops.distill_loss(s, t, y, ignore_index=ignore_index, teacher_weights=weights, backend=backend,
                                  **options)

    def ref(s, t, y):
        w = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        return reference.distill_loss(s, t.double(), y, ignore_index=ignore_index, teacher_weights=w, **options)

    student = values(gen, shape, scale, dtype)
    loss, grads, expected, ref_grads, sizes = run_both(mine, ref, [store(student, s_layout)], args, gen, sizes=True)
    check_loss(loss, expected, dtype, soft_weight(options))
    if not infinite:
        finite = teacher[torch.isfinite(teacher)].double()
        log_ratio = (float(student.double().abs().max()) + float(finite.abs().max())) / options["temperature"] \
            if student.numel() else 0.0
        check_grads(grads, ref_grads, grad_tol(dtype, options["divergence"], log_ratio), [dtype], sizes)


def student_lm_head(gen, lead, vocab, hs, dtype, h_layout, w_layout, weight_scale, has_bias):
    """The student's leaves (hidden ``(*lead, hs)``, weight ``(vocab, hs)`` of entries ~
    ``weight_scale / sqrt(hs)``, bias) stored in their layouts, and ``args(leaves)``: them as
    the loss takes them."""
    leaves = [store(values(gen, (*lead, hs), 1.0, dtype), h_layout),
              store(values(gen, (vocab, hs), weight_scale / math.sqrt(hs), dtype), w_layout)]
    if has_bias:
        leaves.append(values(gen, (vocab,), 1.0, dtype))

    def args(leaves):
        h, w, *b = leaves
        return view(h, h_layout, (*lead, hs)), view(w, w_layout, (vocab, hs)), b[0] if b else None

    return leaves, args


@prop(examples=16)
def test_fused_linear_distill_loss(backend, data):
    """fused_linear_distill_loss: chunk sizes, biases, K teachers of other hidden sizes, layouts."""
    small = interpreted(backend)
    gen, dtype, lead, vocab = draw_sizes(data, backend, 20 if small else 200)
    hs = data.draw(st.integers(1, 8 if small else 24), label="Hs")
    n_teachers = data.draw(st.sampled_from([0, 0, 1, 2]), label="K (0: one teacher's tensors)")
    hts = [data.draw(st.integers(1, 8 if small else 24), label="Ht") for _ in range(max(n_teachers, 1))]
    has_bias = data.draw(st.booleans(), label="student_bias")
    has_teacher_bias = data.draw(st.booleans(), label="teacher_bias")
    chunk_size = data.draw(st.sampled_from([None, 1, 2, 5]), label="chunk_size")
    h_layout = data.draw(st.sampled_from(LAYOUTS), label="hidden layout")
    w_layout = data.draw(st.sampled_from(LAYOUTS[:3]), label="weight layout")
    weight_scale = data.draw(st.sampled_from([0.3, 30.0]), label="weight scale")
    labels, ignore_index = draw_labels(data, gen, lead, vocab, required=False)
    options = draw_options(data, labels)
    note(f"lead {lead}, V {vocab}, Hs {hs}, Ht {hts}, dtype {dtype}, layouts {h_layout}/{w_layout}, "
         f"bias {has_bias}/{has_teacher_bias}, chunk {chunk_size}, options {options}")
    t_hidden = [values(gen, (*lead, ht), 1.0, dtype) for ht in hts]
    t_weight = [laid_out(values(gen, (vocab, ht), weight_scale / math.sqrt(ht), dtype), w_layout) for ht in hts]
    t_bias = [values(gen, (vocab,), 1.0, dtype) for _ in hts] if has_teacher_bias else None
    if not n_teachers:
        t_hidden, t_weight, t_bias = t_hidden[0], t_weight[0], None if t_bias is None else t_bias[0]
    leaves, args = student_lm_head(gen, lead, vocab, hs, dtype, h_layout, w_layout, weight_scale, has_bias)

    def mine(h, w, b):
        return kdops.fused_linear_distill_loss(h, w, t_hidden, t_weight, labels, student_bias=b, teacher_bias=t_bias,
                                               ignore_index=ignore_index, chunk_size=chunk_size, backend=backend,
                                               **options)

    def ref(h, w, b):
        as64 = (lambda x: None if x is None else [t.double() for t in x]) if n_teachers else \
            (lambda x: None if x is None else x.double())
        return reference.fused_linear_distill_loss(h, w, as64(t_hidden), as64(t_weight), labels, student_bias=b,
                                                   teacher_bias=as64(t_bias), ignore_index=ignore_index, **options)

    loss, grads, expected, ref_grads = run_both(mine, ref, leaves, args, gen)
    logits = [torch.nn.functional.linear(*(x.double() for x in xs)) for xs in zip(t_hidden, t_weight)] \
        if n_teachers else [torch.nn.functional.linear(t_hidden.double(), t_weight.double())]
    logits.append(torch.nn.functional.linear(*(x.double() for x in args(leaves)[:2])))
    teachers = zip(t_hidden, t_weight, t_bias or [None] * len(hts)) if n_teachers else [(t_hidden, t_weight, t_bias)]
    t_logits = [torch.nn.functional.linear(h.double(), w.double(), None if b is None else b.double())
                for h, w, b in teachers]
    teacher = torch.stack(t_logits) if n_teachers else t_logits[0]
    logit_size = max(float(z.abs().max()) if z.numel() else 0.0 for z in logits) + 4.0
    temperature, log_ratio = options["temperature"], 2 * logit_size
    p_t = torch.softmax(teacher / temperature, -1)

    def logit_error(z):
        """A log-ratio (up to max|s - t| / T) rounded in float32 (2^-24 of it, twice: huge_logits_grad_tol)
        in each logit's gradient, weighted by the probability it multiplies, times the soft weight / T."""
        if dtype == torch.float64 or options["divergence"] in ("forward_kl", "tvd"):
            return torch.zeros_like(z)
        p = torch.softmax(z / temperature, -1) + (p_t.mean(0) if n_teachers else p_t)
        return 1.5 * max(temperature**2, 1.0) / temperature * 2 * 2.0**-23 * log_ratio / temperature * p

    sizes = linear_grad_sizes(leaves, args, lambda z: reference.distill_loss(
        z, teacher, labels, ignore_index=ignore_index, **options), logit_error, fused_grad_tol(dtype)[0])
    check_fused(loss, expected, grads, ref_grads, dtype, logit_size, temperature, sizes)


def draw_topk(data, gen, lead, vocab, temperature, dtype):
    """A teacher's top-k (K from 1 to V): log-probabilities at T, distinct indices, int32 or int64."""
    k = data.draw(st.integers(1, vocab), label="K")
    teacher = torch.randn((*lead, vocab), generator=gen, dtype=torch.float64) * 3
    logprobs, indices = torch.log_softmax(teacher / temperature, -1).topk(k, -1)
    order = torch.rand(indices.shape, generator=gen).argsort(-1)  # any order within the row
    value_dtype = data.draw(st.sampled_from([dtype, torch.bfloat16, torch.float32]), label="topk_logprobs dtype")
    index_dtype = data.draw(st.sampled_from([torch.int64, torch.int32]), label="topk_indices dtype")
    return logprobs.gather(-1, order).to(value_dtype), indices.gather(-1, order).to(index_dtype)


def assume_rest_masses(options, logprobs, indices, student_logits):
    """With a rest bucket, draws whose teacher or student rest mass is below 1e-3 are not
    compared: ``1 - sum(top-k p)`` is approximate there (README, Limitations)."""
    if options["rest_mass"] != "bucket" or not student_logits.numel() or indices.shape[-1] == student_logits.shape[-1]:
        return
    rest_t = 1 - logprobs.double().exp().sum(-1)
    in_topk = torch.zeros(student_logits.shape, dtype=torch.bool).scatter(-1, indices.long(), True)
    p_s = torch.softmax(student_logits.double() / options["temperature"], -1)
    rest_s = p_s.masked_fill(in_topk, 0).sum(-1)
    assume(min(float(rest_t.min()), float(rest_s.min())) > 1e-3)


def sparse_options(data, labels):
    options = draw_options(data, labels)
    rest_mass = data.draw(st.sampled_from(["ignore", "bucket"]), label="rest_mass")
    if rest_mass == "ignore" and (options["divergence"] == "reverse_kl" or
                                  (options["divergence"] == "skew_reverse_kl" and options["beta"] == 0)):
        rest_mass = "bucket"  # refused with "ignore" (infinite): tested in test_hygiene
    return dict(options, rest_mass=rest_mass)


@prop(examples=30)
def test_sparse_distill_loss(backend, data):
    """sparse_distill_loss: K from 1 to V, both rest masses, index / value dtypes, layouts."""
    gen, dtype, lead, vocab = draw_sizes(data, backend, 140 if interpreted(backend) else 300)
    s_layout = data.draw(st.sampled_from(LAYOUTS), label="student layout")
    labels, ignore_index = draw_labels(data, gen, lead, vocab, required=False)
    options = sparse_options(data, labels)
    # the kernels' student rest mass is 1 - sum(top-k p_s), absolute error ~1e-6 (README,
    # Limitations): with a rest bucket the student's logits stay moderate
    huge = [1e4] if options["rest_mass"] == "ignore" or backend == "torch" else []
    scale = data.draw(st.sampled_from([1.0, 5.0] + huge), label="logit scale")
    logprobs, indices = draw_topk(data, gen, lead, vocab, options["temperature"], dtype)
    shape = (*lead, vocab)
    note(f"shape {shape}, K {indices.shape[-1]}, dtype {dtype}, layout {s_layout}, options {options}")

    def args(leaves):
        return view(leaves[0], s_layout, shape), logprobs, indices

    def mine(s, lp, idx):
        return kdops.sparse_distill_loss(s, lp, idx, labels, ignore_index=ignore_index, backend=backend, **options)

    def ref(s, lp, idx):
        return reference.sparse_distill_loss(s, lp.double(), idx, labels, ignore_index=ignore_index, **options)

    student = values(gen, shape, scale, dtype)
    assume_rest_masses(options, logprobs, indices, student)
    loss, grads, expected, ref_grads, sizes = run_both(mine, ref, [store(student, s_layout)], args, gen, sizes=True)
    check_loss(loss, expected, dtype, soft_weight(options))
    if not torch.isfinite(expected).all():
        return  # reverse KL against a teacher rest mass of 0 (rounded top-k): +inf, as the reference
    log_ratio = float(student.double().abs().max()) / options["temperature"] * 2 if student.numel() else 0.0
    check_grads(grads, ref_grads, grad_tol(dtype, options["divergence"], log_ratio), [dtype], sizes)


@prop(examples=16)
def test_fused_linear_sparse_distill_loss(backend, data):
    """fused_linear_sparse_distill_loss: chunk sizes, bias, layouts, both rest masses."""
    small = interpreted(backend)
    gen, dtype, lead, vocab = draw_sizes(data, backend, 20 if small else 200)
    hs = data.draw(st.integers(1, 8 if small else 24), label="Hs")
    has_bias = data.draw(st.booleans(), label="student_bias")
    chunk_size = data.draw(st.sampled_from([None, 1, 3]), label="chunk_size")
    h_layout = data.draw(st.sampled_from(LAYOUTS), label="hidden layout")
    w_layout = data.draw(st.sampled_from(LAYOUTS[:3]), label="weight layout")
    labels, ignore_index = draw_labels(data, gen, lead, vocab, required=False)
    options = sparse_options(data, labels)
    logprobs, indices = draw_topk(data, gen, lead, vocab, options["temperature"], dtype)
    note(f"lead {lead}, V {vocab}, H {hs}, K {indices.shape[-1]}, dtype {dtype}, layouts {h_layout}/{w_layout}, "
         f"bias {has_bias}, chunk {chunk_size}, options {options}")
    leaves, args = student_lm_head(gen, lead, vocab, hs, dtype, h_layout, w_layout, 1.0, has_bias)

    assume_rest_masses(options, logprobs, indices, torch.nn.functional.linear(*(
        None if x is None else x.double() for x in args(leaves))))

    def mine(h, w, b):
        return kdops.fused_linear_sparse_distill_loss(h, w, logprobs, indices, labels, student_bias=b,
                                                      ignore_index=ignore_index, chunk_size=chunk_size,
                                                      backend=backend, **options)

    def ref(h, w, b):
        return reference.fused_linear_sparse_distill_loss(h, w, logprobs.double(), indices, labels, student_bias=b,
                                                          ignore_index=ignore_index, **options)

    loss, grads, expected, ref_grads = run_both(mine, ref, leaves, args, gen)
    logits = torch.nn.functional.linear(*(x.double() for x in args(leaves)[:2]))
    check_fused(loss, expected, grads, ref_grads, dtype, (float(logits.abs().max()) if logits.numel() else 0.0) + 4.0,
                options["temperature"])


# ------------------------------------------------------------------------------- relation-based


def exact_close_pairs(backend: str, name: str) -> bool:
    """Whether ``backend`` computes ``name``'s distances of near-duplicates to the normal
    tolerance (test_near_duplicate_distances xfails the others, naming why)."""
    return backend in ("torch", "triton", "cpu")


def draw_features(data, gen, backend, min_batch, dtype, label, near_duplicates=True):
    """Features ``(B, ...)``: B from ``min_batch``, one to three feature dims, near-duplicate
    rows (clusters) or exact duplicates sometimes (``near_duplicates``)."""
    small = interpreted(backend)
    batch = data.draw(st.integers(min_batch, 9 if small else 40), label=f"B ({label})")
    dims = tuple(data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=3).filter(
        lambda d: math.prod(d) <= (16 if small else 200)), label=f"dims ({label})"))
    kinds = ["normal", "scaled"] + (["clustered", "duplicated"] if near_duplicates else [])
    kind = data.draw(st.sampled_from(kinds), label=f"values ({label})")
    x = torch.randn((batch, *dims), generator=gen, dtype=torch.float64)
    if kind == "clustered":  # samples 1e-3 apart around a few centres far from the origin
        centres = torch.randn((3, *dims), generator=gen, dtype=torch.float64) * 10 + 30
        x = centres[torch.arange(batch) % 3] + 1e-3 * x
    elif kind == "duplicated":
        x[batch // 2:] = x[: batch - batch // 2].clone()
    elif kind == "scaled":
        x = x * data.draw(st.sampled_from([1e-3, 1e3]), label=f"scale ({label})")
    return x.to(dtype), kind


RELATION = {
    "similarity_preserving": (kdops.similarity_preserving_loss, reference.similarity_preserving_loss, 1),
    "rkd_distance": (kdops.rkd_distance_loss, reference.rkd_distance_loss, 2),
    "rkd_angle": (kdops.rkd_angle_loss, reference.rkd_angle_loss, 3),
}


@prop(examples=20)
def test_affinity(backend, data):
    """affinity: every kind, (B, ...) features from B = 1, layouts, clustered / duplicated rows."""
    gen = generator(data)
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    kind = data.draw(st.sampled_from(["dot", "cosine", "euclidean", "squared_euclidean"]), label="kind")
    x, values_kind = draw_features(data, gen, backend, 1, dtype, "x",
                                   near_duplicates=kind in ("dot", "cosine") or exact_close_pairs(backend, kind))
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    shape = tuple(x.shape)
    note(f"x {shape} {values_kind}, dtype {dtype}, layout {layout}, kind {kind}")

    def args(leaves):
        return (view(leaves[0], layout, shape),)

    loss, grads, expected, ref_grads = run_both(lambda v: kdops.affinity(v, kind, backend=backend),
                                                lambda v: reference.affinity(v, kind), [store(x, layout)], args, gen)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    close_to_max(loss, expected, RELATION_LOSS_TOL[dtype], dtype)
    assert grads[0].dtype == dtype
    # the gradient's size without cancellation: sum_j |dA_ij + dA_ji| times dA/dx's size
    rows = x.double().reshape(x.shape[0], -1).norm(dim=1)
    size = {"dot": float(rows.max()), "cosine": 1.0 / max(float(rows.min()), 1e-12), "euclidean": 1.0,
            "squared_euclidean": 2.0 * float(rows.max())}[kind]
    floor = 2.0 * x.shape[0] * size * 1.5 * expanded_copies(layout, shape)  # |dA| < 1.5 (backward_weights)
    # a gradient beyond the dtype's range rounds to inf, correctly (float16 "dot" of an expanded
    # B = 14 leaf of 144 features: -67287 > 65504): such draws are not compared
    assume(float(ref_grads[0].abs().max()) * (1 + RELATION_GRAD_TOL[dtype][0]) < torch.finfo(dtype).max)
    close_to_max(grads[0], ref_grads[0], RELATION_GRAD_TOL[dtype], dtype, floor)


@pytest.mark.parametrize("name", list(RELATION))
def test_relation_losses(name):
    """SP, RKD-D, RKD-A (each backend): B from its minimum, smooth-L1 beta, layouts, duplicates."""
    fn, ref_fn, min_batch = RELATION[name]

    def body(backend, data):
        gen = generator(data)
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        near = name == "similarity_preserving" or exact_close_pairs(backend, name)
        x, values_kind = draw_features(data, gen, backend, min_batch, dtype, "f_s", near_duplicates=near)
        dims_t = tuple(data.draw(st.lists(st.integers(1, 7), min_size=1, max_size=2), label="teacher dims"))
        f_t = torch.randn((x.shape[0], *dims_t), generator=gen, dtype=torch.float64).to(dtype)
        layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
        options = {}
        if name != "similarity_preserving":
            options["smooth_l1_beta"] = data.draw(st.sampled_from([0.0, 0.5, 1.0, 3.0]), label="smooth_l1_beta")
        shape = tuple(x.shape)
        f_t = laid_out(f_t, data.draw(st.sampled_from(LAYOUTS[:3]), label="teacher layout"))
        note(f"f_s {shape} {values_kind}, f_t {tuple(f_t.shape)}, dtype {dtype}, layout {layout}, {options}")

        def args(leaves):
            return view(leaves[0], layout, shape), f_t

        ref_options = {"smooth_l1_beta": options["smooth_l1_beta"]} if options else {}
        loss, grads, expected, ref_grads = run_both(
            lambda s, t: fn(s, t, backend=backend, **options), lambda s, t: ref_fn(s, t.double(), **ref_options),
            [store(x, layout)], args, gen)
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        # normalised quantities (|cos| <= 1, d / mu ~ 1): the loss's natural size is 1, the
        # gradient's 1 / (B * the typical distance or norm); exact 0s (1-D angles) are rounding
        close_to_max(loss, expected, RELATION_LOSS_TOL[dtype], dtype, floor=1.0)
        assert grads[0].dtype == dtype
        rows = x.double().reshape(x.shape[0], -1)
        if name == "rkd_distance" and x.shape[0] == 2 and options["smooth_l1_beta"] == 0.0:
            # B = 2: d / mu is 1 for both models, the loss a constant, and L1's gradient sign(rounding):
            # the reference's d / mu is exactly 1, the Triton backend's 1 +- 1 ulp (its distance tiles
            # recomputed in other shapes than the mean's: KDOPS_HYPOTHESIS_SEED=3657762621 gave 0.4);
            # what holds is the subgradient's bound |dL/dx| <= 2 / mu per stored element
            mu = float(torch.pdist(rows).mean())
            bound = 2.0 * expanded_copies(layout, shape) / mu * (1 + 1e-6)
            assert bool(torch.isfinite(grads[0]).all()) and float(grads[0].abs().max()) <= bound
            return
        typical = float(torch.cdist(rows, rows).mean() if name != "similarity_preserving" else rows.norm(dim=1).mean())
        typical = max(typical, 1e-3 * float(rows.abs().max()), 1e-30)
        if name == "rkd_angle" and rows.shape[1] == 1 and x.shape[0] > 1:
            # 1-D: every angle is 0 or 180 degrees and the gradient 0, up to the rounding of terms
            # ~ 1 / (B * the closest distance) (clustered rows: 1e-3)
            gaps = torch.cdist(rows, rows)
            typical = min(typical, float(gaps[gaps > 0].min())) if bool((gaps > 0).any()) else typical
        close_to_max(grads[0], ref_grads[0], RELATION_GRAD_TOL[dtype], dtype,
                     floor=expanded_copies(layout, shape) / (x.shape[0] * typical))

    for backend in BACKENDS:
        if not kdops.available_backends()[backend].available:
            continue
        seed(SEED)(budget(backend, 10)(given(data=st.data())(lambda data: body(backend, data))))()


# ------------------------------------------------------------------------------- feature-based


@settings(max_examples=20 * EXAMPLES_FACTOR)
@seed(SEED)
@given(data=st.data())
def test_hint_and_attention_transfer(data):
    """hint_loss (no adapter and a kdops.nn.Adapter) and attention_transfer_loss (p >= 1)."""
    gen = generator(data)
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    batch = data.draw(st.integers(1, 5), label="B")  # B = 0: test_attention_transfer_empty_batch
    spatial = tuple(data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=2), label="spatial"))
    cs, ct = data.draw(st.integers(1, 6), label="C_s"), data.draw(st.integers(1, 6), label="C_t")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    p = data.draw(st.sampled_from([1.0, 2.0, 3.5]), label="p")
    with_adapter = data.draw(st.booleans(), label="adapter")
    shape = (batch, cs, *spatial)
    f_s = values(gen, shape, 1.0, dtype)
    f_t = values(gen, (batch, ct, *spatial), 1.0, dtype)
    note(f"f_s {shape}, f_t {tuple(f_t.shape)}, dtype {dtype}, layout {layout}, p {p}, adapter {with_adapter}")
    leaves = [store(f_s, layout)]

    def args(leaves):
        return (view(leaves[0], layout, shape),)

    at, at_grads, at_ref, at_ref_grads = run_both(
        lambda s: kdops.attention_transfer_loss(s, f_t, p=p),
        lambda s: reference.attention_transfer_loss(s, f_t.double(), p),
        leaves, args, gen)
    close_to_max(at, at_ref, RELATION_LOSS_TOL[dtype], dtype)
    # the maps are normalised: gradients cancel to 0 (B = C = 1, ...), leaving rounding of size 1/|f|
    close_to_max(at_grads[0], at_ref_grads[0], RELATION_GRAD_TOL[dtype], dtype, floor=1.0)
    if with_adapter and dtype in (torch.float32, torch.float64):  # bf16 / fp16 adapters round their output
        adapter = kdops.nn.Adapter(cs, ct).to(dtype)
        adapter64 = kdops.nn.Adapter(cs, ct).double()
        adapter64.load_state_dict({k: v.double() for k, v in adapter.state_dict().items()})
        target = f_t
    else:
        adapter = adapter64 = None
        target = values(gen, shape, 1.0, dtype)
    hint, hint_grads, hint_ref, hint_ref_grads = run_both(
        lambda s: kdops.hint_loss(s, target, adapter=adapter),
        lambda s: reference.hint_loss(s, target.double(), adapter64),
        leaves, args, gen)
    close_to_max(hint, hint_ref, RELATION_LOSS_TOL[dtype], dtype)
    close_to_max(hint_grads[0], hint_ref_grads[0], RELATION_GRAD_TOL[dtype], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)], ids=["B = 0", "HW = 0"])
def test_attention_transfer_empty(shape, dtype):
    """An empty batch or spatial map: as hint_loss, the mean of nothing (NaN, float32 or float64)
    and a zero gradient of f_s's shape and dtype (the AT map's reshape(B, -1) raised at B = 0)."""
    f_s = torch.randn(shape, dtype=torch.float64).to(dtype).requires_grad_(True)
    f_t = torch.randn((shape[0], 2, *shape[2:]), dtype=torch.float64).to(dtype)
    loss = kdops.attention_transfer_loss(f_s, f_t)
    hint = kdops.hint_loss(f_s, f_s.detach() + 1)
    assert loss.shape == hint.shape == () and loss.dtype == hint.dtype
    assert math.isnan(float(loss)) and math.isnan(float(hint))
    assert math.isnan(float(reference.attention_transfer_loss(f_s.double(), f_t.double())))
    loss.backward()
    assert f_s.grad.shape == f_s.shape and f_s.grad.dtype == dtype


# ------------------------------------------------------------------------------- near-duplicates
# Distances of samples much closer to each other than to the batch mean: the Gram form
# n_i + n_j - 2 x_i.x_j cancels there (1-D features, B = 257: ~1% gradient error before the
# kernels centred the batch and recomputed close pairs from differences, kdops._codes.CLOSE_PAIR_RATIO).


def near_duplicates(case: str, backend: str) -> torch.Tensor:
    """float32 features whose float64 copy is the reference's input (1-D: B = 129, three tiles,
    under the Triton interpreter)."""
    gen = torch.Generator().manual_seed(16)
    if case == "1-D, B = 257":
        return torch.randn(129 if interpreted(backend) else 257, 1, generator=gen)
    if case == "clustered":  # 3 clusters of spread 1e-3 around centres ~30 from the origin
        centres = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 10 + 30
        return (centres[torch.arange(40) % 3] + 1e-3 * torch.randn(40, 5, generator=gen, dtype=torch.float64)).float()
    rows = torch.randn(20, 4, generator=gen) + 100  # "duplicated": every sample twice, far from 0
    return torch.cat([rows, rows, rows[:3] + 1e-4])


NEAR_DUPLICATE_CASES = ["1-D, B = 257", "clustered", "duplicated"]
DISTANCE_LOSSES = {
    "euclidean": lambda x, t, **kw: (kdops.affinity(x, "euclidean", **kw) * t).sum(),
    "squared_euclidean": lambda x, t, **kw: (kdops.affinity(x, "squared_euclidean", **kw) * t).sum(),
    "rkd_distance": lambda x, t, **kw: kdops.rkd_distance_loss(x, t, **kw),
    "rkd_angle": lambda x, t, **kw: kdops.rkd_angle_loss(x, t, **kw),
}
REFERENCE_DISTANCE_LOSSES = {
    "euclidean": lambda x, t: (reference.affinity(x, "euclidean") * t).sum(),
    "squared_euclidean": lambda x, t: (reference.affinity(x, "squared_euclidean") * t).sum(),
    "rkd_distance": reference.rkd_distance_loss,
    "rkd_angle": reference.rkd_angle_loss,
}


def near_duplicate_params():
    for case in NEAR_DUPLICATE_CASES:
        for name in DISTANCE_LOSSES:
            for backend in BACKENDS:
                marks = []
                if name == "rkd_angle" and case == "1-D, B = 257":
                    continue  # 1-D angles are all 0 or 180 degrees: the gradient is 0 (test_affinity)
                yield pytest.param(backend, name, case, marks=marks, id=f"{case}-{name}-{backend}")


@pytest.mark.parametrize("backend, name, case", near_duplicate_params())
def test_near_duplicate_distances(backend, name, case):
    """Values and gradients of distance-based losses on near-duplicate samples within the normal
    float32 tolerance of the float64 reference (on the same float32 inputs)."""
    require(backend)
    x = near_duplicates(case, backend)
    B = x.shape[0]
    if name.startswith("rkd"):
        other = torch.randn(B, 3, generator=torch.Generator().manual_seed(1))
    else:
        other = torch.randn(B, B, generator=torch.Generator().manual_seed(1))
    s = x.clone().requires_grad_(True)
    loss = DISTANCE_LOSSES[name](s, other, backend=backend)
    loss.backward()
    s64 = x.double().requires_grad_(True)
    expected = REFERENCE_DISTANCE_LOSSES[name](s64, other.double())
    expected.backward()
    close_to_max(loss, expected, RELATION_LOSS_TOL[torch.float32], torch.float32, floor=1.0)
    close_to_max(s.grad, s64.grad, RELATION_GRAD_TOL[torch.float32], torch.float32)
    if name in ("euclidean", "squared_euclidean"):  # every duplicate pair's distance: exactly the clamp
        a = kdops.affinity(x, name, backend=backend)
        same = (x[:, None, :] == x[None, :, :]).all(-1) & ~torch.eye(B, dtype=torch.bool)
        assert (a[same] == (1e-6 if name == "euclidean" else 0.0)).all()


def test_reference_distances_are_exact_for_close_pairs():
    """The oracle's own float32 evaluation (the "torch" backend) centres and recomputes close
    pairs: a pair 1e-4 apart at distance 100 from the origin gets its distance to 1e-3."""
    x = torch.tensor([[100.0, 100.0], [100.0, 100.0001], [90.0, 80.0]])
    d = reference.pairwise_squared_distances(x)
    exact = ((x.double()[0] - x.double()[1]) ** 2).sum()
    assert abs(float(d[0, 1]) - float(exact)) <= 1e-3 * float(exact)


# ------------------------------------------------------------------------------- skew KL at beta = 0
# At beta = 0 the skew divergences are forward / reverse KL (M = p_s, resp. p_t). The kernels
# compute q = -(1 - b) p_s p_t / M and b p_s / M in log space: where p_s (and M) underflow to 0 the
# gradient stays exact (a mask on p_t > 0 & p_s > 0 dropped it; 0 * exp(inf) made it NaN).

SKEW_BACKENDS = BACKENDS + ["distributed"]  # vocab_parallel_distill_loss without a group: its own terms
SKEW_KL = {"skew_forward_kl": "forward_kl", "skew_reverse_kl": "reverse_kl"}
SKEW_BETAS = [0.0, 1e-6, 0.5, 1.0 - 1e-6]
SKEW_CASES = {  # divergence -> the exact gradient at student [0, 1000], teacher [1000, 0], T = 1
    "skew_forward_kl": [[-1.0, 1.0]],  # = forward KL: p_s - p_t (the kernels gave [0, 0])
    "skew_reverse_kl": [[0.0, 0.0]],  # = reverse KL: p_s (log p_s - log p_t - KL) = 0 (the kernels gave NaN)
}


def skew_loss(backend: str, s: torch.Tensor, t: torch.Tensor, **options) -> torch.Tensor:
    if backend == "distributed":
        return kdops.distributed.vocab_parallel_distill_loss(s, t, **options)
    require(backend)
    return kdops.distill_loss(s, t, backend=backend, **options)


@pytest.mark.parametrize("divergence", list(SKEW_CASES))
@pytest.mark.parametrize("backend", SKEW_BACKENDS)
def test_skew_kl_beta_0_underflow(backend, divergence):
    """The minimal example test_distill_loss found, float64: p_s[0] = p_t[1] = exp(-1000) = 0."""
    s = torch.tensor([[0.0, 1000.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1000.0, 0.0]], dtype=torch.float64)
    loss = skew_loss(backend, s, t, temperature=1.0, divergence=divergence, beta=0.0)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(1000.0, dtype=torch.float64))  # KL = 1000 both ways
    torch.testing.assert_close(s.grad, torch.tensor(SKEW_CASES[divergence], dtype=torch.float64))


def skew_inputs(gen: torch.Generator, dtype: torch.dtype, masked: tuple) -> tuple:
    """[6, 37] student / teacher logits: rows 0-1 of scale 1, rows 2-4 of scale 1e3 (at T <= 2
    most probabilities underflow to 0, in float64 too), row 5 the minimal example padded with 0;
    -inf logits (30 %, column 0 and row 5 kept) in ``masked`` ("student", "teacher")."""
    n, v = 6, 37
    scale = torch.tensor([1.0, 1.0, 1e3, 1e3, 1e3, 0.0], dtype=torch.float64)[:, None]
    logits = []
    for who in ("student", "teacher"):
        x = torch.randn((n, v), generator=gen, dtype=torch.float64) * scale
        x[5, 1 if who == "student" else 0] = 1000.0
        if who in masked:
            mask = torch.rand((n, v), generator=gen) < 0.3
            mask[:, 0] = mask[5] = False
            x = x.masked_fill(mask, -math.inf)
        logits.append(x.to(dtype))
    return tuple(logits)


def kl_weighting_side(divergence: str) -> str:
    """The distribution weighting the KL's log-ratio: -inf logits there keep the loss finite."""
    return "teacher" if divergence == "skew_forward_kl" else "student"


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the compute dtype (float32 for 16-bit inputs)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", list(SKEW_KL))
@pytest.mark.parametrize("backend", SKEW_BACKENDS)
def test_skew_kl_at_beta_0_is_kl(backend, divergence, dtype):
    """At beta = 0 a skew divergence is forward / reverse KL on the same backend, loss and gradient,
    to the rounding of a different summation (derived below), with underflowing probabilities and
    -inf logits, in every dtype."""
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    s, t = skew_inputs(gen, dtype, (kl_weighting_side(divergence),))
    temperature = 1.0
    results = []
    for div in (divergence, SKEW_KL[divergence]):
        leaf = s.clone().requires_grad_(True)
        loss = skew_loss(backend, leaf, t, temperature=temperature, divergence=div, beta=0.0, reduction="sum")
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    (skew, skew_grad), (kl, kl_grad) = results
    assert torch.isfinite(kl) and torch.isfinite(kl_grad).all() and skew_grad.dtype == dtype
    # The terms d_i are the same numbers (log M = log p_s, resp. log p_t, exactly at b = 0); the row
    # sums may add them in another order: |error| <= 2 V u sum_i |d_i| per row (u: unit roundoff).
    # The gradient (q_i - p_s_i S) / T has S = -1 for forward KL and S = -sum p_t (off by <= 2 V u)
    # for the skew form: up to 2 V u / T apart, times the soft weight T^2, then one rounding each to
    # the gradient dtype (up to an ulp apart: 2 eps relative).
    u, v, c = unit_roundoff(dtype), s.shape[-1], temperature**2
    log_ps, log_pt = (torch.log_softmax(x.double() / temperature, -1) for x in (s, t))
    terms = reference.divergence_terms(log_ps, log_pt, SKEW_KL[divergence], 0.0)
    assert torch.isfinite(terms).all()
    torch.testing.assert_close(skew.double(), kl.double(), rtol=0, atol=2 * v * u * c * float(terms.abs().sum()))
    torch.testing.assert_close(skew_grad.double(), kl_grad.double(), rtol=2 * torch.finfo(dtype).eps,
                               atol=2 * v * u * c / temperature)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", SKEW_BETAS)
@pytest.mark.parametrize("divergence", list(SKEW_KL))
@pytest.mark.parametrize("backend", SKEW_BACKENDS)
def test_skew_kl_against_reference(backend, divergence, beta, dtype):
    """Skew KL for beta in [0, 1) against the float64 reference, values and gradients, with
    underflowing probabilities and -inf logits: at beta > 0 in both inputs (M > 0 wherever
    p_s or p_t is: everything finite), at beta = 0 on the KL's weighting side only."""
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    masked = ("student", "teacher") if beta > 0 else (kl_weighting_side(divergence),)
    s, t = skew_inputs(gen, dtype, masked)
    options = dict(temperature=2.0, divergence=divergence, beta=beta, reduction="none")
    leaf, leaf64 = s.clone().requires_grad_(True), s.double().clone().requires_grad_(True)
    loss = skew_loss(backend, leaf, t, **options)
    expected = reference.distill_loss(leaf64, t.double(), **options)
    weights = torch.rand(expected.shape, generator=gen, dtype=torch.float64) + 0.5
    (loss * weights.to(loss.dtype)).sum().backward()
    (expected * weights).sum().backward()
    assert torch.isfinite(expected).all() and torch.isfinite(leaf64.grad).all()
    assert torch.isfinite(loss).all() and torch.isfinite(leaf.grad).all()
    check_loss(loss.detach(), expected.detach(), dtype, options["temperature"] ** 2)
    finite = torch.cat([x[torch.isfinite(x)].double() for x in (s, t)])
    log_ratio = 2 * float(finite.abs().max()) / options["temperature"]
    check_grads([leaf.grad], [leaf64.grad], grad_tol(dtype, divergence, log_ratio), [dtype])


INFINITE_KL = {  # divergence (beta 0) -> (student, teacher): a finite logit 300 below its row's max
    # where the other distribution's logit is -inf: p = exp(-300) underflows in float32 (not float64)
    "reverse_kl": ([0.0, -300.0, 1.0], [0.5, -math.inf, 1.0]),
    "skew_reverse_kl": ([0.0, -300.0, 1.0], [0.5, -math.inf, 1.0]),
    "forward_kl": ([0.5, -math.inf, 1.0], [0.0, -300.0, 1.0]),
    "skew_forward_kl": ([0.5, -math.inf, 1.0], [0.0, -300.0, 1.0]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", list(INFINITE_KL))
@pytest.mark.parametrize("backend", SKEW_BACKENDS)
def test_kl_against_a_zero_probability_is_infinite(backend, divergence, dtype):
    """KL(p || q) is +inf where q = 0 < p, also where p's float32 value underflows to 0 (the
    masks are on log p > -inf, not on the rounded p; found by test_distill_loss: a float32 loss
    of 1330 against the reference's inf), in every dtype and on every backend, as the reference."""
    s, t = (torch.tensor([row], dtype=torch.float64).to(dtype) for row in INFINITE_KL[divergence])
    options = dict(temperature=1.0, divergence=divergence, beta=0.0, reduction="sum")
    assert float(reference.distill_loss(s.double(), t.double(), **options)) == math.inf
    assert float(skew_loss(backend, s.clone(), t, **options)) == math.inf
    finite_s = s.masked_fill(s == -math.inf, -300.0)  # both finite: no infinite log-ratio, a finite loss
    finite_t = t.masked_fill(t == -math.inf, -300.0)
    assert math.isfinite(float(skew_loss(backend, finite_s, finite_t, **options)))
