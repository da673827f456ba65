"""Fused temperature-softmax distillation (response-based KD): ``kdops.distill_loss``.

Per row, with ``p_t = softmax(teacher / T)``, ``p_s = softmax(student / T)``, ``a = hard_weight``
and ``c = T**2`` (or 1 without ``scale_by_temperature_squared``)::

    row = a * CE(student, label) + (1 - a) * c * D(p_t, p_s)

where ``D`` is one of the divergences of :mod:`kdops.divergences`, or DeiT's hard target
``D = -log p_s[argmax p_t]`` (``divergence="hard"``: the argmax is kept in the kernels' first
pass beside the online log-sum-exps, the lowest index on ties). With ``K`` teachers the
teacher distribution is their mixture ``p_t = sum_k w_k softmax(t_k / T)``, formed per element in
log space by the kernels: ``log p_t = logsumexp_k(log w_k + t_k / T - lse_k)`` after an online
``lse_k = logsumexp(t_k / T)`` per teacher (no per-teacher probability tensor). A kernel computes each row's
loss *and* its gradient in one call (online softmax, no other ``[N, V]`` temporary), so
backward is a scale of the saved gradient by the incoming one. The models' logit transforms
(``z' = scale * z``, ``c * tanh(scale * z / c)``) are applied by the kernels to the logits they
read, the slope ``dz'/dz`` folded into the gradient; so is a mean's ``1 / count`` (or
``1 / normalizer``), in float32 before the gradient's one rounding to the student's dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from kdops import _dispatch, reference
from kdops._alloc import compute_dtype
from kdops.ops import validation
from kdops.ops._common import (
    DistillOptions,
    OpArgs,
    define,
    distill_options,
    reduction_divisor,
    register_saved_grad_autograd,
)


# The family's contract: every backend's kdops.backends.<backend>.kd module provides
#   kd_forward(student [N, V], teacher [N, V] or [K, N, V], labels [N] or None, options: DistillOptions,
#              compute_grad: bool, teacher_log_weights (K,) or None, grad_divisor () or None)
#     -> (row losses [N], row gradients [N, V] divided by grad_divisor)
# with options' logit transforms applied to the logits read (gradients to the raw logits).
def _distill_rows(student: Tensor, teacher: Tensor, labels: Optional[Tensor], teacher_log_weights: Optional[Tensor],
                  grad_divisor: Optional[Tensor], reduced: bool, compute_grad: bool, backend: str,
                  *options) -> tuple[Tensor, Tensor]:
    """Row losses ``[N]`` of ``[N, V]`` logits (``reduced``: their sum divided by the 0-dim
    ``grad_divisor`` if given) and, if ``compute_grad``, their gradients with respect to
    ``student`` (``[N, V]``, student dtype, divided by ``grad_divisor``; else an empty tensor).
    ``teacher``: ``[N, V]``, or ``[K, N, V]`` mixed with ``teacher_log_weights`` ``(K,)``
    (float32; float64 for float64 logits; ``grad_divisor`` too)."""
    rows, grad = _dispatch.kernels("kd", backend).kd_forward(
        student, teacher, labels, DistillOptions(*options), compute_grad, teacher_log_weights, grad_divisor)
    if reduced:
        rows = rows.sum() if grad_divisor is None else rows.sum() / grad_divisor
    return rows, grad


def _distill_rows_fake(student, teacher, labels, teacher_log_weights, grad_divisor, reduced, compute_grad, backend,
                       *options):
    loss = student.new_empty(() if reduced else student.shape[:1], dtype=compute_dtype(student.dtype))
    return loss, student.new_empty(student.shape if compute_grad else (0,))


_ARGS = OpArgs("Tensor student, Tensor teacher, Tensor? labels, Tensor? teacher_log_weights, Tensor? grad_divisor, "
               "bool reduced, bool compute_grad, str backend, {options}")
distill_rows = define("distill_rows", _ARGS, "(Tensor, Tensor)", _distill_rows, _distill_rows_fake)
register_saved_grad_autograd(distill_rows, _ARGS, wrt="student")


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
    teacher_weights: Optional[Union[Sequence[float], Tensor]] = None,
    normalizer: Union[None, int, Tensor] = None,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Knowledge-distillation loss between student and teacher logits of shape ``(..., V)``.

    Row loss ``a * CE(student, label) + (1 - a) * c * D(softmax(teacher/T), softmax(student/T))``
    with ``a = hard_weight`` and ``c = T**2`` when ``scale_by_temperature_squared``; ``D`` is
    ``divergence`` (``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_forward_kl``,
    ``skew_reverse_kl``, ``tvd``; ``beta`` mixes the last three's distributions), or ``"hard"``
    (DeiT's hard distillation): ``D = -log p_s[argmax p_t]``, the cross-entropy of ``s / T``
    against the teacher's argmax (of the transformed teacher logits; of the mixture's ``log p_t``
    for K teachers), ties resolved to the lowest index (also ties that a softcap's saturation
    makes in float32); fused in the kernels: the argmax and the student's log-sum-exp in one
    pass (two with K teachers), gradient ``soft_weight / T * (p_s - onehot(argmax))``. A NaN
    teacher logit makes its row's loss and gradient NaN (``torch.argmax`` would pick the NaN's
    index); a teacher row of only -inf has argmax 0, as ``torch.argmax``. ``labels``
    (the leading shape) add the hard-label term and mask rows equal to ``ignore_index``.
    ``reduction``: ``"mean"`` over counted rows (0 when none count), ``"sum"`` or ``"none"``;
    ``normalizer`` (an int or a one-element tensor, with ``"mean"``): the row sum divided by it
    instead, e.g. Transformers' ``num_items_in_batch`` for gradient accumulation.
    Logit transforms of the models (as :func:`kdops.fused_linear_distill_loss`), applied to the
    student's and every teacher's logits before the temperature, in the kernels:
    ``z' = scale * z`` (``*_logit_scale``, a finite number > 0), or with ``*_softcap`` ``c``
    (None or a finite number > 0) ``z' = c * tanh(scale * z / c)``; the hard-label term uses the
    transformed student logits, and the gradient the exact chain rule
    ``dz'/dz = scale * (1 - (z'/c)**2)``. A -inf logit stays -inf under a scale and becomes ``-c``
    under a softcap (``tanh(-inf) = -1``), as :func:`kdops.reference.transform_logits`.
    The teacher is a constant: gradient flows to ``student_logits`` only. The loss is float32
    (float64 for float64 logits); the gradient has the student's dtype, rounded once (the
    mean's ``1 / count`` is applied before that rounding).
    ``backend``: None (``KDOPS_BACKEND``, else automatic), ``"triton"``, ``"cuda"``, ``"cpu"``
    or ``"torch"``; see :func:`kdops.available_backends`.

    Multi-teacher: ``teacher_logits`` of shape ``(K, ..., V)`` (one more dimension than the
    student's) distils from the mixture ``p_t = sum_k w_k softmax(t_k / T)``, fused in one pass;
    ``teacher_weights``: ``K`` numbers ``>= 0`` summing to 1 (within 1e-6; else ValueError),
    default ``1/K`` each; a constant (no gradient). ``K = 1`` is exactly the single-teacher loss.

    Self-distillation: the teacher may be the student itself, detached: e.g. an EMA copy's or an
    earlier epoch's logits, or a deeper layer's logits distilled into a shallower exit::

        loss = distill_loss(shallow_logits, deep_logits.detach(), labels, hard_weight=0.5)
        # the current model and its EMA as a two-teacher mixture for a smaller student
        loss = distill_loss(s, torch.stack([t_now.detach(), t_ema.detach()]), teacher_weights=[0.7, 0.3])
    """
    vocab = validation.check_logits("student_logits", student_logits)
    validation.check_float_tensor("teacher_logits", teacher_logits)
    multi = teacher_logits.dim() == student_logits.dim() + 1
    if (teacher_logits.shape[1:] if multi else teacher_logits.shape) != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits (..., V), or (K, ..., V) for K "
            f"teachers; got teacher {tuple(teacher_logits.shape)} and student {tuple(student_logits.shape)}"
        )
    n_teachers = teacher_logits.shape[0] if multi else 1
    if n_teachers == 0:
        raise ValueError(
            f"teacher_logits (K, ..., V) must hold K >= 1 teachers; got shape {tuple(teacher_logits.shape)}")
    if teacher_weights is not None and not multi:
        raise ValueError(
            "teacher_weights needs K teachers: teacher_logits of shape (K, ..., V); got the "
            f"single-teacher shape {tuple(teacher_logits.shape)}"
        )
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(
            f"teacher_logits must have the dtype of student_logits; got teacher {teacher_logits.dtype} "
            f"and student {student_logits.dtype} (convert one with .to())"
        )
    lead = student_logits.shape[:-1]
    labels = validation.check_labels(labels, lead, "student_logits")
    validation.check_same_device(student_logits=student_logits, teacher_logits=teacher_logits, labels=labels)
    opts = distill_options(temperature=temperature, divergence=divergence, hard_target=True,
                           beta=beta, hard_weight=hard_weight,
                           scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
                           reduction=reduction, labels=labels, vocab=vocab, normalizer=normalizer,
                           student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                           teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap)
    name = _dispatch.resolve_backend(backend, student_logits.device, student_logits.dtype, "kd", n_teachers)
    weights = validation.check_teacher_weights(teacher_weights, n_teachers, student_logits.device) if multi else None
    if name == "torch":
        return reference.distill_loss(
            reference.transform_logits(student_logits, opts.student_logit_scale, opts.student_softcap),
            reference.transform_logits(teacher_logits, opts.teacher_logit_scale, opts.teacher_softcap), labels,
            temperature=temperature, divergence=divergence, beta=beta, hard_weight=hard_weight,
            scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
            reduction=reduction, teacher_weights=weights, normalizer=normalizer)

    student = _rows(student_logits, vocab)
    if n_teachers == 1:  # either form: the single-teacher kernel (a weight must be 1)
        teacher = _rows(teacher_logits[0] if multi else teacher_logits, vocab)
        log_weights = None
    else:
        teacher = _rows(teacher_logits, vocab, n_teachers)
        log_weights = weights.log().to(compute_dtype(student.dtype))
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    compute_grad = student_logits.requires_grad and torch.is_grad_enabled()
    divisor = reduction_divisor(flat_labels, ignore_index, reduction, normalizer, student.shape[0],
                                compute_dtype(student.dtype), student.device)
    loss, _ = distill_rows(student, teacher, flat_labels, log_weights, divisor, reduction != "none", compute_grad,
                           name, *opts)
    return loss.reshape(lead) if reduction == "none" else loss


def _rows(logits: Tensor, vocab: int, n_teachers: int = 0) -> Tensor:
    """``(..., V)`` logits as ``[N, V]`` rows (``n_teachers`` > 0: ``(K, ..., V)`` as
    ``[K, N, V]``) with contiguous elements (copying only if needed)."""
    rows = logits.reshape(n_teachers, -1, vocab) if n_teachers else logits.reshape(-1, vocab)
    return rows if rows.stride(-1) == 1 else rows.contiguous()
