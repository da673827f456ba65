"""The soft-target divergences kdops knows, and the integer codes the kernels use.

With ``p_t = softmax(teacher / T)`` and ``p_s = softmax(student / T)`` per row:

=================== ===========================================================  ============
name                row divergence                                               beta
=================== ===========================================================  ============
``forward_kl``      KL(p_t || p_s)                                               unused
``reverse_kl``      KL(p_s || p_t)                                               unused
``jsd``             b KL(p_t || M) + (1-b) KL(p_s || M),  M = b p_t + (1-b) p_s  (0, 1)
``skew_forward_kl`` KL(p_t || b p_t + (1-b) p_s)                                 [0, 1)
``skew_reverse_kl`` KL(p_s || b p_s + (1-b) p_t)                                 [0, 1)
``tvd``             0.5 sum |p_t - p_s|                                          unused
=================== ===========================================================  ============

The code of a divergence is its index in :data:`DIVERGENCES`; ``csrc/common/divergence.h``
and ``kdops/backends/triton/divergence.py`` use the same numbering (kdops._codes).
"""
from __future__ import annotations

from kdops._codes import DIVERGENCES

# Divergences whose beta must lie in an interval: name -> (low, high, low_inclusive).
BETA_RANGES: dict[str, tuple[float, float, bool]] = {
    "jsd": (0.0, 1.0, False),
    "skew_forward_kl": (0.0, 1.0, True),
    "skew_reverse_kl": (0.0, 1.0, True),
}


def divergence_code(name: str) -> int:
    """Return the kernel code of divergence ``name`` (ValueError naming the options if unknown)."""
    try:
        return DIVERGENCES.index(name)
    except ValueError:
        raise ValueError(
            f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}; got {name!r}"
        ) from None
