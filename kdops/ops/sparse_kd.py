"""Distillation from a sparse teacher (its top-k log-probabilities): ``kdops.sparse_distill_loss``
and ``kdops.fused_linear_sparse_distill_loss``.

The teacher of a row is known through ``lt_k``, its log-probabilities at temperature ``T`` at the
K distinct vocabulary indices ``idx_k`` (e.g. from :class:`kdops.cache.TeacherCache`). With
``ls = log_softmax(s / T)`` over the student's full vocabulary, the divergence compares K + 1
buckets: the top-k entries and, when K < V, the rest of the vocabulary:

==================  =====================================  ==========================================
bucket              student                                teacher
==================  =====================================  ==========================================
top-k entry k       ``ls[idx_k]``                          ``rest_mass="bucket"``: ``lt_k``;
                                                           ``"ignore"``: ``lt_k - logsumexp(lt)``
rest (K < V)        ``log(1 - sum_k exp(ls[idx_k]))``      ``"bucket"``: ``log(1 - sum_k exp(lt_k))``;
                                                           ``"ignore"``: ``-inf`` (no mass)
==================  =====================================  ==========================================

``"ignore"`` renormalises the teacher's top-k to sum 1; it equals :func:`kdops.distill_loss`
against teacher logits ``T * lt`` at the top-k and ``-inf`` elsewhere (so reverse KL, and skew
reverse KL with ``beta = 0``, would be ``+inf`` and are refused). ``"bucket"`` keeps the teacher's
probabilities and compares its rest mass with the student's. With K = V both are
:func:`kdops.distill_loss` on the teacher's full log-probabilities.

Row loss ``a * CE(s, label) + (1 - a) * c * D(teacher buckets, student buckets)`` with
``a = hard_weight`` and ``c = T**2`` (``scale_by_temperature_squared``). ``s`` is the student's
logits after its model's transform (``student_logit_scale``, ``student_softcap``: ``z' = scale *
z`` or ``c * tanh(scale * z / c)``, applied by the kernels to the logits they read, the chain rule
in their float32 gradient). The teacher side takes no transform: its top-k are log-probabilities
already (a teacher's transform belongs where they were computed, e.g. the cache builder). Kernels
compute the loss and the gradient in one call (the student's log-sum-exp online, then
``grad = softmax(s / T) * coef`` over the vocabulary and the top-k entries scattered), with a
mean's ``1 / count`` (or ``1 / normalizer``) folded in before the gradient's one rounding, so
backward is at most a scale of the saved gradient. The kernels take the student's rest mass as
``1 - sum_k exp(ls[idx_k])`` (they never mark the top-k in the vocabulary): in float32 its
absolute error is about 1e-7 to 1e-6, so a rest mass below about 1e-4 is approximate (the torch
reference sums the rest exactly).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from kdops import _dispatch, reference
from kdops._alloc import compute_dtype
from kdops.ops import validation
from kdops.ops._chunked import check_chunk_size, chunk_rows, forward_row_weights, lm_head_rows, weighted_rows
from kdops.ops._common import (
    DistillOptions,
    OpArgs,
    define,
    distill_options,
    reduce_rows,
    reduction_divisor,
    register_lm_head_autograd,
    register_saved_grad_autograd,
)

REST_MASS = ("ignore", "bucket")
_INDEX_DTYPES = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)


# The family's contract: every backend's kdops.backends.<backend>.sparse_kd module provides
#   sparse_kd_forward(student [N, V], topk_logprobs [N, K], topk_indices [N, K] int32, labels [N] or None,
#                     options: DistillOptions, compute_grad: bool, grad_divisor () or None)
#     -> (row losses [N], row gradients [N, V] divided by grad_divisor)
# with the options' student logit transform applied to the logits read (gradients to the raw logits).
def _sparse_distill_rows(student: Tensor, topk_logprobs: Tensor, topk_indices: Tensor, labels: Optional[Tensor],
                         grad_divisor: Optional[Tensor], reduced: bool, compute_grad: bool, backend: str,
                         *options) -> tuple[Tensor, Tensor]:
    """Row losses ``[N]`` of ``[N, V]`` student logits against ``[N, K]`` teacher top-k
    (float32 / float64 log-probabilities, int32 indices; ``reduced``: their sum divided by the
    0-dim ``grad_divisor`` if given) and, if ``compute_grad``, their gradients with respect to
    ``student`` (``[N, V]``, student dtype, divided by ``grad_divisor``; else an empty tensor)."""
    rows, grad = _dispatch.kernels("sparse_kd", backend).sparse_kd_forward(
        student, topk_logprobs, topk_indices, labels, DistillOptions(*options), compute_grad, grad_divisor)
    if reduced:
        rows = rows.sum() if grad_divisor is None else rows.sum() / grad_divisor
    return rows, grad


def _sparse_distill_rows_fake(student, topk_logprobs, topk_indices, labels, grad_divisor, reduced, compute_grad,
                              backend, *options):
    loss = student.new_empty(() if reduced else student.shape[:1], dtype=compute_dtype(student.dtype))
    return loss, student.new_empty(student.shape if compute_grad else (0,))


_ROWS_ARGS = OpArgs("Tensor student, Tensor topk_logprobs, Tensor topk_indices, Tensor? labels, "
                    "Tensor? grad_divisor, bool reduced, bool compute_grad, str backend, {options}")
sparse_distill_rows = define("sparse_distill_rows", _ROWS_ARGS, "(Tensor, Tensor)", _sparse_distill_rows,
                             _sparse_distill_rows_fake)
register_saved_grad_autograd(sparse_distill_rows, _ROWS_ARGS, wrt="student")


def _check_topk(topk_logprobs: Tensor, topk_indices: Tensor, lead: torch.Size, vocab: int, what: str) -> int:
    """Shapes and dtypes of the teacher's top-k; returns K."""
    validation.check_float_tensor("topk_logprobs", topk_logprobs)
    if not isinstance(topk_indices, Tensor):
        raise TypeError(f"topk_indices must be a torch.Tensor; got {type(topk_indices).__name__}")
    if topk_indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"topk_indices must be an integer tensor (int32 or int64); got {topk_indices.dtype}")
    if topk_logprobs.dim() < 1 or topk_logprobs.shape[:-1] != lead:
        raise ValueError(
            f"topk_logprobs must have shape (..., K) with the leading shape of {what}, {tuple(lead)}; "
            f"got {tuple(topk_logprobs.shape)}"
        )
    if topk_indices.shape != topk_logprobs.shape:
        raise ValueError(
            f"topk_indices must have the shape of topk_logprobs {tuple(topk_logprobs.shape)}; "
            f"got {tuple(topk_indices.shape)}"
        )
    k = topk_logprobs.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"topk_logprobs must have 1 <= K <= V = {vocab} entries per row; got K = {k}")
    validation.check_topk_indices(topk_indices, vocab)
    return k


def _kernel_topk(topk_logprobs: Tensor, topk_indices: Tensor, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The top-k as the kernels take them: contiguous ``[N, K]`` float32 (float64 for float64
    students) log-probabilities and int32 indices (copies only if needed: ``N * K`` elements)."""
    values = topk_logprobs.detach().reshape(-1, k).to(compute_dtype(dtype)).contiguous()
    return values, topk_indices.reshape(-1, k).to(torch.int32).contiguous()


def _check_call(what: str, x: Tensor, vocab: int, topk_logprobs: Tensor, topk_indices: Tensor,
                labels: Optional[Tensor], tensors: dict[str, Optional[Tensor]], *, rest_mass: str, divergence: str,
                beta: float, normalizer: Union[None, int, Tensor], backend: Optional[str],
                **options) -> tuple[int, Optional[Tensor], DistillOptions, str]:
    """The checks both sparse losses make after their student's (``what``: the name of ``x
    (..., *)``, whose leading shape the top-k and labels share; ``tensors``: the student's inputs
    by name, for the device check): returns K, the labels as int64, the options (``rest_mass``
    checked against the divergence as well) and the backend's name."""
    lead = x.shape[:-1]
    k = _check_topk(topk_logprobs, topk_indices, lead, vocab, what)
    labels = validation.check_labels(labels, lead, what)
    validation.check_same_device(**tensors, topk_logprobs=topk_logprobs, topk_indices=topk_indices, labels=labels)
    opts = distill_options(divergence=divergence, beta=beta, rest_bucket=rest_mass == "bucket", labels=labels,
                           vocab=vocab, normalizer=normalizer, **options)
    if rest_mass not in REST_MASS:
        raise ValueError(f"rest_mass must be one of {', '.join(map(repr, REST_MASS))}; got {rest_mass!r}")
    if rest_mass == "ignore" and (divergence == "reverse_kl" or (divergence == "skew_reverse_kl" and beta == 0)):
        raise ValueError(
            f"divergence={divergence!r} with rest_mass='ignore' is +inf whenever the student has mass "
            "outside the teacher's top-k (the renormalised teacher has none there); use rest_mass='bucket'"
        )
    return k, labels, opts, _dispatch.resolve_backend(backend, x.device, x.dtype, "sparse_kd")


def sparse_distill_loss(
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
    reduction: str = "mean",
    normalizer: Union[None, int, Tensor] = None,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Knowledge distillation of ``student_logits (..., V)`` from a sparse teacher: its top-k
    log-probabilities ``topk_logprobs (..., K)`` at temperature ``temperature`` (any float dtype,
    e.g. bf16 from a cache) at the distinct vocabulary indices ``topk_indices (..., K)``.

    Row loss ``a * CE(student, label) + (1 - a) * c * D(teacher, student)`` over the buckets of
    this module's docstring: the K top-k entries of ``log_softmax(student / T)`` (over the full
    vocabulary) and, if K < V, the student's remaining mass as one bucket.
    ``rest_mass="ignore"``: the teacher's top-k renormalised to sum 1, no rest (refused for
    ``reverse_kl``: infinite); ``"bucket"``: the teacher's rest mass ``1 - sum exp(lt)`` against
    the student's. ``a = hard_weight``, ``c = T**2`` if ``scale_by_temperature_squared``.
    ``divergence``, ``beta``, ``labels``, ``ignore_index``, ``reduction``, ``normalizer``,
    ``backend`` as in :func:`kdops.distill_loss`. ``student_logit_scale`` (a finite number > 0),
    ``student_softcap`` (None or a finite number > 0): the student model's logit transform
    ``z' = scale * z`` or ``c * tanh(scale * z / c)``, applied to ``student_logits`` before the
    temperature (also for the hard-label term), in the kernels; a -inf logit stays -inf under a
    scale and becomes ``-c`` under a softcap. No teacher transform: ``topk_logprobs`` are
    log-probabilities already. The gradient flows to ``student_logits`` only (the student's dtype,
    rounded once).
    """
    vocab = validation.check_logits("student_logits", student_logits)
    lead = student_logits.shape[:-1]
    k, labels, opts, name = _check_call(
        "student_logits", student_logits, vocab, topk_logprobs, topk_indices, labels,
        dict(student_logits=student_logits), rest_mass=rest_mass, divergence=divergence, beta=beta,
        normalizer=normalizer, backend=backend, temperature=temperature, hard_weight=hard_weight,
        scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index, reduction=reduction,
        student_logit_scale=student_logit_scale, student_softcap=student_softcap)
    if name == "torch":
        return reference.sparse_distill_loss(
            reference.transform_logits(student_logits, opts.student_logit_scale, opts.student_softcap),
            topk_logprobs, topk_indices, labels, temperature=temperature,
            divergence=divergence, beta=beta, rest_mass=rest_mass, hard_weight=hard_weight,
            scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
            reduction=reduction, normalizer=normalizer,
        )
    student = student_logits.reshape(-1, vocab)
    if student.stride(-1) != 1:
        student = student.contiguous()
    values, indices = _kernel_topk(topk_logprobs, topk_indices, k, student.dtype)
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    compute_grad = student_logits.requires_grad and torch.is_grad_enabled()
    divisor = reduction_divisor(flat_labels, ignore_index, reduction, normalizer, student.shape[0],
                                compute_dtype(student.dtype), student.device)
    loss, _ = sparse_distill_rows(student, values, indices, flat_labels, divisor, reduction != "none", compute_grad,
                                  name, *opts)
    return loss.reshape(lead) if reduction == "none" else loss


# ---- fused linear: chunks of rows, the [N, V] student logits never formed ----


def _fused_compute(
    h: Tensor, w: Tensor, b: Optional[Tensor], topk_logprobs: Tensor, topk_indices: Tensor,
    labels: Optional[Tensor], row_weights: Optional[Tensor], needs: list[bool], chunk: int, backend: str, *options,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row losses ``[N]`` (times ``row_weights`` when given and ``needs`` is set) and the
    gradients of ``sum_r row_weights[r] * row[r]`` to ``h``, ``w``, ``b`` (as ``needs`` says,
    rounded once; empty otherwise): the chunked driver over the backend's
    ``"sparse_kd"`` kernels, which apply the student's logit transform to the chunk logits."""
    opts = DistillOptions(*options)
    kernels = _dispatch.kernels("sparse_kd", backend)

    def row_loss(idx, logits: Tensor, want_grad: bool):
        return kernels.sparse_kd_forward(logits, topk_logprobs[idx], topk_indices[idx],
                                         None if labels is None else labels[idx], opts, want_grad)

    rows, gh, gw, gb = lm_head_rows(h, w, b, row_loss, labels, opts.ignore_index, row_weights, chunk, needs)
    return (weighted_rows(rows, row_weights, needs), h.new_empty(0) if gh is None else gh.to(h.dtype),
            w.new_empty(0) if gw is None else gw.to(w.dtype), w.new_empty(0) if gb is None else gb.to(w.dtype))


def _fused_compute_fake(h, w, b, topk_logprobs, topk_indices, labels, row_weights, needs, chunk, backend, *options):
    return (
        h.new_empty(h.shape[:1], dtype=compute_dtype(h.dtype)),
        h.new_empty(h.shape if needs[0] else (0,)),
        w.new_empty(w.shape if needs[1] else (0,)),
        w.new_empty(w.shape[:1] if needs[2] else (0,)),
    )


_FUSED_ARGS = OpArgs("Tensor h, Tensor w, Tensor? b, Tensor topk_logprobs, Tensor topk_indices, Tensor? labels, "
                     "Tensor? row_weights, bool[] needs, SymInt chunk, str backend, {options}")
fused_linear_sparse_distill = define("fused_linear_sparse_distill", _FUSED_ARGS, "(Tensor, Tensor, Tensor, Tensor)",
                                     _fused_compute, _fused_compute_fake)
register_lm_head_autograd(fused_linear_sparse_distill, _FUSED_ARGS)


def fused_linear_sparse_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    labels: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    rest_mass: str = "ignore",
    hard_weight: float = 0.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    normalizer: Union[None, int, Tensor] = None,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """:func:`sparse_distill_loss` of ``student_hidden (..., H) @ student_weight (V, H).T +
    student_bias`` without forming the ``[N, V]`` logits: rows go in chunks of ``chunk_size``
    (default: from a 256 MiB budget, as :func:`kdops.fused_linear_distill_loss`), each chunk's
    float32 logits give its row losses and ``dL/dlogits`` at once, and the gradients to the hidden
    states, weight and bias are accumulated. ``student_logit_scale``, ``student_softcap``: the
    student's logit transform, as in :func:`kdops.fused_linear_distill_loss` (the cached teacher
    is already log-probabilities). Other options as in :func:`sparse_distill_loss`.
    """
    validation.check_linear("student_hidden", student_hidden, "student_weight", student_weight,
                            "student_bias", student_bias)
    lead = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    check_chunk_size(chunk_size)
    k, labels, opts, name = _check_call(
        "student_hidden", student_hidden, vocab, topk_logprobs, topk_indices, labels,
        dict(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias),
        rest_mass=rest_mass, divergence=divergence, beta=beta, normalizer=normalizer, backend=backend,
        temperature=temperature, hard_weight=hard_weight, scale_by_temperature_squared=scale_by_temperature_squared,
        ignore_index=ignore_index, reduction=reduction, student_logit_scale=student_logit_scale,
        student_softcap=student_softcap)
    if name == "torch":
        return reference.fused_linear_sparse_distill_loss(
            student_hidden, student_weight, topk_logprobs, topk_indices, labels, student_bias=student_bias,
            temperature=temperature, divergence=divergence, beta=beta, rest_mass=rest_mass,
            hard_weight=hard_weight, scale_by_temperature_squared=scale_by_temperature_squared,
            ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
            student_logit_scale=student_logit_scale, student_softcap=student_softcap,
        )
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    values, indices = _kernel_topk(topk_logprobs, topk_indices, k, h.dtype)
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    chunk = chunk_rows(h.shape[0], vocab, h.dtype, chunk_size, n_teachers=0)
    grad_on = torch.is_grad_enabled() and reduction != "none"  # "none": the gradients come in backward
    needs = [grad_on and x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)]
    row_weights = forward_row_weights(flat_labels, ignore_index, reduction, normalizer, h, needs)
    rows = fused_linear_sparse_distill(h, student_weight, student_bias, values, indices, flat_labels, row_weights,
                                       needs, chunk, name, *opts)[0]
    if row_weights is not None:
        return rows.sum()
    return reduce_rows(rows, flat_labels, ignore_index, reduction, lead, normalizer)
