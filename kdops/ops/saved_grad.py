"""Backward of the losses whose gradients are computed in forward: a scale by ``grad_output``.

The saved gradient was rounded to its dtype once, by the kernel, with the reduction's ``1 / count``
(or ``1 / normalizer``) already folded in (see :mod:`kdops.ops._common`). Backward keeps it at
one gradient-sized tensor in every dtype: a scalar ``grad_output`` of 1 (``loss.backward()`` on
CPU, where reading it needs no device sync) returns the saved gradient itself; another scalar
scales it in its own dtype (a 0-dim operand: no float32 temporary of a 16-bit gradient); per-row
weights (``reduction="none"``) scale it in blocks of rows, so that torch's float32 temporaries of
a 16-bit gradient stay block-sized.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Elements per block of rows scaled at once by per-row weights (256 KiB float32 temporaries).
ROW_BLOCK_ELEMENTS = 2**16


def _keep_graph() -> bool:
    """Whether the autograd graph is kept for another backward (``retain_graph=True``, gradcheck):
    the saved gradient must then stay intact. True outside the autograd engine (a traced backward)."""
    try:
        return torch._C._autograd._get_current_graph_task_keep_graph()
    except RuntimeError:
        return True


def scale_saved_grad(saved: Tensor, scale: Tensor) -> Tensor:
    """``saved * scale`` in ``saved``'s dtype, ``scale`` one number (any shape of one element) or
    per-row weights ``[N, 1]`` of ``saved`` ``[N, ...]``; in place (no second gradient-sized
    buffer) unless the graph is kept (see :func:`_keep_graph`) or the backward is being traced
    (torch.compile: tensor subclasses, which get plain out-of-place ops)."""
    if type(saved) is not torch.Tensor or type(scale) is not torch.Tensor:
        return saved.mul(scale.reshape(()) if scale.numel() == 1 else scale).to(saved.dtype)
    in_place = not _keep_graph()
    if scale.numel() == 1:
        scale = scale.reshape(())
        if scale.device.type == "cpu" and bool(scale == 1):  # host memory: no sync
            return saved
        return saved.mul_(scale) if in_place else saved.mul(scale)
    out = saved if in_place else torch.empty_like(saved)
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, saved[:1].numel()))
    for start in range(0, saved.shape[0], rows):
        block = slice(start, start + rows)
        torch.mul(saved[block], scale[block], out=out[block])
    return out
