"""What the Hugging Face integrations share: the dtype a loss runs in under autocast, and
``lm_head`` weights that FSDP2 / tensor parallelism hand over as DTensors."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial


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
