"""Preference distillation: does token-level KD transfer a preference of the teacher that the
data does not carry?

The preferring teacher is the analytic optimum of KL-regularised reward maximisation (the
objective RLHF optimises), ``max_p E_p[r] - beta KL(p || p_ref)``, whose per-token solution is

    p*(v | context) ∝ p_ref(v | context) exp(r(v) / beta),

with a per-token reward ``r (V,)``. :func:`preference_tuning_loss` fine-tunes a copy of the
reference model toward ``p*`` on data contexts (forward KL through
``kdops.fused_linear_distill_loss``, the tilt ``r / beta`` entering as the target's bias, so no
``[N x V]`` logits are formed). A student distilled from it is then compared with one trained on
the data alone by :func:`preference_rate`, the share of preferred tokens in its generations.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import kdops
from kdops.recipes.generation import CausalLM


def preference_tuning_loss(model: CausalLM, reference: CausalLM, ids: Tensor, reward: Tensor, *,
                           beta: float = 1.0, backend: Optional[str] = None) -> Tensor:
    """``KL(p* || p_model)`` per position of ``ids (B, L)``, ``p* ∝ p_ref exp(reward / beta)``;
    ``reward`` is ``(V,)`` (e.g. 1 on the preferred tokens, 0 elsewhere). The reference model
    must not have an ``lm_head`` bias (the tilt takes the bias slot)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    vocab = reference.lm_head.weight.shape[0]
    if reward.shape != (vocab,):
        raise ValueError(f"reward must have shape ({vocab},) (one value per token), got {tuple(reward.shape)}")
    if reference.lm_head.bias is not None:
        raise ValueError("reference.lm_head has a bias; preference_tuning_loss puts the tilt there")
    h = model(ids).flatten(0, 1)
    with torch.no_grad():
        h_ref = reference(ids).flatten(0, 1)
    tilt = (reward / beta).to(reference.lm_head.weight.dtype)
    return kdops.fused_linear_distill_loss(h, model.lm_head.weight, h_ref, reference.lm_head.weight,
                                           student_bias=model.lm_head.bias, teacher_bias=tilt,
                                           temperature=1.0, backend=backend)


def preference_rate(sequences: Tensor, prompt_len: int, preferred: Tensor) -> float:
    """Share of the continued tokens ``sequences[:, prompt_len:]`` that are preferred
    (``preferred``: a ``(V,)`` bool mask)."""
    if preferred.dtype != torch.bool or preferred.dim() != 1:
        raise ValueError(f"preferred must be a (V,) bool mask, got {tuple(preferred.shape)} {preferred.dtype}")
    if not 0 <= prompt_len < sequences.shape[-1]:
        raise ValueError(f"prompt_len must be in [0, {sequences.shape[-1] - 1}], got {prompt_len}")
    return preferred.to(sequences.device)[sequences[:, prompt_len:]].float().mean().item()
