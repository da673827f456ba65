"""Launcher of the native fused KD kernels (``csrc/cpu/kd.cpp``, ``csrc/cuda/kd.cu``; see
``csrc/common/kd.h``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch import Tensor

from kdops import _alloc
from kdops._codes import DTYPE_CODES
from kdops.backends.native._module import call

if TYPE_CHECKING:
    from kdops.ops._common import DistillOptions


def kd_forward(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    options: DistillOptions,
    compute_grad: bool,
    teacher_log_weights: Optional[Tensor] = None,
    grad_divisor: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Row losses ``[N]`` (float32; float64 for float64 logits) of ``[N, V]`` logits, transformed
    by ``options``' logit transforms, and, if ``compute_grad``, their gradients w.r.t. the raw
    ``student`` (``[N, V]`` contiguous, student dtype, divided by the 0-dim ``grad_divisor`` when
    given; else an empty tensor).

    The caller guarantees: ``student`` ``[N, V]`` and ``teacher`` ``[N, V]`` (or ``[K, N, V]``:
    K extra mixed with ``teacher_log_weights``, a contiguous ``(K,)`` tensor of log weights in
    the loss dtype) of one dtype (float32, float16, bfloat16 or float64) and device, with
    contiguous rows (``stride(-1) == 1``); ``labels`` None or a contiguous int64 ``[N]`` tensor
    on that device; ``grad_divisor`` None or a 0-dim tensor of the loss dtype on that device.
    """
    n_rows, vocab = student.shape
    multi = teacher.dim() == 3
    device = student.device
    loss_dtype = _alloc.compute_dtype(student.dtype)
    loss = _alloc.empty(n_rows, dtype=loss_dtype, device=device)
    if compute_grad:
        grad = _alloc.empty(n_rows, vocab, dtype=student.dtype, device=device)
    else:
        grad = student.new_empty(0)
    if n_rows == 0:
        return loss, grad
    args = (
        student.data_ptr(), teacher.data_ptr(), 0 if labels is None else labels.data_ptr(),
        loss.data_ptr(), grad.data_ptr() if compute_grad else 0,
        n_rows, vocab, student.stride(0), teacher.stride(-2), vocab,
        DTYPE_CODES[student.dtype], options.divergence, options.temperature, options.beta,
        options.hard_weight, options.soft_weight, options.ignore_index,
    )
    extra = dict(student_scale=options.student_logit_scale, student_softcap=options.student_softcap or 0.0,
                 teacher_scale=options.teacher_logit_scale, teacher_softcap=options.teacher_softcap or 0.0,
                 grad_divisor_ptr=0 if grad_divisor is None else grad_divisor.data_ptr())
    if multi:
        extra.update(n_teachers=teacher.shape[0], teacher_k_stride=teacher.stride(0),
                     teacher_log_weights_ptr=teacher_log_weights.data_ptr())
    call("kd_forward", device, *args, **extra)
    return loss, grad
