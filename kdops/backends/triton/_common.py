"""What every Triton kernel file of kdops shares: the interpreter switch, the block policy, the
accumulation dtypes, the jit helpers of the row kernels and the one launch helper.

* ``INTERPRETING``: ``TRITON_INTERPRET=1`` (read once, at import; Triton reads it when it
  decorates the kernels, so it must be set before the first import of kdops' Triton modules).
* Block policy: :func:`block` gives the GPU's block size, or under the interpreter a smaller
  (faster in numpy) one, unless ``KDOPS_TRITON_GPU_BLOCKS=1`` (``GPU_BLOCKS``): then the
  interpreter runs the GPU's blocks too, so that the loop tails and masks a GPU executes have run.
* Runtime flags: a switch that only steers a branch uniform over a program (whether labels, a
  hard term, gradients, a mask are there; causal or not) is a runtime bool, not a constexpr, so
  that it adds no compiled variant (a GPU JIT-compiles each constexpr combination once,
  ``tools/aot_check.py`` compiles each for three targets); an absent optional input it guards
  is :func:`or_absent`. What selects different math (the divergence, the dtype, the tiles) stays a
  constexpr: one kernel holding every divergence as a runtime branch took 180 registers where
  its constexpr kernels took 64-117 (sm_90), and compiled 4 times slower.
* :func:`launch`: ``kernel[grid](...)`` on the tensors' CUDA device and its current stream (Triton
  itself takes the *current* device and that device's current stream).
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import torch
import triton
import triton.language as tl

from kdops import _codes

INTERPRETING: bool = os.environ.get("TRITON_INTERPRET") == "1"
GPU_BLOCKS: bool = os.environ.get("KDOPS_TRITON_GPU_BLOCKS") == "1"

# The interpreter's tl.dot multiplies the raw bits of bfloat16 operands (it has no bfloat16
# arithmetic; triton-lang/triton#11584): kernels upcast 16-bit dot operands to float32 first
# when this is set (exact for 16-bit inputs, so products and float32 sums match the GPU's).
UPCAST_DOT: tl.constexpr = tl.constexpr(INTERPRETING)


def block(gpu: Any, interpreter: Any) -> Any:
    """``gpu`` (a block size or a tuple of launch options), or ``interpreter`` when the Triton
    interpreter runs without ``KDOPS_TRITON_GPU_BLOCKS=1``."""
    return interpreter if INTERPRETING and not GPU_BLOCKS else gpu


def row_block(n: int, max_block: int, min_block: int = 16) -> int:
    """Block of a loop over ``n`` elements of a row: next_power_of_2(n) within [min_block, max_block]."""
    return min(max(triton.next_power_of_2(n), min_block), max(max_block, min_block))


def row_warps(block_size: int) -> int:
    """Warps of a one-row program with ``block_size`` lanes: 1 per 256 lanes, 1 to 8."""
    return max(1, min(8, block_size // 256))


# Accumulation (compute) dtype of each input dtype: float32, float64 for float64.
ACC_DTYPE = {
    torch.float32: tl.float32,
    torch.float16: tl.float32,
    torch.bfloat16: tl.float32,
    torch.float64: tl.float64,
}


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton accumulation dtype of ``dtype`` logits; TypeError for other dtypes."""
    if dtype not in ACC_DTYPE:
        raise TypeError(f"the triton backend takes float32, float16, bfloat16 or float64 logits; got {dtype}")
    return ACC_DTYPE[dtype]


_MIXTURE_CODES = tuple(map(_codes.DIVERGENCES.index, ("jsd", "skew_forward_kl", "skew_reverse_kl")))


def mixture_logs(divergence: int, beta: float) -> tuple[float, float]:
    """log(beta) (-inf for beta = 0) and log(1 - beta) for the mixture divergences, else unused (0, 0)."""
    if divergence in _MIXTURE_CODES:
        return (math.log(beta) if beta > 0 else -math.inf), math.log1p(-beta)
    return 0.0, 0.0


@triton.jit
def exp_sum(z, m_old, m_new, x, scale):
    """Online softmax sum: z * exp((m_old - m_new) * scale) + sum(exp((x - m_new) * scale)).

    A running maximum m_new = -inf (every element so far -inf) is replaced by 0, so that
    (-inf) - (-inf) never makes a NaN: the -inf elements then add exp(-inf) = 0."""
    m = tl.where(m_new == float("-inf"), 0.0, m_new)
    return z * tl.exp((m_old - m) * scale) + tl.sum(tl.exp((x - m) * scale), axis=0)


@triton.jit
def write_ignored_row(g_row, loss_ptr, grad_ptr, row, V, BLOCK_V: tl.constexpr, compute_grad):
    """An ignored row (label == ignore_index): loss 0 and, with the runtime flag ``compute_grad``,
    a zero gradient row."""
    if compute_grad:
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            tl.store(g_row + cols, tl.zeros([BLOCK_V], grad_ptr.dtype.element_ty), mask=cols < V)
    tl.store(loss_ptr + row, tl.zeros([], loss_ptr.dtype.element_ty))


def or_absent(x: Optional[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``x``, or for ``None`` an empty ``dtype`` tensor (a null pointer): an optional input that a
    kernel reads only under a runtime flag, so that present and absent compile to one kernel
    (``None`` would be a constexpr)."""
    return torch.empty(0, dtype=dtype, device=device) if x is None else x


def launch(kernel: Any, grid: Sequence[int], device: torch.device, *args: Any, **options: Any) -> None:
    """``kernel[grid](*args, **options)`` on ``device``: for a CUDA device, with it made current,
    so that Triton launches there and on its current stream (not on whichever device is current)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[tuple(grid)](*args, **options)
    else:
        kernel[tuple(grid)](*args, **options)
