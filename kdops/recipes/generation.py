"""Sampling from a causal LM and losses on the tokens it continued a prompt with.

A *causal LM* here is any ``nn.Module`` that maps token ids ``(B, L)`` to final hidden states
``(B, L, H)`` and has an ``lm_head`` (``nn.Linear(H, V)``): the logits are ``lm_head(h)``, so
the losses can run through :func:`kdops.fused_linear_distill_loss` without forming them.
A *continuation* is a sequence ``(B, P + N)`` whose first ``P`` tokens are the prompt; its
scored positions are ``P - 1 .. P + N - 2`` (each predicting one continued token).
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdops


class CausalLM(Protocol):
    """``model(ids) -> hidden (B, L, H)``; logits ``model.lm_head(hidden)``."""

    lm_head: nn.Linear

    def __call__(self, ids: Tensor) -> Tensor: ...

    def train(self, mode: bool = True) -> nn.Module: ...


def _check_continuation(sequences: Tensor, prompt_len: int) -> None:
    if sequences.dim() != 2 or sequences.dtype != torch.long:
        raise ValueError(f"sequences must be a (batch, length) int64 tensor, got {tuple(sequences.shape)} "
                         f"{sequences.dtype}")
    if not 1 <= prompt_len < sequences.shape[1]:
        raise ValueError(f"prompt_len must be in [1, {sequences.shape[1] - 1}] for sequences of length "
                         f"{sequences.shape[1]}, got {prompt_len}")


@torch.no_grad()
def sample(model: CausalLM, prompts: Tensor, new_tokens: int, *, temperature: float = 1.0,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """Ancestral sampling: ``new_tokens`` draws ``x ~ softmax(lm_head(h_last) / temperature)``
    appended to ``prompts (B, P)``; returns ``(B, P + new_tokens)``. The model runs in eval mode
    (restored afterwards) and must accept ``P + new_tokens - 1`` positions."""
    if prompts.dim() != 2 or prompts.dtype != torch.long or prompts.shape[1] == 0:
        raise ValueError(f"prompts must be a non-empty (batch, length) int64 tensor, got "
                         f"{tuple(prompts.shape)} {prompts.dtype}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    was_training = model.training
    model.train(False)
    ids = prompts
    for _ in range(new_tokens):
        logits = model.lm_head(model(ids)[:, -1]).float() / temperature
        ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)], 1)
    model.train(was_training)
    return ids


def continuation_nll(model: CausalLM, sequences: Tensor, prompt_len: int) -> Tensor:
    """Mean ``-log p(x_i | x_<i)`` over the continued tokens ``i >= prompt_len``: the CE
    training loss of sequence-level distillation, and (under ``torch.no_grad``) a judge's score
    of another model's samples."""
    _check_continuation(sequences, prompt_len)
    hidden = model(sequences[:, :-1])[:, prompt_len - 1:]
    return F.cross_entropy(model.lm_head(hidden).flatten(0, 1).float(), sequences[:, prompt_len:].flatten())


def continuation_distill_loss(student: CausalLM, teacher: CausalLM, sequences: Tensor, prompt_len: int, *,
                              divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                              hard_weight: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """Token-level KD on the continued positions of ``sequences``:
    ``kdops.fused_linear_distill_loss(h_s, W_s, h_t, W_t, x_next, ...)`` over positions
    ``prompt_len - 1 ..``, the teacher's hidden states computed without gradient; with
    ``hard_weight = a > 0`` it is ``a CE(x_next) + (1 - a) D(p_t, p_s)``."""
    _check_continuation(sequences, prompt_len)
    inputs = sequences[:, :-1]
    h_s = student(inputs)[:, prompt_len - 1:].flatten(0, 1)
    with torch.no_grad():
        h_t = teacher(inputs)[:, prompt_len - 1:].flatten(0, 1)
    labels = sequences[:, prompt_len:].flatten() if hard_weight > 0 else None
    return kdops.fused_linear_distill_loss(
        h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels,
        student_bias=student.lm_head.bias, teacher_bias=teacher.lm_head.bias, temperature=temperature,
        divergence=divergence, beta=beta, hard_weight=hard_weight, backend=backend)
