"""TRL's distillation losses computed by kdops: ``patch()`` once, train as before.

>>> import kdops.integrations.trl
>>> kdops.integrations.trl.patch()      # idempotent; unpatch() restores TRL's functions

replaces

* ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (the loss of TRL's
  ``DistillationTrainer``) by :func:`chunked_divergence_loss`: :func:`kdops.fused_linear_distill_loss`
  on the hidden states and ``lm_head`` weights, logit scale and softcapping in the fused pass,
  the student's entropy from the same pass;
* ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` (logits in, as GKD's ``compute_loss``
  has them) by :func:`generalized_jsd_loss`: :func:`kdops.distill_loss`.

Same signatures, return values and conventions as TRL's: ``beta = 0`` is the forward
``KL(p_t || p_s)``, ``beta = 1`` the reverse ``KL(p_s || p_t)``, else the generalized JSD
``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` with ``m = beta p_t + (1 - beta) p_s``
(= kdops' ``"jsd"``); ``p = softmax(z' / T)`` with ``z'`` the model's transformed logits and no
``T**2`` factor; per valid token, summed, divided by ``num_items_in_batch`` or else by the number
of valid tokens. The teacher is a constant (no gradient reaches its logits or weights).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from kdops import reference
from kdops.integrations._common import fused_lm_head_loss
from kdops.ops.kd import distill_loss

IGNORE_INDEX = -100  # TRL's (and Transformers') label of positions that do not count


def trl_divergence(beta: float) -> tuple[str, float]:
    """kdops' ``(divergence, beta)`` of TRL's ``beta``: 0 forward KL, 1 reverse KL, else JSD."""
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 forward KL, 1 reverse KL, else generalized JSD); got {beta}")
    if beta == 0.0:
        return "forward_kl", 0.5
    if beta == 1.0:
        return "reverse_kl", 0.5
    return "jsd", beta


def chunked_divergence_loss(
    student_hidden_states: Tensor,
    teacher_hidden_states: Tensor,
    student_lm_head_weight: Tensor,
    teacher_lm_head_weight: Tensor,
    completion_mask: Tensor,
    beta: float,
    num_items_in_batch: Union[Tensor, int, None] = None,
    student_lm_head_bias: Optional[Tensor] = None,
    teacher_lm_head_bias: Optional[Tensor] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: Optional[float] = None,
    teacher_final_logit_softcapping: Optional[float] = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """TRL's ``_chunked_divergence_loss`` by :func:`kdops.fused_linear_distill_loss`.

    Hidden states ``(B, K, H)`` (each model its own ``H``), ``lm_head`` weights ``(V, H)`` (DTensors:
    vocabulary-parallel under tensor parallelism, else gathered once; see
    :mod:`kdops.integrations._common`), ``completion_mask (B, K)`` (non-zero: the position counts). Logits
    ``z' = c tanh(scale z / c)`` (``c`` the final-logit softcapping, else ``z' = scale z``). Returns
    ``(loss, entropy_sum, n_valid)``: the divergence summed over valid positions divided by
    ``num_items_in_batch`` (else by ``n_valid``, at least 1), the sum of the student's entropies
    ``H(softmax(z'_s / T))`` over them (no gradient) and their number. Under autocast the
    matmuls run in autocast's dtype, the loss in float32.
    """
    divergence, kd_beta = trl_divergence(beta)
    counted = completion_mask != 0
    labels = torch.where(counted, 0, IGNORE_INDEX).to(device=student_hidden_states.device, dtype=torch.long)
    loss, entropy_sum = fused_lm_head_loss(
        student_hidden_states, student_lm_head_weight, student_lm_head_bias, teacher_hidden_states,
        teacher_lm_head_weight, teacher_lm_head_bias, labels, temperature=temperature, divergence=divergence,
        beta=kd_beta, scale_by_temperature_squared=False, ignore_index=IGNORE_INDEX, normalizer=num_items_in_batch,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_final_logit_softcapping, teacher_softcap=teacher_final_logit_softcapping,
        return_entropy=True,
    )
    return loss, entropy_sum, counted.sum()


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Union[Tensor, int, None] = None,
) -> Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss`` by :func:`kdops.distill_loss` (one fused pass
    over the ``(..., V)`` logits, float32 whatever their dtype).

    Positions whose label is -100 do not count. ``num_items_in_batch``: sum / it (whatever
    ``reduction``); else ``"batchmean"``: sum / counted positions (with ``labels``; at least 1) or
    sum / ``student_logits.shape[0]`` (without), ``"sum"``, ``"mean"``: sum / (positions x V),
    ``"none"``: the per-entry terms ``(counted positions, V)`` (``(..., V)`` without labels), which
    only materialised logits give: :func:`kdops.reference.divergence_terms`.
    """
    divergence, kd_beta = trl_divergence(beta)
    if reduction not in ("batchmean", "sum", "mean", "none"):
        raise ValueError(f"reduction must be 'batchmean', 'sum', 'mean' or 'none'; got {reduction!r}")
    teacher_logits = teacher_logits.detach().to(student_logits.dtype)
    vocab = student_logits.shape[-1]
    if reduction == "none" and num_items_in_batch is None:
        log_ps = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        log_pt = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
        terms = reference.divergence_terms(log_ps, log_pt, divergence, kd_beta).to(student_logits.dtype)
        return terms if labels is None else terms[labels != IGNORE_INDEX]
    total = distill_loss(student_logits, teacher_logits, labels, temperature=temperature, divergence=divergence,
                         beta=kd_beta, scale_by_temperature_squared=False, ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is not None:
        return total / (num_items_in_batch.to(total.device) if isinstance(num_items_in_batch, Tensor)
                        else num_items_in_batch)
    if reduction == "sum":
        return total
    positions = student_logits.numel() // vocab if labels is None else (labels != IGNORE_INDEX).sum()
    if reduction == "mean":
        return total / (positions * vocab)
    if labels is None:
        return total / max(student_logits.shape[0], 1)
    return total / positions.clamp(min=1)


# (module path, owner attribute or None for a module-level function, name) -> kdops replacement
_TARGETS = (
    ("trl.trainer.distillation_trainer", None, "_chunked_divergence_loss", chunked_divergence_loss),
    ("trl.experimental.gkd.gkd_trainer", "GKDTrainer", "generalized_jsd_loss", staticmethod(generalized_jsd_loss)),
)
_originals: dict[tuple[str, Optional[str], str], object] = {}


def _owner(module_name: str, attribute: Optional[str]):
    import importlib

    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)


def patch() -> None:
    """Routes TRL's ``DistillationTrainer`` loss and ``GKDTrainer.generalized_jsd_loss`` through
    kdops (existing and new trainers alike). Idempotent."""
    for module_name, attribute, name, replacement in _TARGETS:
        key = (module_name, attribute, name)
        if key in _originals:
            continue
        owner = _owner(module_name, attribute)
        _originals[key] = owner.__dict__[name]  # the staticmethod object itself, for a class
        setattr(owner, name, replacement)


def unpatch() -> None:
    """Restores TRL's own functions (a no-op when not patched)."""
    for (module_name, attribute, name), original in list(_originals.items()):
        setattr(_owner(module_name, attribute), name, original)
        del _originals[(module_name, attribute, name)]


def is_patched() -> bool:
    return bool(_originals)
