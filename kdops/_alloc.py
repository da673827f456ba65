"""Output allocation for the kernels' launchers, and the dtype kdops computes in.

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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses are computed and accumulated in for ``dtype`` inputs: float64 for float64,
    float32 for everything else (float32, float16, bfloat16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
