"""What the Hugging Face integrations share: the dtype a loss runs in under autocast, and the
fused lm_head loss of ``lm_head`` weights that FSDP2 / tensor parallelism hand over as DTensors.

A student ``lm_head`` weight that is a DTensor sharded over the vocabulary (``Shard(0)`` on a
1-D mesh) is one of two things, told apart by the rows:

* tensor parallelism (``ColwiseParallel``): every rank of the mesh holds the same hidden states
  and labels. The loss runs vocabulary-parallel (:func:`kdops.distributed.vocab_parallel_fused_linear_distill_loss`
  on the local shards over the mesh's process group): per-row scalars and the ``[N, H]``
  hidden-state gradient are communicated, never the ``[V, H]`` weights;
* FSDP2 (``fully_shard``, called outside the module's forward): each rank holds its own rows.
  The weight is gathered once per call (:func:`full_lm_head`).

The rows are compared by one all-gather of exact checksums (:func:`kdops.distributed._replicated`);
where they are equal both paths give the same loss and gradients, so the choice is only one of
cost. Other DTensors (other placements, 2-D meshes) are gathered. Hidden states that are
DTensors (sequence parallelism's ``Shard(1)``) are gathered to the full rows first; their
gradient, the same full gradient on every rank, goes back to the shards.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Shard

from kdops.distributed import _replicated, vocab_parallel_fused_linear_distill_loss
from kdops.ops.fused_linear import fused_linear_distill_loss


def autocast_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype ``hidden``'s matmuls run in: autocast's where it is on for its device, else its own."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def _gathered(x: Optional[Tensor]) -> Optional[Tensor]:
    """A DTensor's full value, gathered once; its gradient is averaged over the mesh and
    scattered back to the shards (FSDP's convention for ranks holding other data; ranks holding
    the same data, as tensor parallelism's, have equal gradients, whose average they keep)."""
    if not isinstance(x, DTensor):
        return x
    return x.full_tensor(grad_placements=[Partial("avg")] * x.device_mesh.ndim)


def full_lm_head(weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """``(weight, bias)`` as plain tensors of ``dtype``: a DTensor (FSDP2 ``Shard(0)``, tensor
    parallel) is gathered once per call (:func:`_gathered`). Differentiable: gradients reach the
    original parameters."""
    weight, bias = _gathered(weight), _gathered(bias)
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _vocab_sharded(weight: Tensor) -> bool:
    """A DTensor sharded over its rows (the vocabulary) on a 1-D mesh."""
    return isinstance(weight, DTensor) and weight.device_mesh.ndim == 1 and tuple(weight.placements) == (Shard(0),)


def _local_rows(x: Optional[Tensor], like: DTensor, rows: slice, dtype: torch.dtype) -> Optional[Tensor]:
    """The vocabulary rows ``rows`` of ``x`` (weight or bias) that this rank holds of ``like``, in
    ``dtype``: the local shard of a DTensor sharded as ``like`` (its gradient stays sharded), else
    those rows of the (gathered) full tensor."""
    if x is None:
        return None
    if isinstance(x, DTensor) and x.device_mesh == like.device_mesh and tuple(x.placements) == (Shard(0),):
        return x.to_local().to(dtype)
    return _gathered(x)[rows].to(dtype)


def fused_lm_head_loss(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_hidden: Tensor, teacher_weight: Tensor,
    teacher_bias: Optional[Tensor], labels: Optional[Tensor], **options: Any,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`kdops.fused_linear_distill_loss` of the student's rows ``hidden`` through
    ``(weight, bias)`` against the teacher's (a constant: no gradient reaches it), the matmuls in
    each model's autocast dtype, the loss in float32. A vocabulary-sharded DTensor ``weight``
    over ranks holding the same rows runs vocabulary-parallel (see the module docstring: the
    torch-op path of :mod:`kdops.distributed`, which takes no ``backend``); other DTensors are
    gathered once. ``options``: those of :func:`kdops.fused_linear_distill_loss`."""
    hidden, teacher_hidden = (x.full_tensor() if isinstance(x, DTensor) else x for x in (hidden, teacher_hidden))
    s_dtype, t_dtype = autocast_dtype(hidden), autocast_dtype(teacher_hidden)
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    group = weight.device_mesh.get_group() if _vocab_sharded(weight) else None
    if group is not None and not _replicated([hidden, teacher_hidden, labels], group):
        group = None  # FSDP: each rank's own rows
    with torch.autocast(hidden.device.type, enabled=False):
        if group is None:
            w, b = full_lm_head(weight, bias, s_dtype)
            tw, tb = full_lm_head(teacher_weight, teacher_bias, t_dtype)
            return fused_linear_distill_loss(hidden.to(s_dtype), w, teacher_hidden.to(t_dtype), tw, labels,
                                             student_bias=b, teacher_bias=tb, **options)
        # this rank's rows of the vocabulary: torch.chunk's split, as Shard(0)'s
        vocab, world = weight.shape[0], dist.get_world_size(group)
        step = -(-vocab // world)
        start = min(vocab, step * dist.get_rank(group))
        rows = slice(start, min(vocab, start + step))
        w = weight.to_local().to(s_dtype)
        if w.shape[0] != rows.stop - rows.start:
            raise ValueError(f"the lm_head weight's local shard holds {w.shape[0]} vocabulary rows; Shard(0) of "
                             f"{vocab} rows over {world} ranks gives rank {dist.get_rank(group)} rows {rows}")
        options.pop("backend", None)
        return vocab_parallel_fused_linear_distill_loss(
            hidden.to(s_dtype), w, teacher_hidden.to(t_dtype), _local_rows(teacher_weight, weight, rows, t_dtype),
            labels, student_bias_shard=_local_rows(bias, weight, rows, s_dtype),
            teacher_bias_shard=_local_rows(teacher_bias, weight, rows, t_dtype), group=group, **options)
