"""Feature-based distillation: ``kdops.hint_loss`` (FitNets) and ``kdops.attention_transfer_loss``
(AT). Thin API over torch ops (:mod:`kdops.reference`), no kernels: argument checks with errors
naming the argument, computation in float32 (float64 for float64 features), the teacher a constant.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from torch import Tensor

from kdops import reference
from kdops.ops import validation


def hint_loss(f_s: Tensor, f_t: Tensor, adapter: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """FitNets hint loss (Romero et al., 2015): ``mean((adapter(f_s) - f_t)^2)``.

    ``adapter`` maps the student features to the teacher's shape: any module or callable, e.g.
    :class:`kdops.nn.Adapter` (a linear map over dim 1, the same as a 1x1 convolution); None is
    the identity. Gradient to ``f_s`` (and the adapter's parameters) only.
    """
    validation.check_float_tensor("f_s", f_s)
    validation.check_float_tensor("f_t", f_t)
    validation.check_same_device(f_s=f_s, f_t=f_t)
    if adapter is not None and not callable(adapter):
        raise TypeError(f"adapter must be a module or callable (or None); got {type(adapter).__name__}")
    hint = f_s if adapter is None else adapter(f_s)
    if not isinstance(hint, Tensor):
        raise TypeError(f"adapter must return a torch.Tensor; got {type(hint).__name__}")
    if hint.shape != f_t.shape:
        where = "adapter(f_s)" if adapter is not None else "f_s (pass an adapter to map it)"
        raise ValueError(f"f_t must have the shape of {where}; got {tuple(hint.shape)} and f_t {tuple(f_t.shape)}")
    return reference.hint_loss(hint, f_t)


def attention_transfer_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, 2017) between ``(B, C, *spatial)`` feature maps:
    ``mean over B * HW of (a_s - a_t)^2`` with ``a = F.normalize(mean_c |f_c|^p)`` flattened per
    sample (the channel mean, as the original; the normalisation makes it equal to the sum).
    Channel counts may differ; batch and spatial sizes must match; ``p >= 1``. Gradient to
    ``f_s`` only."""
    validation.check_float_tensor("f_s", f_s)
    validation.check_float_tensor("f_t", f_t)
    for name, f in (("f_s", f_s), ("f_t", f_t)):
        if f.dim() < 3:
            raise ValueError(f"{name} must be a feature map (B, C, *spatial); got shape {tuple(f.shape)}")
    if f_t.shape[0] != f_s.shape[0]:
        raise ValueError(f"f_t must have the batch size of f_s; got f_s {tuple(f_s.shape)} and f_t {tuple(f_t.shape)}")
    if f_t.shape[2:] != f_s.shape[2:]:
        raise ValueError(
            f"f_t must have the spatial size of f_s (interpolate one first); got f_s {tuple(f_s.shape)} "
            f"and f_t {tuple(f_t.shape)}"
        )
    validation.check_same_device(f_s=f_s, f_t=f_t)
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p must be a number; got {type(p).__name__}")
    if not (math.isfinite(p) and p >= 1):  # p < 1: |f|^p has an infinite slope at f = 0
        raise ValueError(f"p must be a finite number >= 1; got {p}")
    return reference.attention_transfer_loss(f_s, f_t, float(p))
