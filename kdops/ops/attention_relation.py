"""Transformer attention-relation distillation (MiniLM, MiniLMv2): ``kdops.attention_relation_loss``.

Per relation head ``h`` and query row ``i`` of each model, with ``a``, ``b`` the model's
``[B, heads, L, d]`` inputs (regrouped into ``heads`` relation heads of size ``d``)::

    R[i] = softmax_j(a_i . b_j / (sqrt(d) T))        over the allowed keys j
    row  = D(R_t[i], R_s[i])                           (a divergence of kdops.divergences)

Keys are allowed inside ``attention_mask`` and, with ``causal``, for ``j <= i``; queries outside
the mask do not count. The kernels never form ``R``: per query block they run an online softmax
over key blocks for both models (row statistics ``lse_s``, ``lse_t``), then a second pass for
``D`` and ``S = sum_j q_j`` (``q`` of :func:`kdops.backends.triton.divergence.divergence_term`),
saving ``(lse_s, lse_t, S)`` per row (``O(B * heads * L)``). The backward recomputes the score
tiles, as flash-attention's does: with ``g_i`` the incoming gradient of row ``i`` and
``c = 1 / (sqrt(d_s) T)``, ``W_ij = g_i (q_ij - p_ij S_i) c`` (``p = R_s``), and

    dL/da_i = sum_j W_ij b_j          dL/db_j = sum_i W_ij a_i

(one kernel per query block for ``da``, one per key block for ``db``: no atomics, no ``L x L``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdops import _dispatch, reference
from kdops._alloc import compute_dtype
from kdops.ops import validation
from kdops.ops._common import OpArgs, define

FAMILY = "attention_relation"
# The family's contract: every backend's kdops.backends.<backend>.attention_relation module provides
#   relation_forward(sa, sb, ta, tb, counted, causal, temperature, divergence, beta)
#       -> (rows [B, H, L], stats [3, B, H, L] = lse_s, lse_t, S)
#   relation_backward(grad_rows, sa, sb, ta, tb, counted, stats, causal, temperature, divergence, beta)
#       -> (d sa, d sb)
# with sa, sb [B, H, L, ds], ta, tb [B, H, L, dt] (unit stride on the last dim), counted None or a
# contiguous uint8 [B, L].


def implementation(backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """What runs a call of this family: the resolved backend (``"torch"``: the reference)."""
    return _dispatch.resolve_backend(backend, device, dtype, FAMILY)


# --------------------------------------------------------------------------- custom ops


_INPUTS = "Tensor student_a, Tensor student_b, Tensor teacher_a, Tensor teacher_b, Tensor? counted"
_SCHEMA_OPTIONS = "bool causal, float temperature, int divergence, float beta, str backend"
_OPTIONS = OpArgs(_SCHEMA_OPTIONS).names  # what backward passes on to the backward op, by name
_ARGS = OpArgs(f"{_INPUTS}, {_SCHEMA_OPTIONS}")
_BACKWARD_ARGS = OpArgs(f"Tensor grad_rows, {_INPUTS}, Tensor stats, {_SCHEMA_OPTIONS}")


def _forward(student_a: Tensor, student_b: Tensor, teacher_a: Tensor, teacher_b: Tensor, counted: Optional[Tensor],
             causal: bool, temperature: float, divergence: int, beta: float, backend: str) -> tuple[Tensor, Tensor]:
    """(row losses ``[B, H, L]``, row statistics ``[3, B, H, L]``) of ``[B, H, L, d]`` inputs."""
    return _dispatch.kernels(FAMILY, backend).relation_forward(student_a, student_b, teacher_a, teacher_b, counted,
                                                               causal, temperature, divergence, beta)


def _forward_fake(student_a, student_b, teacher_a, teacher_b, counted, causal, temperature, divergence, beta, backend):
    B, H, L, _ = student_a.shape
    dtype = compute_dtype(student_a.dtype)
    return student_a.new_empty((B, H, L), dtype=dtype), student_a.new_empty((3, B, H, L), dtype=dtype)


def _backward_grads(grad_rows: Tensor, student_a: Tensor, student_b: Tensor, teacher_a: Tensor, teacher_b: Tensor,
                    counted: Optional[Tensor], stats: Tensor, causal: bool, temperature: float, divergence: int,
                    beta: float, backend: str) -> tuple[Tensor, Tensor]:
    """(dL/d student_a, dL/d student_b) from the rows' gradient ``[B, H, L]`` and the forward's stats."""
    return _dispatch.kernels(FAMILY, backend).relation_backward(grad_rows.contiguous(), student_a, student_b, teacher_a,
                                                 teacher_b, counted, stats, causal, temperature, divergence, beta)


def _backward_grads_fake(grad_rows, student_a, student_b, *_rest):
    return (torch.empty_like(student_a, memory_format=torch.contiguous_format),
            torch.empty_like(student_b, memory_format=torch.contiguous_format))


attention_relation_op = define("attention_relation", _ARGS, "(Tensor, Tensor)", _forward, _forward_fake)
attention_relation_backward_op = define("attention_relation_backward", _BACKWARD_ARGS, "(Tensor, Tensor)",
                                        _backward_grads, _backward_grads_fake)


def _setup(ctx, inputs, output):
    named = _ARGS.bind(inputs)
    ctx.options = {name: named[name] for name in _OPTIONS}
    ctx.no_grads = _ARGS.no_grads(inputs)
    ctx.save_for_backward(named["student_a"], named["student_b"], named["teacher_a"], named["teacher_b"],
                          named["counted"], output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_rows: Tensor, _grad_stats: Optional[Tensor]):
    student_a, student_b, teacher_a, teacher_b, counted, stats = ctx.saved_tensors
    da, db = attention_relation_backward_op(grad_rows, student_a, student_b, teacher_a, teacher_b, counted, stats,
                                            **ctx.options)
    return _ARGS.grads(ctx.no_grads, student_a=da, student_b=db)


attention_relation_op.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------- public API


def _check_inputs(student_a: Tensor, student_b: Tensor, teacher_a: Tensor, teacher_b: Tensor) -> None:
    named = dict(student_a=student_a, student_b=student_b, teacher_a=teacher_a, teacher_b=teacher_b)
    for name, x in named.items():
        validation.check_float_tensor(name, x)
        if x.dim() not in (3, 4):
            raise ValueError(f"{name} must be [B, H, L, d] or [B, L, H*d]; got shape {tuple(x.shape)}")
        if x.shape[-1] == 0:
            raise ValueError(f"{name} must have at least one channel; got shape {tuple(x.shape)}")
    for a, b in (("student_a", "student_b"), ("teacher_a", "teacher_b")):
        if named[b].shape != named[a].shape:
            raise ValueError(f"{b} must have the shape of {a}; got {tuple(named[b].shape)} and {tuple(named[a].shape)}")
    for name in ("teacher_a", "student_b", "teacher_b"):
        if named[name].dtype != student_a.dtype:
            raise TypeError(f"{name} must have the dtype of student_a; got {named[name].dtype} and "
                            f"{student_a.dtype} (convert one with .to())")
    validation.check_same_device(**named)


def _batch_length(x: Tensor) -> tuple[int, int]:
    return (x.shape[0], x.shape[2]) if x.dim() == 4 else (x.shape[0], x.shape[1])


def _channels(x: Tensor) -> int:
    return x.shape[1] * x.shape[3] if x.dim() == 4 else x.shape[2]


def _check_relation_heads(relation_heads: object, student_a: Tensor, teacher_a: Tensor) -> int:
    if relation_heads is None:
        if student_a.dim() != 4 or teacher_a.dim() != 4 or student_a.shape[1] != teacher_a.shape[1]:
            raise ValueError(
                "relation_heads must be given unless student and teacher are both [B, H, L, d] with the same H; "
                f"got student_a {tuple(student_a.shape)} and teacher_a {tuple(teacher_a.shape)}")
        return student_a.shape[1]
    if isinstance(relation_heads, bool) or not isinstance(relation_heads, int):
        raise TypeError(f"relation_heads must be an int or None; got {type(relation_heads).__name__}")
    if relation_heads < 1:
        raise ValueError(f"relation_heads must be >= 1; got {relation_heads}")
    for name, x in (("student_a", student_a), ("teacher_a", teacher_a)):
        if _channels(x) % relation_heads:
            raise ValueError(f"relation_heads={relation_heads} must divide the {_channels(x)} channels (H*d) of "
                             f"{name} {tuple(x.shape)}")
    return relation_heads


def _check_mask(attention_mask: Optional[Tensor], batch: int, length: int) -> Optional[Tensor]:
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None; got {type(attention_mask).__name__}")
    if attention_mask.is_complex():
        raise TypeError(f"attention_mask must be a bool, integer or float tensor; got {attention_mask.dtype}")
    if attention_mask.shape != (batch, length):
        raise ValueError(
            f"attention_mask must have shape [B, L] = {(batch, length)}; got {tuple(attention_mask.shape)}")
    return attention_mask


def attention_relation_loss(
    student_a: Tensor,
    student_b: Tensor,
    teacher_a: Tensor,
    teacher_b: Tensor,
    *,
    relation_heads: Optional[int] = None,
    causal: bool = False,
    attention_mask: Optional[Tensor] = None,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """Self-attention relation distillation (MiniLM / MiniLMv2) without the ``L x L`` matrices.

    With ``R = softmax(a @ b^T / sqrt(d) / T)`` per relation head and query row (``d`` that
    model's relation head size), the divergence ``D(R_t, R_s)`` (``divergence`` and ``beta`` as in
    :func:`kdops.distill_loss`; no ``T^2`` factor) averaged over counted query rows x heads
    (``reduction="sum"``: summed; ``"none"``: ``[B, heads, L]``, 0 on rows that do not count).

    ``(q, k)``: MiniLM's attention distributions; ``(v, v)``: its value relation; ``(q, q)``,
    ``(k, k)``, ``(v, v)`` with ``relation_heads``: MiniLMv2. Inputs are ``[B, H, L, d]`` or
    ``[B, L, H*d]``; ``relation_heads`` regroups the ``H*d`` channels of each model into that many
    heads (so teacher and student may differ in head count and size; None: the inputs' common
    H). ``causal``: keys ``j <= i``; ``attention_mask [B, L]`` (nonzero = token): keys outside
    excluded, queries outside not counted (a fully masked sample counts nothing; "mean" with no
    counted row is 0). Gradient to ``student_a`` and ``student_b``; the teacher is a constant.
    Float32 loss (float64 for float64), gradients in the input dtype.
    """
    _check_inputs(student_a, student_b, teacher_a, teacher_b)
    (batch, length), (t_batch, t_length) = _batch_length(student_a), _batch_length(teacher_a)
    if (t_batch, t_length) != (batch, length):
        raise ValueError(f"teacher_a must have the batch size and length of student_a; got teacher_a "
                         f"{tuple(teacher_a.shape)} and student_a {tuple(student_a.shape)}")
    heads = _check_relation_heads(relation_heads, student_a, teacher_a)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {type(causal).__name__}")
    attention_mask = _check_mask(attention_mask, batch, length)
    validation.check_same_device(student_a=student_a, attention_mask=attention_mask)
    code = validation.check_options(temperature=temperature, divergence=divergence, beta=beta, hard_weight=0.0,
                                    reduction=reduction, has_labels=False)
    name = _dispatch.resolve_backend(backend, student_a.device, student_a.dtype, FAMILY)
    options = dict(relation_heads=heads, causal=causal, attention_mask=attention_mask, temperature=temperature,
                   divergence=divergence, beta=beta)
    if name == "torch":
        return reference.attention_relation_loss(student_a, student_b, teacher_a, teacher_b, reduction=reduction,
                                                 **options)
    views = [_unit_stride(reference.relation_head_view(x, heads)) for x in (student_a, student_b)]
    views += [_unit_stride(reference.relation_head_view(x.detach(), heads)) for x in (teacher_a, teacher_b)]
    counted = None if attention_mask is None else (attention_mask != 0).to(torch.uint8).contiguous()
    rows, _ = attention_relation_op(*views, counted, causal, float(temperature), code, float(beta), name)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    n_rows = batch * length if counted is None else counted.sum()
    return total / (torch.as_tensor(n_rows, device=total.device) * heads).clamp(min=1).to(total.dtype)


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()
