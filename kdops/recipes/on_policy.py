"""On-policy distillation (GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes").

The student samples continuations ``y ~ p_s(. | x)`` of prompts ``x`` (no gradient through the
sampling), the teacher scores every prefix of them, and the loss is the per-token divergence
between the two next-token distributions on the student's own samples,

    L_on(x) = mean_i D(p_t(. | x, y_<i), p_s(. | x, y_<i)),   D = reverse KL or generalized JSD(beta),

so the student is corrected on the states it actually visits (train/inference mismatch of
supervised KD). GKD mixes: with probability ``on_policy_fraction`` (lambda) a batch is on-policy,
otherwise the same divergence on the data's own continuations (supervised KD).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdops.recipes.generation import CausalLM, continuation_distill_loss, sample


def on_policy_loss(student: CausalLM, teacher: CausalLM, prompts: Tensor, new_tokens: int, *,
                   divergence: str = "reverse_kl", beta: float = 0.5, temperature: float = 1.0,
                   sample_temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                   backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """``L_on``: the student continues ``prompts (B, P)`` by ``new_tokens`` sampled tokens (at
    ``sample_temperature``), then ``D`` at ``temperature`` on those positions via
    ``kdops.fused_linear_distill_loss`` from hidden states. Returns ``(loss, sequences)``."""
    sequences = sample(student, prompts, new_tokens, temperature=sample_temperature, generator=generator)
    loss = continuation_distill_loss(student, teacher, sequences, prompts.shape[1], divergence=divergence,
                                     temperature=temperature, beta=beta, backend=backend)
    return loss, sequences


def gkd_loss(student: CausalLM, teacher: CausalLM, sequences: Tensor, prompt_len: int, *,
             on_policy_fraction: float = 0.5, divergence: str = "reverse_kl", beta: float = 0.5,
             temperature: float = 1.0, sample_temperature: float = 1.0,
             generator: Optional[torch.Generator] = None, backend: Optional[str] = None) -> Tensor:
    """One GKD batch from data ``sequences (B, L)``: with probability ``on_policy_fraction`` (a
    draw of ``generator``) ``L_on`` on the student's continuations of their first ``prompt_len``
    tokens (as many new tokens as the data has), else ``D`` on every position of the data."""
    if not 0.0 <= on_policy_fraction <= 1.0:
        raise ValueError(f"on_policy_fraction must be in [0, 1], got {on_policy_fraction}")
    if torch.rand((), generator=generator, device=generator.device if generator else "cpu") < on_policy_fraction:
        return on_policy_loss(student, teacher, sequences[:, :prompt_len], sequences.shape[1] - prompt_len,
                              divergence=divergence, beta=beta, temperature=temperature,
                              sample_temperature=sample_temperature, generator=generator, backend=backend)[0]
    return continuation_distill_loss(student, teacher, sequences, 1, divergence=divergence,
                                     temperature=temperature, beta=beta, backend=backend)
