"""kdops: fused knowledge-distillation losses for PyTorch (Triton, CUDA C++, C++ CPU kernels)."""
from kdops import cache, distributed, nn, reference
from kdops._dispatch import BACKENDS, available_backends
from kdops.divergences import DIVERGENCES
from kdops.ops.affinity import affinity, rkd_angle_loss, rkd_distance_loss, similarity_preserving_loss
from kdops.ops.attention_relation import attention_relation_loss
from kdops.ops.feature import attention_transfer_loss, hint_loss
from kdops.ops.fused_linear import fused_linear_distill_loss
from kdops.ops.kd import distill_loss
from kdops.ops.sparse_kd import fused_linear_sparse_distill_loss, sparse_distill_loss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DIVERGENCES",
    "affinity",
    "attention_relation_loss",
    "attention_transfer_loss",
    "available_backends",
    "cache",
    "distill_loss",
    "distributed",
    "fused_linear_distill_loss",
    "fused_linear_sparse_distill_loss",
    "hint_loss",
    "nn",
    "reference",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "similarity_preserving_loss",
    "sparse_distill_loss",
]
