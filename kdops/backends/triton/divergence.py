"""The divergence math of kdops as ``@triton.jit`` helpers, written once for every Triton kernel.

They mirror ``csrc/common/divergence.h`` (same formulas, same codes as
:mod:`kdops.divergences`) and work elementwise on scalars or block tensors of any shape.
With ``ls``, ``lt`` the student / teacher log-probabilities of one element,
``divergence_term`` returns ``d`` (its contribution to the row divergence ``D = sum d``) and
``q = p_s * dD/dp_s`` up to a per-row constant times ``p_s``; with ``S = sum q`` the gradient
with respect to the student logits is ``dD/ds_i = (q_i - p_s_i * S) / T``.
"""
import triton
import triton.language as tl

FORWARD_KL: tl.constexpr = tl.constexpr(0)
REVERSE_KL: tl.constexpr = tl.constexpr(1)
JSD: tl.constexpr = tl.constexpr(2)
SKEW_FORWARD_KL: tl.constexpr = tl.constexpr(3)
SKEW_REVERSE_KL: tl.constexpr = tl.constexpr(4)
TVD: tl.constexpr = tl.constexpr(5)
# The kd family's DeiT hard target (CE against the teacher's argmax): no per-element term, the
# kd kernel handles it (kdops._codes.KD_DIVERGENCES).
HARD: tl.constexpr = tl.constexpr(6)


@triton.jit
def log1p(x):
    """log(1 + x) for x >= 0, accurate for small x: log(u) + (x - (u - 1)) / u with u = 1 + x
    rounded (u - 1 is exact, so x - (u - 1) is the rounding error of u)."""
    u = 1.0 + x
    return tl.log(u) + (x - (u - 1.0)) / u


@triton.jit
def log_add_exp(a, b):
    """log(exp(a) + exp(b)) = hi + log1p(exp(lo - hi)); -inf when both are -inf (hi = -inf is
    replaced by 0 in lo - hi, so that (-inf) - (-inf) never makes a NaN)."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return hi + log1p(tl.exp(lo - tl.where(hi == float("-inf"), 0.0, hi)))


@triton.jit
def times(lp, p, x):
    """p * x for the probability p = exp(lp), masked on lp, not on the rounded p: 0 where p = 0
    (lp = -inf) whatever x; +inf where x = +inf (a log-ratio against a zero probability) and
    lp > -inf, also where exp(lp) underflows to 0."""
    return tl.where(lp > float("-inf"), tl.where(x == float("inf"), float("inf"), p * x), 0.0)


@triton.jit
def divergence_term(ls, lt, beta, log_b, log_1mb, DIV: tl.constexpr):
    """(d, q) of divergence DIV at log-probabilities ls (student), lt (teacher); ``log_b``,
    ``log_1mb`` = log(beta) (-inf for beta = 0), log(1 - beta) of the mixtures M below."""
    ps = tl.exp(ls)
    pt = tl.exp(lt)
    if DIV == FORWARD_KL:  # KL(p_t || p_s)
        d = times(lt, pt, lt - ls)
        q = -pt
    elif DIV == REVERSE_KL:  # KL(p_s || p_t)
        d = times(ls, ps, ls - lt)
        q = d
    elif DIV == JSD:  # b KL(p_t || M) + (1 - b) KL(p_s || M), M = b p_t + (1 - b) p_s
        lm = log_add_exp(log_b + lt, log_1mb + ls)
        qs = times(ls, ps, ls - lm)
        d = beta * times(lt, pt, lt - lm) + (1.0 - beta) * qs
        q = (1.0 - beta) * qs
    elif DIV == SKEW_FORWARD_KL:  # KL(p_t || M), M = b p_t + (1 - b) p_s
        lm = log_add_exp(log_b + lt, log_1mb + ls)
        d = times(lt, pt, lt - lm)
        # q = -(1 - b) p_s p_t / M in log space, exact where p_s, p_t and M underflow (masked on
        # ls > -inf, not p_s > 0); at b = 0, ls - lm = 0 exactly: forward KL's q = -p_t
        q = tl.where(ls > float("-inf"), -(1.0 - beta) * tl.exp(lt + (ls - lm)), 0.0)
    elif DIV == SKEW_REVERSE_KL:  # KL(p_s || M), M = b p_s + (1 - b) p_t
        lm = log_add_exp(log_b + ls, log_1mb + lt)
        d = times(ls, ps, ls - lm)
        # b p_s / M: in [0, 1] for b > 0; 0 at b = 0, also where M = p_t = 0 (0 * inf is NaN)
        q = times(ls, ps, ls - lm - tl.where(beta > 0.0, beta * tl.exp(ls - lm), 0.0))
    else:  # TVD: 0.5 sum |p_s - p_t|
        diff = ps - pt
        d = 0.5 * tl.abs(diff)
        q = tl.where(diff > 0.0, 0.5 * ps, tl.where(diff < 0.0, -0.5 * ps, 0.0))
    return d, q
