"""Launchers of the native kernels: ``kdops._C`` (OpenMP, CPU tensors) and ``kdops._C_cuda``
(CUDA tensors). The modules take data pointers, not tensors, so they do not link libtorch; this
file allocates the outputs and passes the pointers, strides and codes (see ``csrc/common/kd.h``).
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from kdops import _alloc

# dtype codes of csrc/common/kd.h
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple[Optional[ModuleType], str]:
    """The module kdops.<name>, or None and why it cannot be imported."""
    try:
        return importlib.import_module(f"kdops.{name}"), ""
    except ImportError as e:
        return None, (
            f"the native module kdops.{name} is not built or cannot be loaded ({e}); "
            "reinstall kdops with `pip install -e . --no-build-isolation` (needs cmake and a "
            "C++17 compiler, and nvcc for the CUDA module)"
        )


def cpu_status() -> tuple[bool, str]:
    """(whether the CPU kernels can run, why not / what they are)."""
    module, why_not = _load("_C")
    if module is None:
        return False, why_not
    return True, f"kdops._C, OpenMP with {module.num_threads()} threads"


def cuda_status() -> tuple[bool, str]:
    """(whether the CUDA kernels can run: kdops._C_cuda importable and a GPU visible, why not)."""
    module, why_not = _load("_C_cuda")
    if module is None:
        return False, why_not
    if not torch.cuda.is_available():
        return False, "kdops._C_cuda is built but no CUDA device is available"
    return True, f"kdops._C_cuda on {torch.cuda.get_device_name()}"


def kd_forward(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    divergence: int,
    temperature: float,
    beta: float,
    hard_weight: float,
    soft_weight: float,
    ignore_index: int,
    compute_grad: bool,
    teacher_log_weights: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Row losses ``[N]`` (float32; float64 for float64 logits) of ``[N, V]`` logits and, if
    ``compute_grad``, their gradients w.r.t. ``student`` (``[N, V]`` contiguous, student dtype;
    else an empty tensor).

    The caller guarantees: ``student`` ``[N, V]`` and ``teacher`` ``[N, V]`` (or ``[K, N, V]``:
    K teachers mixed with ``teacher_log_weights``, a contiguous ``(K,)`` tensor of log weights in
    the loss dtype) of one dtype (float32, float16, bfloat16 or float64) and device, with
    contiguous rows (``stride(-1) == 1``); ``labels`` None or a contiguous int64 ``[N]`` tensor
    on that device.
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
        _DTYPE_CODES[student.dtype], divergence, temperature, beta, hard_weight, soft_weight,
        ignore_index,
    )
    teachers = {}
    if multi:
        teachers = dict(n_teachers=teacher.shape[0], teacher_k_stride=teacher.stride(0),
                        teacher_log_weights_ptr=teacher_log_weights.data_ptr())
    module, why_not = _load("_C_cuda" if device.type == "cuda" else "_C")
    if module is None:
        raise RuntimeError(why_not)
    if device.type == "cuda":
        with torch.cuda.device(device):
            module.kd_forward(*args, torch.cuda.current_stream(device).cuda_stream, **teachers)
    else:
        module.kd_forward(*args, **teachers)
    return loss, grad


def sparse_kd_forward(
    student: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    labels: Optional[Tensor],
    divergence: int,
    temperature: float,
    beta: float,
    hard_weight: float,
    soft_weight: float,
    ignore_index: int,
    bucket: bool,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Sparse (top-k teacher) KD: row losses ``[N]`` and, if ``compute_grad``, their gradients
    w.r.t. ``student`` (``[N, V]`` contiguous, student dtype; else an empty tensor); see
    ``csrc/common/sparse_kd.h``.

    The caller guarantees: ``student`` ``[N, V]`` with contiguous rows; ``topk_logprobs``
    contiguous ``[N, K]`` float32 (float64 for a float64 student) and ``topk_indices``
    contiguous int32 ``[N, K]`` on its device; ``labels`` None or contiguous int64 ``[N]``.
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
        student.stride(0), vocab, _DTYPE_CODES[student.dtype], divergence, temperature, beta,
        hard_weight, soft_weight, ignore_index, bucket,
    )
    module, why_not = _load("_C_cuda" if device.type == "cuda" else "_C")
    if module is None:
        raise RuntimeError(why_not)
    if device.type == "cuda":
        with torch.cuda.device(device):
            module.sparse_kd_forward(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        module.sparse_kd_forward(*args)
    return loss, grad
