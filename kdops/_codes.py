"""Every code and constant that Python shares with the Triton and C++ kernels, defined once.

The C++ side (``csrc/common/codes.h``) and the Triton constexprs repeat these numbers because
they are other languages; ``tests/test_codes.py`` checks that they agree with this file.
"""
from __future__ import annotations

import torch

# Soft-target divergences: the code of a divergence is its index (see kdops.divergences).
DIVERGENCES: tuple[str, ...] = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
)
# The kd family's DeiT hard target (cross-entropy against the teacher's argmax): the code after
# the soft divergences, taken by kdops.distill_loss only.
HARD_TARGET = "hard"
KD_DIVERGENCES: tuple[str, ...] = DIVERGENCES + (HARD_TARGET,)

# Affinity kinds of kdops.affinity: code = index.
AFFINITY_KINDS: tuple[str, ...] = ("dot", "cosine", "euclidean", "squared_euclidean")

# Relation losses of the affinity family.
SP, RKD_DISTANCE, RKD_ANGLE = 0, 1, 2

# Element dtypes of the native modules' pointers.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

# Relation-based epsilons: norms clamp at NORM_EPS (squared norms below NORM_EPS2 are 0), squared
# distances clamp at DIST_EPS2.
NORM_EPS = 1e-12
NORM_EPS2 = NORM_EPS * NORM_EPS
DIST_EPS2 = 1e-12
# Pairwise distances are computed on the batch centred on its mean; a pair whose Gram-form squared
# distance n_i + n_j - 2 x_i.x_j is below CLOSE_PAIR_RATIO * (n_i + n_j) (the form cancels there)
# is recomputed from the differences sum_k (x_ik - x_jk)^2.
CLOSE_PAIR_RATIO = 2.0**-10


def relation_stats_shape(loss: int, batch: int) -> tuple[int, ...]:
    """Shape of the statistics a relation loss's forward saves for its backward."""
    return {SP: (3, batch), RKD_DISTANCE: (3,), RKD_ANGLE: (0,)}[loss]
