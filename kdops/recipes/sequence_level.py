"""Sequence-level distillation from teacher generations (Kim & Rush 2016; the synthetic-data
recipe of LLM distillation).

The teacher is run once: it continues prompts by sampling at a temperature, and its
continuations become the student's training corpus. The student then trains on that corpus
with cross-entropy on the continued tokens, optionally plus token-level KD on the same
sequences (the teacher's full distributions at those positions):

    L = CE(y)                                   (teacher=None)
    L = a CE(y) + (1 - a) KL(p_t || p_s)         (teacher given, hard_weight = a)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdops.recipes.generation import CausalLM, continuation_distill_loss, continuation_nll, sample


def generate_corpus(teacher: CausalLM, prompts: Tensor, new_tokens: int, *, temperature: float = 1.0,
                    batch_size: int = 256, generator: Optional[torch.Generator] = None) -> Tensor:
    """The teacher's continuations of ``prompts (n, P)``, ``(n, P + new_tokens)``, sampled at
    ``temperature`` in batches of ``batch_size`` prompts."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return torch.cat([sample(teacher, chunk, new_tokens, temperature=temperature, generator=generator)
                      for chunk in prompts.split(batch_size)])


def sequence_level_loss(student: CausalLM, sequences: Tensor, prompt_len: int, *,
                        teacher: Optional[CausalLM] = None, hard_weight: float = 0.5,
                        temperature: float = 1.0, backend: Optional[str] = None) -> Tensor:
    """``L`` above on a batch of the generated corpus: CE on its continued tokens, or with a
    ``teacher`` ``hard_weight * CE + (1 - hard_weight) * KD`` through
    ``kdops.fused_linear_distill_loss``."""
    if teacher is None:
        return continuation_nll(student, sequences, prompt_len)
    if not 0.0 <= hard_weight <= 1.0:
        raise ValueError(f"hard_weight must be in [0, 1], got {hard_weight}")
    return continuation_distill_loss(student, teacher, sequences, prompt_len, temperature=temperature,
                                     hard_weight=hard_weight, backend=backend)
