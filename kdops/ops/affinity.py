"""Relation-based distillation: ``kdops.affinity``, ``similarity_preserving_loss`` (SP),
``rkd_distance_loss`` (RKD-D) and ``rkd_angle_loss`` (RKD-A).

Features ``(B, ...)`` are flattened per sample to rows ``x_i``; student and teacher may have
different feature sizes but share the batch size B. Definitions (``eps = 1e-12``; smooth-L1
``h`` with parameter ``beta``; :mod:`kdops.reference` holds them as plain PyTorch):

* ``affinity``: ``[B, B]``: ``dot`` ``x_i . x_j``; ``cosine`` the same of ``x / max(||x||, eps)``;
  ``squared_euclidean`` ``||x_i - x_j||^2``; ``euclidean`` ``sqrt(max(||x_i - x_j||^2, eps))``
  (both 0 on the diagonal). Gradient: see :mod:`kdops.backends.triton.affinity`.
* SP: ``G = X X^T``, ``G~_i = G_i / max(||G_i||, eps)`` per model; ``L = ||G~s - G~t||_F^2 / B^2``.
* RKD-D: ``d_ij = sqrt(max(||x_i - x_j||^2, eps))`` for i != j, ``mu`` their mean over the
  ``P = B(B-1)`` ordered pairs; ``L = 1/P sum_{i != j} h(d^s_ij / mu_s - d^t_ij / mu_t)``.
* RKD-A: ``n_ij = (x_i - x_j) / ||x_i - x_j||`` (the zero constant when the norm is <= eps:
  i == j and duplicate samples add no gradient), ``cos_ijk = n_ij . n_kj``;
  ``L = 1/B^3 sum_{i,j,k} h(cos^s_ijk - cos^t_ijk)``.

The losses are float32 (float64 for float64 features), the gradients have the student's dtype;
the teacher is a constant. Backends (see :mod:`kdops._dispatch`): ``triton``
(:mod:`kdops.backends.triton.affinity`), ``cpu`` and ``cuda`` (the native kernels ``csrc/cpu/affinity.cpp``
and ``csrc/cuda/affinity.cu`` through :mod:`kdops.backends.native.affinity`), all with ``O(B * D)`` memory
for SP and RKD-D (Gram tiles recomputed, never a ``[B, B]`` matrix) and ``O(B^2)`` for RKD-A;
``torch`` runs the reference.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from kdops import _dispatch, reference
from kdops._alloc import compute_dtype
from kdops._codes import AFFINITY_KINDS, RKD_ANGLE, RKD_DISTANCE, SP, relation_stats_shape
from kdops.ops import validation
from kdops.ops._common import OpArgs, define

# The family's contract: every backend's kdops.backends.<backend>.affinity module provides
#   affinity_forward(x [B, D], kind) -> A [B, B]
#   affinity_backward(grad [B, B], x, A, kind) -> dx [B, D]
#   relation_forward(student [B, Ds], teacher [B, Dt], loss, beta) -> (loss [], stats)
#   relation_backward(grad [], student, teacher, stats, loss, beta) -> dstudent [B, Ds]
# (contracts in kdops.backends.triton.affinity; stats are produced and read by one backend).
# The "torch" backend runs the reference (kdops.reference) instead.
FAMILY = "affinity"


def implementation(backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """What runs a call of this family: the resolved backend (``"torch"``: the reference)."""
    return _dispatch.resolve_backend(backend, device, dtype, FAMILY)


# --------------------------------------------------------------------------- custom ops


# Schemas by name: setup_context and backward read the inputs by these names (OpArgs).
_AFFINITY_ARGS = OpArgs("Tensor x, int kind, str backend")
_AFFINITY_BACKWARD_ARGS = OpArgs("Tensor grad, Tensor x, Tensor out, int kind, str backend")
_RELATION_ARGS = OpArgs("Tensor student, Tensor teacher, int loss, float beta, str backend")
_RELATION_BACKWARD_ARGS = OpArgs("Tensor grad, Tensor student, Tensor teacher, Tensor stats, int loss, float beta, "
                                 "str backend")


def _affinity_impl(x: Tensor, kind: int, backend: str) -> Tensor:
    """``[B, B]`` affinity of the rows of ``x [B, D]`` (contiguous rows); ``kind`` indexes AFFINITY_KINDS."""
    return _dispatch.kernels(FAMILY, backend).affinity_forward(x, kind)


def _affinity_fake(x, kind, backend):
    return x.new_empty((x.shape[0], x.shape[0]), dtype=compute_dtype(x.dtype))


def _affinity_backward_impl(grad: Tensor, x: Tensor, out: Tensor, kind: int, backend: str) -> Tensor:
    """``dL/dx`` from ``grad = dL/dA`` and ``out = A``."""
    return _dispatch.kernels(FAMILY, backend).affinity_backward(grad, x, out, kind)


def _affinity_backward_fake(grad, x, out, kind, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


affinity_op = define("affinity", _AFFINITY_ARGS, "Tensor", _affinity_impl, _affinity_fake)
affinity_backward_op = define("affinity_backward", _AFFINITY_BACKWARD_ARGS, "Tensor", _affinity_backward_impl,
                              _affinity_backward_fake)


def _affinity_setup(ctx, inputs, output):
    named = _AFFINITY_ARGS.bind(inputs)
    ctx.kind, ctx.backend = named["kind"], named["backend"]
    ctx.no_grads = _AFFINITY_ARGS.no_grads(inputs)
    ctx.save_for_backward(named["x"], output)


def _affinity_backward(ctx, grad: Tensor):
    x, out = ctx.saved_tensors
    return _AFFINITY_ARGS.grads(ctx.no_grads, x=affinity_backward_op(grad, x, out, ctx.kind, ctx.backend))


affinity_op.register_autograd(_affinity_backward, setup_context=_affinity_setup)


def _relation_forward_impl(student: Tensor, teacher: Tensor, loss: int, beta: float,
                           backend: str) -> tuple[Tensor, Tensor]:
    """(loss, stats for the backward) of SP / RKD-D / RKD-A (``loss`` code) of ``[B, D]`` rows."""
    return _dispatch.kernels(FAMILY, backend).relation_forward(student, teacher, loss, beta)


def _relation_loss_fake(student, teacher, loss, beta, backend):
    dtype = compute_dtype(student.dtype)
    stats = student.new_empty(relation_stats_shape(loss, student.shape[0]), dtype=dtype)
    return student.new_empty((), dtype=dtype), stats


def _relation_backward_impl(grad: Tensor, student: Tensor, teacher: Tensor, stats: Tensor, loss: int, beta: float,
                            backend: str) -> Tensor:
    """``dL/dstudent`` from the incoming 0-d ``grad`` and the forward's ``stats``."""
    return _dispatch.kernels(FAMILY, backend).relation_backward(grad, student, teacher, stats, loss, beta)


def _relation_loss_backward_fake(grad, student, teacher, stats, loss, beta, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


relation_loss_op = define("relation_loss", _RELATION_ARGS, "(Tensor, Tensor)", _relation_forward_impl,
                          _relation_loss_fake)
relation_loss_backward_op = define("relation_loss_backward", _RELATION_BACKWARD_ARGS, "Tensor",
                                   _relation_backward_impl, _relation_loss_backward_fake)


def _relation_setup(ctx, inputs, output):
    named = _RELATION_ARGS.bind(inputs)
    ctx.loss, ctx.beta, ctx.backend = named["loss"], named["beta"], named["backend"]
    ctx.no_grads = _RELATION_ARGS.no_grads(inputs)
    ctx.save_for_backward(named["student"], named["teacher"], output[1])
    ctx.mark_non_differentiable(output[1])


def _relation_backward(ctx, grad: Tensor, _grad_stats: Optional[Tensor]):
    student, teacher, stats = ctx.saved_tensors
    dstudent = relation_loss_backward_op(grad, student, teacher, stats, ctx.loss, ctx.beta, ctx.backend)
    return _RELATION_ARGS.grads(ctx.no_grads, student=dstudent)


relation_loss_op.register_autograd(_relation_backward, setup_context=_relation_setup)


# --------------------------------------------------------------------------- public API


def _check_features(name: str, x: Tensor) -> None:
    if x.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension (B, ...); got a scalar")
    if math.prod(x.shape[1:]) == 0:
        raise ValueError(f"{name} must have at least one feature per sample; got shape {tuple(x.shape)}")


def _rows(x: Tensor) -> Tensor:
    """``(B, ...)`` features as ``[B, D]`` rows with contiguous elements (copying only if needed)."""
    rows = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    return rows if rows.stride(1) == 1 or rows.shape[1] == 1 else rows.contiguous()


def affinity(x: Tensor, kind: str = "cosine", *, backend: Optional[str] = None) -> Tensor:
    """``[B, B]`` affinity of the samples of ``x (B, ...)`` (flattened per sample).

    ``kind``: ``"dot"`` (``x_i . x_j``), ``"cosine"`` (of ``x / max(||x||, 1e-12)``),
    ``"euclidean"`` (``sqrt(max(||x_i - x_j||^2, 1e-12))``, 0 on the diagonal) or
    ``"squared_euclidean"`` (``||x_i - x_j||^2``). Float32 (float64 for float64 ``x``),
    differentiable. ``backend``: see :func:`kdops.available_backends`.
    """
    validation.check_float_tensor("x", x)
    if kind not in AFFINITY_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, AFFINITY_KINDS))}; got {kind!r}")
    _check_features("x", x)
    name = _dispatch.resolve_backend(backend, x.device, x.dtype, FAMILY)
    if name == "torch":
        return reference.affinity(x, kind)
    return affinity_op(_rows(x), AFFINITY_KINDS.index(kind), name)


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"smooth_l1_beta must be a number; got {type(beta).__name__}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"smooth_l1_beta must be a finite number >= 0; got {beta}")
    return float(beta)


def check_student_teacher(f_s: Tensor, f_t: Tensor, min_batch: int, what: str) -> None:
    """Both float tensors ``(B, ...)`` of one dtype and device with the same B >= min_batch."""
    validation.check_float_tensor("f_s", f_s)
    validation.check_float_tensor("f_t", f_t)
    _check_features("f_s", f_s)
    _check_features("f_t", f_t)
    if f_t.shape[0] != f_s.shape[0]:
        raise ValueError(
            f"f_t must have the batch size of f_s; got f_s {tuple(f_s.shape)} and f_t {tuple(f_t.shape)}"
        )
    if f_s.shape[0] < min_batch:
        raise ValueError(f"{what} needs a batch of at least {min_batch} samples; got f_s {tuple(f_s.shape)}")
    if f_t.dtype != f_s.dtype:
        raise TypeError(
            f"f_t must have the dtype of f_s; got f_t {f_t.dtype} and f_s {f_s.dtype} (convert one with .to())"
        )
    validation.check_same_device(f_s=f_s, f_t=f_t)


def _relation_loss(f_s: Tensor, f_t: Tensor, loss: int, beta: float, backend: Optional[str],
                   reference_loss: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    name = _dispatch.resolve_backend(backend, f_s.device, f_s.dtype, FAMILY)
    if name == "torch":
        return reference_loss(f_s, f_t)
    return relation_loss_op(_rows(f_s), _rows(f_t).detach(), loss, beta, name)[0]


def similarity_preserving_loss(f_s: Tensor, f_t: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Similarity-preserving KD (Tung & Mori, 2019) between student ``f_s (B, ...)`` and teacher
    ``f_t (B, ...)`` features: ``||G~s - G~t||_F^2 / B^2`` with ``G = F F^T`` row-L2-normalised
    (``max(||G_i||, 1e-12)``). Gradient to ``f_s`` only."""
    check_student_teacher(f_s, f_t, 1, "similarity_preserving_loss")
    return _relation_loss(f_s, f_t, SP, 1.0, backend, reference.similarity_preserving_loss)


def rkd_distance_loss(f_s: Tensor, f_t: Tensor, *, smooth_l1_beta: float = 1.0,
                      backend: Optional[str] = None) -> Tensor:
    """RKD distance loss (Park et al., 2019): the mean over ordered pairs i != j of
    ``smooth_l1(d^s_ij / mu_s, d^t_ij / mu_t)``, ``d_ij = sqrt(max(||x_i - x_j||^2, 1e-12))`` and
    ``mu`` the mean of ``d`` over those pairs (``smooth_l1_beta = 0``: L1). Needs B >= 2."""
    check_student_teacher(f_s, f_t, 2, "rkd_distance_loss")
    beta = _check_beta(smooth_l1_beta)
    return _relation_loss(f_s, f_t, RKD_DISTANCE, beta, backend,
                          lambda s, t: reference.rkd_distance_loss(s, t, beta))


def rkd_angle_loss(f_s: Tensor, f_t: Tensor, *, smooth_l1_beta: float = 1.0,
                   backend: Optional[str] = None) -> Tensor:
    """RKD angle loss (Park et al., 2019): the mean over all ``B^3`` triplets (i, j, k) of
    ``smooth_l1(cos^s_ijk, cos^t_ijk)``, ``cos_ijk`` the cosine of the angle at ``x_j`` between
    ``x_i - x_j`` and ``x_k - x_j`` (0, with no gradient, where either is 0). Needs B >= 3 (with
    fewer samples every angle is degenerate). Memory ``O(B^2)``."""
    check_student_teacher(f_s, f_t, 3, "rkd_angle_loss")
    beta = _check_beta(smooth_l1_beta)
    return _relation_loss(f_s, f_t, RKD_ANGLE, beta, backend,
                          lambda s, t: reference.rkd_angle_loss(s, t, beta))
