"""Launcher of the native sparse (top-k teacher) KD kernels (``csrc/cpu/sparse_kd.cpp``,
``csrc/cuda/sparse_kd.cu``; see ``csrc/common/sparse_kd.h``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch import Tensor

from kdops import _alloc
from kdops._codes import DTYPE_CODES
from kdops.backends.native._module import call

if TYPE_CHECKING:
    from kdops.ops._common import DistillOptions


def sparse_kd_forward(
    student: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    labels: Optional[Tensor],
    options: DistillOptions,
    compute_grad: bool,
    grad_divisor: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Sparse (top-k teacher) KD: row losses ``[N]`` of the student's transformed logits (the
    options' student logit transform) and, if ``compute_grad``, their gradients w.r.t. the raw
    ``student`` (``[N, V]`` contiguous, student dtype, divided by the 0-dim ``grad_divisor`` when
    given; else an empty tensor); see ``csrc/common/sparse_kd.h``.

    The caller guarantees: ``student`` ``[N, V]`` with contiguous rows; ``topk_logprobs``
    contiguous ``[N, K]`` float32 (float64 for a float64 student) and ``topk_indices``
    contiguous int32 ``[N, K]`` on its device; ``labels`` None or contiguous int64 ``[N]``;
    ``grad_divisor`` None or a 0-dim tensor of the loss dtype on that device.
    """
    n_rows, vocab = student.shape
    device = student.device
    loss_dtype = _alloc.compute_dtype(student.dtype)
    loss = _alloc.empty(n_rows, dtype=loss_dtype, device=device)
    grad = _alloc.empty(n_rows, vocab, dtype=student.dtype, device=device) if compute_grad else student.new_empty(0)
    if n_rows == 0:
        return loss, grad
    args = (
        student.data_ptr(), topk_logprobs.data_ptr(), topk_indices.data_ptr(),
        0 if labels is None else labels.data_ptr(), loss.data_ptr(),
        grad.data_ptr() if compute_grad else 0, n_rows, vocab, topk_indices.shape[1],
        student.stride(0), vocab, DTYPE_CODES[student.dtype], options.divergence, options.temperature,
        options.beta, options.hard_weight, options.soft_weight, options.ignore_index, options.rest_bucket,
    )
    call("sparse_kd_forward", device, *args, student_scale=options.student_logit_scale,
         student_softcap=options.student_softcap or 0.0,
         grad_divisor_ptr=grad_divisor.data_ptr() if compute_grad and grad_divisor is not None else 0)
    return loss, grad
