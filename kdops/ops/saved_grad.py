"""Backward of the losses whose gradients are computed in forward: a scale by ``grad_output``."""
from __future__ import annotations

import torch
from torch import Tensor


def scale_saved_grad(saved: Tensor, scale: Tensor) -> Tensor:
    """``saved * scale``, in place (no second gradient-sized buffer) unless the autograd graph is
    kept for another backward (``retain_graph=True``, gradcheck), which needs ``saved`` intact, or
    the backward is being traced (torch.compile: tensor subclasses), where mutation is not wanted."""
    if type(saved) is not torch.Tensor:
        return saved.mul(scale)
    try:
        keep_graph = torch._C._autograd._get_current_graph_task_keep_graph()
    except RuntimeError:  # not inside the autograd engine (e.g. a traced backward)
        keep_graph = True
    return saved.mul(scale) if keep_graph else saved.mul_(scale)
