"""A model's final-logit transform inside Triton kernels (the math of
:class:`kdops.ops._chunked.LogitTransform` and ``csrc/common/logit_transform.h``)::

    z' = scale * z                              KIND = TRANSFORM_SCALE
    z' = softcap * tanh(scale * z / softcap)    KIND = TRANSFORM_SOFTCAP
    dz'/dz = scale * (1 - (z' / softcap)**2)    (scale without a softcap)

in the kernel's float32 (float64) accumulation type; ``KIND`` is a compile-time constant
(``TRANSFORM_NONE``: the identity, no code). A -inf logit stays -inf under a scale (> 0) and
becomes ``-softcap`` under a softcap (slope 0), as ``torch.tanh`` in the reference.
"""
from typing import Optional

import triton
import triton.language as tl

TRANSFORM_NONE: tl.constexpr = tl.constexpr(0)
TRANSFORM_SCALE: tl.constexpr = tl.constexpr(1)
TRANSFORM_SOFTCAP: tl.constexpr = tl.constexpr(2)


def transform_kind(scale: float, softcap: Optional[float]) -> int:
    """The ``KIND`` constexpr of a checked transform (``scale`` > 0, ``softcap`` None or > 0)."""
    if softcap is not None:
        return TRANSFORM_SOFTCAP.value
    return (TRANSFORM_NONE if scale == 1.0 else TRANSFORM_SCALE).value


def transform_args(scale: float, softcap: Optional[float]) -> tuple[float, float, int]:
    """``(scale, softcap, KIND)`` as the kernels take them (softcap 1.0 when None: never read)."""
    return float(scale), 1.0 if softcap is None else float(softcap), transform_kind(scale, softcap)


@triton.jit
def _tanh(y):
    """``tanh(y)`` from ``t = exp(-2|y|)``: ``sign(y) (1 - t) / (1 + t)`` (no overflow; +-inf give +-1)."""
    t = tl.exp(-2.0 * tl.abs(y))
    th = (1.0 - t) / (1.0 + t)
    return tl.where(y < 0, -th, th)


@triton.jit
def transform(z, scale, softcap, KIND: tl.constexpr):
    """``z'`` of the logits ``z`` (any shape, float32 / float64)."""
    if KIND == TRANSFORM_SCALE:
        z = z * scale
    elif KIND == TRANSFORM_SOFTCAP:
        z = softcap * _tanh(z * scale / softcap)
    return z


@triton.jit
def transform_slope(z_transformed, scale, softcap, KIND: tl.constexpr):
    """``dz'/dz`` from the transformed logits ``z'`` (1 for ``TRANSFORM_NONE``)."""
    if KIND == TRANSFORM_SOFTCAP:
        x = z_transformed / softcap
        slope = scale * (1.0 - x * x)
    elif KIND == TRANSFORM_SCALE:
        slope = tl.zeros_like(z_transformed) + scale
    else:
        slope = tl.zeros_like(z_transformed) + 1.0
    return slope


@triton.jit
def load_transformed(ptrs, mask, other, scale, softcap, KIND: tl.constexpr, ACC: tl.constexpr):
    """The transformed logits at ``ptrs`` in ACC; masked lanes read ``other`` untransformed (a
    softcap would map a -inf ``other`` to -softcap)."""
    z = transform(tl.load(ptrs, mask=mask, other=other).to(ACC), scale, softcap, KIND)
    if KIND == TRANSFORM_SOFTCAP:
        z = tl.where(mask, z, other)
    return z
