"""Launchers of the native relation-based kernels (``csrc/cpu/affinity.cpp``,
``csrc/cuda/affinity.cu``): the ``_KERNELS`` contract of :mod:`kdops.ops.affinity`, with the
outputs allocated here and the tensors passed as data pointers (see ``csrc/common/affinity.h``).
One module serves both devices: the tensors' device picks ``kdops._C`` or ``kdops._C_cuda``.
"""
from __future__ import annotations

from torch import Tensor

from kdops import _alloc
from kdops._codes import DTYPE_CODES, relation_stats_shape
from kdops.backends.native._module import call


def affinity_forward(x: Tensor, kind: int) -> Tensor:
    """``[B, B]`` affinity (compute dtype) of the rows of ``x [B, D]`` (rows contiguous)."""
    B, D = x.shape
    out = _alloc.empty(B, B, dtype=_alloc.compute_dtype(x.dtype), device=x.device)
    if B:
        call("affinity_forward", x.device, x.data_ptr(), out.data_ptr(), B, D, x.stride(0), out.stride(0),
              DTYPE_CODES[x.dtype], kind)
    return out


def affinity_backward(grad: Tensor, x: Tensor, out: Tensor, kind: int) -> Tensor:
    """``dL/dx [B, D]`` (x dtype) from ``grad = dL/dA [B, B]`` (any strides) and ``out = A``."""
    B, D = x.shape
    dx = _alloc.empty(B, D, dtype=x.dtype, device=x.device)
    if B:
        grad = grad.to(out.dtype)
        call("affinity_backward", x.device, grad.data_ptr(), grad.stride(0), grad.stride(1), x.data_ptr(),
              out.data_ptr(), out.stride(0), dx.data_ptr(), B, D, x.stride(0), DTYPE_CODES[x.dtype], kind)
    return dx


def relation_forward(student: Tensor, teacher: Tensor, loss: int, beta: float) -> tuple[Tensor, Tensor]:
    """(loss, stats) of SP / RKD-D / RKD-A for ``student [B, Ds]``, ``teacher [B, Dt]`` (same
    dtype, contiguous rows); stats as :func:`kdops.backends.triton.affinity.relation_forward`."""
    (B, Ds), Dt = student.shape, teacher.shape[1]
    cdt = _alloc.compute_dtype(student.dtype)
    value = _alloc.empty(dtype=cdt, device=student.device)
    stats = _alloc.empty(*relation_stats_shape(loss, B), dtype=cdt, device=student.device)
    call("relation_forward", student.device, student.data_ptr(), teacher.data_ptr(), value.data_ptr(),
          stats.data_ptr(), B, Ds, Dt, student.stride(0), teacher.stride(0), DTYPE_CODES[student.dtype], loss,
          beta)
    return value, stats


def relation_backward(grad: Tensor, student: Tensor, teacher: Tensor, stats: Tensor, loss: int,
                      beta: float) -> Tensor:
    """``dL/dstudent [B, Ds]`` (student dtype) from the 0-d ``grad`` and the forward's ``stats``."""
    (B, Ds), Dt = student.shape, teacher.shape[1]
    dx = _alloc.empty(B, Ds, dtype=student.dtype, device=student.device)
    grad = grad.to(stats.dtype).contiguous()
    call("relation_backward", student.device, grad.data_ptr(), student.data_ptr(), teacher.data_ptr(),
          stats.data_ptr(), dx.data_ptr(), B, Ds, Dt, student.stride(0), teacher.stride(0),
          DTYPE_CODES[student.dtype], loss, beta)
    return dx
