"""Distillation from an offline teacher cache (:mod:`kdops.cache`): the teacher runs once over
the student's data and stores per token either its top-k log-probabilities and rest mass
(``mode="topk"``) or k draws from its distribution as ids and counts (``mode="sample"``); the
student then trains from the cache without the teacher:

    L = a CE(x_next) + (1 - a) D(q, p_s),   q = top-k (+ rest bucket) or counts / k,

through ``kdops.fused_linear_sparse_distill_loss`` from the student's hidden states. With
sampled targets the forward-KL gradient ``p_s - counts / k`` is an unbiased estimate of the
dense one ``p_s - p_t``; top-k's is biased toward the head of the distribution.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

import kdops
from kdops.cache import TeacherCache
from kdops.recipes.generation import CausalLM

REST_MASS = {"topk": "bucket", "sample": "ignore"}  # counts / k sum to 1: no rest to model


def cached_distill_loss(student: CausalLM, cache: TeacherCache, example_ids: Sequence[int], sequences: Tensor, *,
                        hard_weight: float = 0.0, divergence: str = "forward_kl", beta: float = 0.5,
                        backend: Optional[str] = None) -> Tensor:
    """``L`` on ``sequences (B, L + 1)`` whose inputs ``sequences[:, :-1]`` the cache holds as
    examples ``example_ids`` (``L`` tokens each), at the cache's temperature; top-k caches with
    their rest mass as a bucket (``rest_mass="bucket"``)."""
    if sequences.dim() != 2 or len(example_ids) != sequences.shape[0]:
        raise ValueError(f"sequences must be (len(example_ids), length); got {tuple(sequences.shape)} for "
                         f"{len(example_ids)} example ids")
    soft = cache.read(list(example_ids))
    if soft.logprobs.shape[0] != sequences.numel() - sequences.shape[0]:
        raise ValueError(f"the cache holds {soft.logprobs.shape[0]} tokens for these examples, the sequences' "
                         f"inputs {sequences.numel() - sequences.shape[0]}")
    hidden = student(sequences[:, :-1]).flatten(0, 1)
    labels = sequences[:, 1:].flatten() if hard_weight > 0 else None
    return kdops.fused_linear_sparse_distill_loss(
        hidden, student.lm_head.weight, soft.logprobs.to(hidden.device), soft.indices.to(hidden.device), labels,
        student_bias=student.lm_head.bias, temperature=cache.temperature, divergence=divergence, beta=beta,
        rest_mass=REST_MASS[cache.mode], hard_weight=hard_weight, backend=backend)
