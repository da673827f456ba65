"""Output allocation for the kernels' launchers.

``KDOPS_POISON_OUTPUTS=1`` fills every output with NaN before a kernel runs, so that tests can
check that a kernel writes every element it returns (``torch.empty`` could hand back memory that
already holds the right values).
"""
from __future__ import annotations

import os

import torch


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if os.environ.get("KDOPS_POISON_OUTPUTS") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
