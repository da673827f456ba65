"""Launchers of the native attention-relation kernels (``csrc/cpu/attention_relation.cpp``,
``csrc/cuda/attention_relation.cu``; see ``csrc/common/attention_relation.h``): the ``_KERNELS``
contract of :mod:`kdops.ops.attention_relation`, with the outputs allocated here and the tensors
passed as data pointers. The tensors' device picks ``kdops._C`` or ``kdops._C_cuda``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from kdops import _alloc
from kdops._codes import DTYPE_CODES
from kdops.backends.native._module import call


def _shape_arguments(sa: Tensor, sb: Tensor, ta: Tensor, tb: Tensor) -> tuple:
    """batch, heads, length, student_dim, teacher_dim and the (b, h, l) strides of the four inputs."""
    B, H, L, Ds = sa.shape
    return (B, H, L, Ds, ta.shape[-1], *(tuple(x.stride()[:3]) for x in (sa, sb, ta, tb)))


def relation_forward(sa: Tensor, sb: Tensor, ta: Tensor, tb: Tensor, counted: Optional[Tensor], causal: bool,
                     temperature: float, divergence: int, beta: float) -> tuple[Tensor, Tensor]:
    """(row losses ``[B, H, L]``, stats ``[3, B, H, L]`` = lse_s, lse_t, S), compute dtype."""
    B, H, L, _ = sa.shape
    cdt = _alloc.compute_dtype(sa.dtype)
    rows = _alloc.empty(B, H, L, dtype=cdt, device=sa.device)
    stats = _alloc.empty(3, B, H, L, dtype=cdt, device=sa.device)
    call("attention_relation_forward", sa.device, sa.data_ptr(), sb.data_ptr(), ta.data_ptr(), tb.data_ptr(),
         0 if counted is None else counted.data_ptr(), rows.data_ptr(), stats.data_ptr(),
         *_shape_arguments(sa, sb, ta, tb), causal, DTYPE_CODES[sa.dtype], divergence, temperature, beta)
    return rows, stats


def relation_backward(grad_rows: Tensor, sa: Tensor, sb: Tensor, ta: Tensor, tb: Tensor, counted: Optional[Tensor],
                      stats: Tensor, causal: bool, temperature: float, divergence: int,
                      beta: float) -> tuple[Tensor, Tensor]:
    """(dL/dsa, dL/dsb), contiguous, in the student dtype, from the contiguous ``[B, H, L]``
    gradient of the row losses."""
    da = _alloc.empty(*sa.shape, dtype=sa.dtype, device=sa.device)
    db = _alloc.empty(*sa.shape, dtype=sa.dtype, device=sa.device)
    grad_rows = grad_rows.to(stats.dtype).contiguous()
    call("attention_relation_backward", sa.device, grad_rows.data_ptr(), sa.data_ptr(), sb.data_ptr(),
         ta.data_ptr(), tb.data_ptr(), 0 if counted is None else counted.data_ptr(), stats.data_ptr(),
         da.data_ptr(), db.data_ptr(), *_shape_arguments(sa, sb, ta, tb), causal, DTYPE_CODES[sa.dtype], divergence,
         temperature, beta)
    return da, db
