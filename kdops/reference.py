"""The plain-PyTorch oracle: every kdops loss written as readably as possible.

Every backend is tested against these functions, usually evaluated in float64. They
materialise every intermediate, so they are also the ``"torch"`` backend: correct
everywhere, differentiable by autograd, but memory-hungry.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from kdops._codes import CLOSE_PAIR_RATIO


def _upcast(x: Tensor) -> Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def hard_label_cross_entropy(logits: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """``-log softmax(logits)[label]`` per row (label 0 where not ``valid``). Through
    ``log_softmax``, which subtracts the row max before the log-sum-exp: the softmax of its
    gradient stays accurate in float32 at |logits| ~ 1e4, where ``logsumexp(s) - s[label]``
    would round the log-sum-exp to the ulp of 1e4."""
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    return -torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)


def with_hard_labels(row: Tensor, logits: Tensor, labels: Optional[Tensor], hard_weight: float,
                     ignore_index: int) -> tuple[Tensor, Tensor]:
    """``row + hard_weight * CE(logits, label)`` per row, 0 where the label is ``ignore_index``,
    and the ``[N]`` mask of rows that count (every row without labels, ``row`` unchanged)."""
    if labels is None:
        return row, torch.ones(row.shape, dtype=torch.bool, device=row.device)
    valid = labels != ignore_index
    if hard_weight > 0:
        row = row + hard_weight * hard_label_cross_entropy(logits, labels, valid)
    return torch.where(valid, row, torch.zeros_like(row)), valid


def _times(log_p: Tensor, x: Tensor) -> Tensor:
    """p * x for the probability p = exp(log_p), with the masks on log p, not on the rounded p:
    0 where p = 0 (log_p = -inf) whatever x, and +inf where x = +inf (a log-ratio against a zero
    probability) and log_p > -inf, also where exp(log_p) underflows to 0. x is masked before the
    product: 0 * -inf (a -inf student logit) would make its gradient NaN."""
    live = log_p > -math.inf
    infinite = live & (x == math.inf)
    return torch.where(infinite, math.inf, log_p.exp() * torch.where(live & ~infinite, x, torch.zeros_like(x)))


def soft_divergence(
    log_ps: Tensor, log_pt: Tensor, divergence: str, beta: float
) -> Tensor:
    """Per-row divergence between the rows of log-probabilities ``log_ps`` (student) and
    ``log_pt`` (teacher), both ``[N, V]``; see :mod:`kdops.divergences` for the formulas."""
    return divergence_terms(log_ps, log_pt, divergence, beta).sum(-1)


def divergence_terms(log_ps: Tensor, log_pt: Tensor, divergence: str, beta: float) -> Tensor:
    """The ``[..., V]`` terms whose sum over the last dimension is :func:`soft_divergence`."""
    if divergence == "forward_kl":
        terms = _times(log_pt, log_pt - log_ps)
    elif divergence == "reverse_kl":
        terms = _times(log_ps, log_ps - log_pt)
    elif divergence == "tvd":
        terms = 0.5 * (log_pt.exp() - log_ps.exp()).abs()
    else:
        # log of the mixture, computed in log space: log(w_a * exp(a) + w_b * exp(b)). Where both
        # weighted parts are 0 (M = 0: -inf logits in both inputs), log M = -inf is filled in after
        # logaddexp of finite stand-ins: its gradient exp(a - out) would be exp(-inf + inf) = NaN.
        def log_mix(w_a: float, a: Tensor, b: Tensor) -> Tensor:
            la = math.log(w_a) if w_a > 0 else -math.inf
            lb = math.log(1.0 - w_a)
            x, y = a + la, b + lb
            empty = torch.isneginf(x) & torch.isneginf(y)
            return torch.logaddexp(x.masked_fill(empty, 0.0), y.masked_fill(empty, 0.0)).masked_fill(empty, -math.inf)

        if divergence == "jsd":
            log_m = log_mix(beta, log_pt, log_ps)
            terms = beta * _times(log_pt, log_pt - log_m) + (1 - beta) * _times(log_ps, log_ps - log_m)
        elif divergence == "skew_forward_kl":
            log_m = log_mix(beta, log_pt, log_ps)
            terms = _times(log_pt, log_pt - log_m)
        elif divergence == "skew_reverse_kl":
            log_m = log_mix(beta, log_ps, log_pt)
            terms = _times(log_ps, log_ps - log_m)
        else:
            raise ValueError(f"unknown divergence {divergence!r}")
    return terms


def teacher_log_probs(
    teacher_logits: Tensor, temperature: float, teacher_weights: Optional[Tensor] = None,
    student_dim: Optional[int] = None,
) -> Tensor:
    """``log p_t`` of teacher logits ``(..., V)``, or of ``K`` teachers ``(K, ..., V)`` (when
    ``teacher_logits.dim() == student_dim + 1``) mixed with weights ``w`` (default ``1/K``)::

        p_t = sum_k w_k softmax(t_k / T)
        log p_t = logsumexp_k(log w_k + log_softmax(t_k / T))
    """
    log_pt = torch.log_softmax(teacher_logits / temperature, dim=-1)
    if student_dim is None or teacher_logits.dim() == student_dim:
        return log_pt
    k = teacher_logits.shape[0]
    w = (torch.full((k,), 1.0 / k, dtype=log_pt.dtype, device=log_pt.device) if teacher_weights is None
         else torch.as_tensor(teacher_weights, dtype=log_pt.dtype, device=log_pt.device).detach())
    log_w = w.log().reshape((k,) + (1,) * (log_pt.dim() - 1))
    return torch.logsumexp(log_w + log_pt, dim=0)


def weighted_row_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor],
    *,
    temperature: float,
    divergence: str,
    beta: float,
    hard_weight: float,
    soft_weight: float,
    ignore_index: int,
    teacher_weights: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``row = hard_weight * CE(student, label) + soft_weight * D(p_t, p_s)`` on ``[N, V]``
    logits, rows whose label is ``ignore_index`` set to 0; returns the rows and the ``[N]``
    mask of rows that count. Computed in float32, or float64 for float64 inputs.
    ``teacher_logits`` ``[K, N, V]``: ``p_t`` is the mixture of :func:`teacher_log_probs`.
    ``divergence="hard"`` (DeiT): ``D = -log p_s[argmax]``, the argmax of the teacher logits (of
    the mixture's ``log p_t`` for K teachers), the lowest index on ties; NaN rows where a teacher
    logit is NaN."""
    s = _upcast(student_logits)
    t = _upcast(teacher_logits).to(s.dtype).detach()
    log_ps = torch.log_softmax(s / temperature, dim=-1)
    log_pt = teacher_log_probs(t, temperature, teacher_weights, student_logits.dim())
    if divergence == "hard":  # DeiT: CE against the teacher's argmax (torch.argmax: ties -> the lowest index)
        single = t.dim() == student_logits.dim()
        target = (t if single else log_pt).argmax(-1, keepdim=True)
        row = soft_weight * -log_ps.gather(-1, target).squeeze(-1)
        # a NaN teacher logit makes a counted row and its gradient NaN (torch.argmax would silently
        # pick the NaN's index), as in the kernels; an ignored row stays 0 with a zero gradient
        has_nan = t.isnan().any(-1) if single else t.isnan().any(-1).any(0)
        if labels is not None:
            has_nan = has_nan & (labels != ignore_index)
        row = row * torch.where(has_nan, math.nan, 1.0).to(row.dtype)
    else:
        row = soft_weight * soft_divergence(log_ps, log_pt, divergence, beta)
    return with_hard_labels(row, s, labels, hard_weight, ignore_index)


def distill_row_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    *,
    temperature: float = 2.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    hard_weight: float = 0.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
    teacher_weights: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Per-row loss of :func:`distill_loss` on ``[N, V]`` logits (teachers ``[N, V]`` or
    ``[K, N, V]``), and the ``[N]`` mask of rows that count. Computed in float32, or float64 for
    float64 inputs.

    ``row = a * CE(student, label) + (1 - a) * c * D(p_t, p_s)`` with ``a = hard_weight``,
    ``c = T**2`` if ``scale_by_temperature_squared`` else 1, and ``p = softmax(logits / T)``.
    Rows whose label is ``ignore_index`` are 0 and do not count.
    """
    c = temperature * temperature if scale_by_temperature_squared else 1.0
    return weighted_row_loss(
        student_logits, teacher_logits, labels, temperature=temperature, divergence=divergence,
        beta=beta, hard_weight=hard_weight, soft_weight=(1.0 - hard_weight) * c, ignore_index=ignore_index,
        teacher_weights=teacher_weights,
    )


def transform_logits(logits: Tensor, scale: float = 1.0, softcap: Optional[float] = None) -> Tensor:
    """A model's final-logit transform, applied before the temperature: ``z' = scale * z``
    (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``), then with a softcap ``c``
    ``z' = c * tanh(scale * z / c)`` (Gemma 2/3's ``final_logit_softcapping``); float32 or
    float64 (16-bit logits are upcast first)."""
    if scale == 1.0 and softcap is None:
        return logits
    z = _upcast(logits) * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row entropy ``H(p) = -sum p log p`` of ``p = softmax(logits / T)`` (float32 or float64)."""
    log_p = torch.log_softmax(_upcast(logits) / temperature, dim=-1)
    return -_times(log_p, log_p).sum(-1)


def reduce_rows(row: Tensor, valid: Tensor, reduction: str, normalizer: Union[None, int, Tensor] = None) -> Tensor:
    """``"none"``: the rows; ``"sum"``: their sum; ``"mean"``: sum / number of counted rows
    (0 when no row counts), or sum / ``normalizer`` when given (an int or a one-element tensor,
    e.g. Transformers' ``num_items_in_batch``: the counted rows of the whole accumulated batch)."""
    if reduction == "none":
        return row
    total = row.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:
        return total / (normalizer.detach().to(total).reshape(()) if isinstance(normalizer, Tensor) else normalizer)
    return total / valid.sum().clamp(min=1).to(total.dtype)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    *,
    temperature: float = 2.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    hard_weight: float = 0.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    teacher_weights: Optional[Tensor] = None,
    normalizer: Union[None, int, Tensor] = None,
) -> Tensor:
    """Reference of :func:`kdops.distill_loss` on logits of shape ``(..., V)``; ``K`` teachers
    as ``teacher_logits (K, ..., V)`` with ``teacher_weights (K,)`` (see :func:`teacher_log_probs`)."""
    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    multi = teacher_logits.dim() == student_logits.dim() + 1
    row, valid = distill_row_loss(
        student_logits.reshape(-1, V),
        teacher_logits.reshape(teacher_logits.shape[0], -1, V) if multi else teacher_logits.reshape(-1, V),
        None if labels is None else labels.reshape(-1),
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        hard_weight=hard_weight,
        scale_by_temperature_squared=scale_by_temperature_squared,
        ignore_index=ignore_index,
        teacher_weights=teacher_weights,
    )
    return reduce_rows(row, valid, reduction, normalizer).reshape(lead if reduction == "none" else ())


def fused_linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    reduction: str = "mean",
    temperature: float = 1.0,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: Optional[float] = None,
    return_entropy: bool = False,
    ignore_index: int = -100,
    **options,
):
    """Reference of :func:`kdops.fused_linear_distill_loss`: the logits, materialised (and
    transformed by :func:`transform_logits`). ``K`` teachers: ``teacher_hidden``,
    ``teacher_weight`` (and ``teacher_bias``) lists of length K, their logits stacked to
    ``(K, ..., V)``. ``return_entropy``: also the student's :func:`entropy` at ``T``, per row
    (0 where not counted) for ``reduction="none"``, else summed over the counted rows."""
    student_logits = transform_logits(torch.nn.functional.linear(student_hidden, student_weight, student_bias),
                                      student_logit_scale, student_softcap)

    def teacher(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        logits = transform_logits(torch.nn.functional.linear(h, w, b), teacher_logit_scale, teacher_softcap)
        return logits.to(student_logits.dtype)

    if isinstance(teacher_hidden, Tensor):
        teacher_logits = teacher(teacher_hidden, teacher_weight, teacher_bias)
    else:
        biases = [None] * len(teacher_hidden) if teacher_bias is None else teacher_bias
        teacher_logits = torch.stack([teacher(h, w, b) for h, w, b in zip(teacher_hidden, teacher_weight, biases)])
    loss = distill_loss(student_logits, teacher_logits, labels, temperature=temperature, reduction=reduction,
                        ignore_index=ignore_index, **options)
    if not return_entropy:
        return loss
    rows = entropy(student_logits.detach(), temperature)
    if labels is not None:
        rows = torch.where(labels != ignore_index, rows, torch.zeros_like(rows))
    return loss, rows if reduction == "none" else rows.sum()


# ---------------------------------------------------------------------------------------------
# Relation-based and feature-based distillation (issue #4): affinities, SP, RKD, FitNets, AT.
#
# Features ``(B, ...)`` are flattened per sample to rows ``x_i`` of ``X [B, D]``; student and
# teacher may have different D but share B. The teacher is a constant (detached).
# ---------------------------------------------------------------------------------------------
NORM_EPS = 1e-12  # norms are clamped to >= NORM_EPS before dividing by them (as F.normalize)
DIST_EPS2 = 1e-12  # squared distances are clamped to >= DIST_EPS2 before a square root (RKD)


def _features(x: Tensor) -> Tensor:
    """``(B, ...)`` features as ``[B, D]`` rows, half precision upcast to float32."""
    return _upcast(x).reshape(x.shape[0], math.prod(x.shape[1:]))


def _student_teacher(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    s = _features(f_s)
    return s, _features(f_t).to(s.dtype).detach()


def _off_diagonal(n: int, device: torch.device) -> Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def pairwise_squared_distances(x: Tensor) -> Tensor:
    """``d2_ij = ||x_i - x_j||^2`` of ``[B, D]`` rows -> ``[B, B]``, exact for near-duplicates.

    With ``c = x - mean(x)`` (distances do not see the shift; centring removes the batch's common
    offset) and ``n_i = ||c_i||^2``, the Gram form ``max(n_i + n_j - 2 c_i.c_j, 0)``, except for
    close pairs, ``d2 < CLOSE_PAIR_RATIO * (n_i + n_j)``, where the form cancels: those are
    recomputed from the differences of the rows themselves, ``sum_k (x_ik - x_jk)^2`` (exact
    for close values, which the rounding of ``c`` is not), as the kernels. The diagonal is
    exactly 0. Memory: ``[B, B]`` plus the ``[pairs, D]`` differences of the close pairs."""
    c = x - x.mean(0, keepdim=True)
    sq = (c * c).sum(1)
    norms = sq[:, None] + sq[None, :]
    d2 = (norms - 2.0 * (c @ c.T)).clamp(min=0.0)
    off = _off_diagonal(x.shape[0], x.device)
    i, j = ((d2 < CLOSE_PAIR_RATIO * norms) & off).nonzero(as_tuple=True)
    d2 = d2.index_put((i, j), (x[i] - x[j]).pow(2).sum(1))
    return torch.where(off, d2, torch.zeros_like(d2))


def affinity(x: Tensor, kind: str = "cosine") -> Tensor:
    """``[B, B]`` affinity of the ``(B, ...)`` samples of ``x`` (float32; float64 for float64):

    ``dot``                ``A_ij = x_i . x_j``
    ``cosine``             ``A_ij = x_i . x_j / (max(||x_i||, eps) max(||x_j||, eps))``
    ``squared_euclidean``  ``A_ij = ||x_i - x_j||^2`` (0 on the diagonal)
    ``euclidean``          ``A_ij = sqrt(max(||x_i - x_j||^2, 1e-12))`` for i != j, 0 on the diagonal
    """
    x = _features(x)
    if kind == "dot":
        return x @ x.T
    if kind == "cosine":
        n = x / x.norm(dim=1, keepdim=True).clamp(min=NORM_EPS)
        return n @ n.T
    d2 = pairwise_squared_distances(x)
    if kind == "squared_euclidean":
        return d2
    if kind == "euclidean":
        d = d2.clamp(min=DIST_EPS2).sqrt()
        return torch.where(_off_diagonal(x.shape[0], x.device), d, torch.zeros_like(d))
    raise ValueError(f"unknown affinity kind {kind!r}")


def similarity_preserving_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """SP (Tung & Mori, 2019): ``sum((G~s - G~t)^2) / B^2`` with ``G = X X^T`` and ``G~`` its
    rows divided by ``max(||G_i||, 1e-12)``."""
    s, t = _student_teacher(f_s, f_t)
    gs = F.normalize(s @ s.T, dim=1, eps=NORM_EPS)
    gt = F.normalize(t @ t.T, dim=1, eps=NORM_EPS)
    return (gs - gt).pow(2).sum() / s.shape[0] ** 2


def _rkd_distances(x: Tensor) -> Tensor:
    """``d_ij = sqrt(max(||x_i - x_j||^2, 1e-12))`` for i != j, 0 on the diagonal."""
    return affinity(x, "euclidean")


def rkd_distance_loss(f_s: Tensor, f_t: Tensor, smooth_l1_beta: float = 1.0) -> Tensor:
    """RKD-D (Park et al., 2019): with ``d`` the distances of :func:`_rkd_distances` and ``mu``
    their mean over the ``P = B(B-1)`` ordered pairs i != j, the mean over those pairs of
    ``smooth_l1(d^s_ij / mu_s, d^t_ij / mu_t)`` (smooth-L1 with ``beta = smooth_l1_beta``;
    ``beta = 0`` is L1). The diagonal terms are ``smooth_l1(0, 0) = 0``."""
    s, t = _student_teacher(f_s, f_t)
    n_pairs = s.shape[0] * (s.shape[0] - 1)
    ds, dt = _rkd_distances(s), _rkd_distances(t)
    us = ds / (ds.sum() / n_pairs)
    ut = dt / (dt.sum() / n_pairs)
    return F.smooth_l1_loss(us, ut, reduction="sum", beta=smooth_l1_beta) / n_pairs


def _rkd_cosines(x: Tensor) -> Tensor:
    """``cos[j, i, k] = n_ij . n_kj`` with ``n_ij = (x_i - x_j) / ||x_i - x_j||``, and ``n_ij``
    the constant zero vector where ``||x_i - x_j|| <= 1e-12`` (i == j, duplicate samples): such
    pairs add no gradient. Materialises ``[B, B, D]`` differences and ``[B, B, B]`` cosines."""
    e = x[None, :, :] - x[:, None, :]  # e[j, i] = x_i - x_j
    r = e.norm(dim=2, keepdim=True)
    n = torch.where(r > NORM_EPS, e / r.clamp(min=NORM_EPS), torch.zeros_like(e))
    return n @ n.transpose(1, 2)


def rkd_angle_loss(f_s: Tensor, f_t: Tensor, smooth_l1_beta: float = 1.0) -> Tensor:
    """RKD-A (Park et al., 2019): the mean over all ``B^3`` triplets (i, j, k) of
    ``smooth_l1(cos^s_ijk, cos^t_ijk)``, ``cos_ijk`` the cosine of the angle at anchor ``x_j``
    between ``x_i - x_j`` and ``x_k - x_j`` (0 when either difference is 0)."""
    s, t = _student_teacher(f_s, f_t)
    return F.smooth_l1_loss(_rkd_cosines(s), _rkd_cosines(t), beta=smooth_l1_beta)


def hint_loss(f_s: Tensor, f_t: Tensor, adapter: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """FitNets hint: ``mean((adapter(f_s) - f_t)^2)`` (no adapter: the identity)."""
    s = _upcast(f_s if adapter is None else adapter(f_s))
    return F.mse_loss(s, _upcast(f_t).to(s.dtype).detach())


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """AT map of ``(B, C, *spatial)`` features: ``F.normalize(mean_c |f_c|^p)`` flattened per
    sample to ``[B, HW]`` (the mean over channels, as the original; the L2 normalisation makes
    it equal to the sum)."""
    a = _upcast(f).abs().pow(p).mean(1).reshape(f.shape[0], math.prod(f.shape[2:]))  # B = 0: [0, HW]
    return F.normalize(a, dim=1, eps=NORM_EPS)


def attention_transfer_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0) -> Tensor:
    """AT (Zagoruyko & Komodakis, 2017): ``mean over B * HW of (a_s - a_t)^2``, ``a`` the
    :func:`attention_map` (spatial sizes must match; channel counts may differ)."""
    a_s = attention_map(f_s, p)
    return (a_s - attention_map(f_t, p).to(a_s.dtype).detach()).pow(2).mean()


# ---------------------------------------------------------------------------------------------
# Sparse (top-k) teacher distillation (issue #5): the teacher is known through its top-k
# log-probabilities ``lt_k`` at temperature T and their vocabulary indices.
# ---------------------------------------------------------------------------------------------
def sparse_buckets(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    *,
    temperature: float,
    rest_mass: str,
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities of the buckets compared by the sparse loss, ``[N, B]``.

    With ``ls = log_softmax(s / T)`` over the full vocabulary, the buckets are the K top-k
    entries, plus (when K < V) one "rest" bucket for everything else:

    * student: ``ls[idx_k]`` and ``log(sum of exp(ls) outside the top-k)``;
    * ``rest_mass="bucket"``: teacher ``lt_k`` and ``log(max(1 - sum_k exp(lt_k), 0))``;
    * ``rest_mass="ignore"``: teacher ``lt_k - logsumexp(lt)`` (renormalised to sum 1) and
      ``-inf`` (no mass). This equals :func:`distill_loss` against teacher logits ``T * lt_k``
      at the top-k and ``-inf`` elsewhere (every divergence's term is 1-homogeneous, so the
      elements outside the top-k, where p_t = 0, sum to the rest bucket's term).

    With K = V the rest is empty and there is no rest bucket.
    """
    s = _upcast(student_logits)
    lt = _upcast(topk_logprobs).to(s.dtype).detach()
    idx = topk_indices.long()
    log_ps = torch.log_softmax(s / temperature, dim=-1)
    ls_top = log_ps.gather(-1, idx)
    if rest_mass == "ignore":
        lt_top = lt - torch.logsumexp(lt, dim=-1, keepdim=True)
    else:
        lt_top = lt
    if idx.shape[-1] == s.shape[-1]:
        return ls_top, lt_top
    in_topk = torch.zeros_like(log_ps, dtype=torch.bool).scatter(-1, idx, True)
    ls_rest = torch.logsumexp(log_ps.masked_fill(in_topk, -math.inf), dim=-1, keepdim=True)
    if rest_mass == "ignore":
        lt_rest = torch.full_like(ls_rest, -math.inf)
    else:
        lt_rest = (1.0 - lt.exp().sum(-1, keepdim=True)).clamp(min=0.0).log()
    return torch.cat([ls_top, ls_rest], -1), torch.cat([lt_top, lt_rest], -1)


def sparse_distill_row_loss(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    labels: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    rest_mass: str = "ignore",
    hard_weight: float = 0.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """Per-row loss of :func:`sparse_distill_loss` on ``[N, V]`` logits and ``[N, K]`` top-k,
    and the ``[N]`` mask of rows that count:
    ``row = a * CE(s, label) + (1 - a) * c * D(teacher buckets, student buckets)`` (buckets of
    :func:`sparse_buckets`, ``a = hard_weight``, ``c = T**2`` or 1)."""
    # upcast once: both terms' gradients then add in float32 before the one rounding to the input
    # dtype (two upcasts would round each term's gradient to bf16 / fp16 and add the roundings)
    s = _upcast(student_logits)
    log_ps, log_pt = sparse_buckets(s, topk_logprobs, topk_indices, temperature=temperature, rest_mass=rest_mass)
    c = temperature * temperature if scale_by_temperature_squared else 1.0
    row = (1.0 - hard_weight) * c * soft_divergence(log_ps, log_pt, divergence, beta)
    return with_hard_labels(row, s, labels, hard_weight, ignore_index)


def sparse_distill_loss(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    labels: Optional[Tensor] = None,
    *,
    reduction: str = "mean",
    normalizer: Union[None, int, Tensor] = None,
    **options,
) -> Tensor:
    """Reference of :func:`kdops.sparse_distill_loss` on ``(..., V)`` logits and ``(..., K)`` top-k."""
    lead = student_logits.shape[:-1]
    row, valid = sparse_distill_row_loss(
        student_logits.reshape(-1, student_logits.shape[-1]),
        topk_logprobs.reshape(-1, topk_logprobs.shape[-1]),
        topk_indices.reshape(-1, topk_indices.shape[-1]),
        None if labels is None else labels.reshape(-1),
        **options,
    )
    return reduce_rows(row, valid, reduction, normalizer).reshape(lead if reduction == "none" else ())


def fused_linear_sparse_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    labels: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    **options,
) -> Tensor:
    """Reference of :func:`kdops.fused_linear_sparse_distill_loss`: the logits, materialised (and
    transformed by :func:`transform_logits`)."""
    logits = transform_logits(torch.nn.functional.linear(student_hidden, student_weight, student_bias),
                              student_logit_scale, student_softcap)
    return sparse_distill_loss(logits, topk_logprobs, topk_indices, labels, **options)


# ---------------------------------------------------------------------------------------------
# Transformer attention-relation distillation (issue 14, MiniLM / MiniLMv2): relation matrices
# ``R = softmax(a b^T / sqrt(d) / T)`` of each model, materialised here ([B, heads, L, L]).
# ---------------------------------------------------------------------------------------------
def relation_head_view(x: Tensor, heads: int) -> Tensor:
    """``[B, H, L, d]`` or ``[B, L, H*d]`` as ``[B, heads, L, H*d / heads]``: the ``H*d`` channels
    of a position (heads concatenated) split into ``heads`` equal groups (MiniLMv2's relation
    heads); ``[B, H, L, d]`` with ``heads == H`` is returned as it is."""
    if x.dim() == 4:
        if x.shape[1] == heads:
            return x
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
    batch, length, channels = x.shape
    return x.reshape(batch, length, heads, channels // heads).transpose(1, 2)


def relation_key_mask(batch: int, length: int, attention_mask: Optional[Tensor], causal: bool,
                      device: torch.device) -> tuple[Tensor, Tensor]:
    """(``keys [B, 1, L, L]``: key j enters query i's softmax, ``counted [B, L]``: query i counts).
    Keys: inside ``attention_mask`` (``[B, L]``, nonzero = real token) and, if ``causal``, j <= i.
    A query that does not count gets every key (a finite row, zeroed by the caller)."""
    counted = (torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None
               else attention_mask.to(device=device) != 0)
    keys = counted[:, None, None, :].expand(batch, 1, length, length)
    if causal:
        keys = keys & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return keys | ~counted[:, None, :, None], counted


def attention_relation_log_probs(a: Tensor, b: Tensor, keys: Tensor, temperature: float) -> Tensor:
    """``log R = log_softmax(a b^T / sqrt(d) / T)`` over the allowed ``keys`` (others ``-inf``) of
    ``a``, ``b`` ``[B, heads, L, d]``: ``[B, heads, L, L]``."""
    scores = a @ b.transpose(-1, -2) / (math.sqrt(a.shape[-1]) * temperature)
    return torch.log_softmax(scores.masked_fill(~keys, -math.inf), dim=-1)


def attention_relation_row_loss(
    student_a: Tensor, student_b: Tensor, teacher_a: Tensor, teacher_b: Tensor, *,
    relation_heads: int, causal: bool = False, attention_mask: Optional[Tensor] = None,
    temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """(rows ``[B, heads, L]``: ``D(R_t[i], R_s[i])`` per head and query, 0 where the query does
    not count; ``counted [B, L]``). ``D`` is the divergence of :func:`soft_divergence`."""
    sa = relation_head_view(_upcast(student_a), relation_heads)
    sb = relation_head_view(_upcast(student_b), relation_heads)
    ta = relation_head_view(_upcast(teacher_a).to(sa.dtype).detach(), relation_heads)
    tb = relation_head_view(_upcast(teacher_b).to(sa.dtype).detach(), relation_heads)
    keys, counted = relation_key_mask(sa.shape[0], sa.shape[2], attention_mask, causal, sa.device)
    keep = lambda log_r: torch.where(keys, log_r, -math.inf)  # noqa: E731  no gradient (0 * NaN) from excluded keys
    log_rs = keep(attention_relation_log_probs(sa, sb, keys, temperature))
    log_rt = keep(attention_relation_log_probs(ta, tb, keys, temperature))
    rows = soft_divergence(log_rs, log_rt, divergence, beta)
    return torch.where(counted[:, None, :], rows, torch.zeros_like(rows)), counted


def attention_relation_loss(
    student_a: Tensor, student_b: Tensor, teacher_a: Tensor, teacher_b: Tensor, *,
    relation_heads: Optional[int] = None, causal: bool = False, attention_mask: Optional[Tensor] = None,
    temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5, reduction: str = "mean",
) -> Tensor:
    """Reference of :func:`kdops.attention_relation_loss`: with ``R = softmax(a b^T / sqrt(d) / T)``
    per relation head and query row (``d`` the relation head size of that model),
    ``mean over counted rows x heads of D(R_t, R_s)`` (``"sum"``: the sum; ``"none"``:
    ``[B, heads, L]``). ``relation_heads`` None: the inputs' head count (``[B, H, L, d]``)."""
    heads = relation_heads if relation_heads is not None else student_a.shape[1]
    rows, counted = attention_relation_row_loss(
        student_a, student_b, teacher_a, teacher_b, relation_heads=heads, causal=causal,
        attention_mask=attention_mask, temperature=temperature, divergence=divergence, beta=beta)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (counted.sum() * heads).clamp(min=1).to(total.dtype)
