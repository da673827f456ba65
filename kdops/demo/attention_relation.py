"""Attention-relation track (MiniLMv2): the language-model track's ``distilled`` student, and the
same student trained with the relations of its last attention layer pulled toward the teacher's.

With ``q``, ``k``, ``v`` the ``[B, L, width]`` inputs of the last self-attention layer of each
model (different widths and head counts), regrouped into ``attention_relation_heads`` heads::

    relation(x) = kdops.attention_relation_loss(x_s, x_s, x_t, x_t, relation_heads=..., causal=True)
    loss        = KD(h_s, W_s, h_t, W_t, next token) + attention_weight * mean_x relation(x), x in q, k, v

(``KD`` the ``distilled`` baseline's loss, so the relation term is the only difference). The
track reports held-out perplexity and the held-out relation loss to the teacher (``relation``,
lower is better; the untrained student's as a reference) over the student seeds, and the
training relation loss of each run from its first step to its last.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdops
from kdops.demo.language_model import LMSetup, TinyLM, summarize

STUDENT = "KD + attention relations"


def attention_inputs(model: TinyLM, ids: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """``model(ids)`` (the final hidden states) and the ``(q, k, v)`` of its last layer, each
    ``[B, L, width]``: the pre-norm layer's ``in_proj`` of its normalised input."""
    length = ids.shape[1]
    mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
    x = model.embed(ids) + model.position[:length]
    *first, last = model.layers.layers
    for layer in first:
        x = layer(x, src_mask=mask, is_causal=True)
    attention = last.self_attn
    qkv = F.linear(last.norm1(x), attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    return model.norm(last(x, src_mask=mask, is_causal=True)), qkv


def relation_loss(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], heads: int, backend: Optional[str],
                  causal: bool = True, attention_mask: Optional[Tensor] = None) -> Tensor:
    """The mean over ``x`` in ``(q, k, v)`` of the MiniLMv2 relation loss ``(x, x)`` (causal, or
    bidirectional over the keys of ``attention_mask``)."""
    return sum(kdops.attention_relation_loss(s, s, t, t, relation_heads=heads, causal=causal,
                                             attention_mask=attention_mask, backend=backend)
               for s, t in zip(student, teacher)) / len(student)


@torch.no_grad()
def held_out_relation(setup: LMSetup, model: TinyLM, windows: int = 64) -> float:
    """The relation loss of ``model`` to the teacher on the first ``windows`` held-out windows."""
    context = setup.cfg.context
    n = min(windows, (setup.held_out.numel() - 1) // context)
    ids = setup.held_out[: n * context].view(n, context).to(setup.device)
    was_training = model.training
    model.eval()
    value = relation_loss(attention_inputs(model, ids)[1], attention_inputs(setup.teacher, ids)[1],
                          setup.cfg.attention_relation_heads, setup.backend).item()
    model.train(was_training)
    return value


def run(setup: LMSetup, seeds: list[int]) -> dict:
    cfg = setup.cfg
    traces: dict[int, list[float]] = {}

    def with_relations(seed: int) -> Callable[[TinyLM], Callable[[Tensor], Tensor]]:
        trace = traces.setdefault(seed, [])

        def make_loss(student: TinyLM) -> Callable[[Tensor], Tensor]:
            def loss(seq: Tensor) -> Tensor:
                inputs = seq[:, :-1]
                h_s, rel_s = attention_inputs(student, inputs)
                with torch.no_grad():
                    h_t, rel_t = attention_inputs(setup.teacher, inputs)
                kd = kdops.fused_linear_distill_loss(
                    h_s.flatten(0, 1), student.lm_head.weight, h_t.flatten(0, 1), setup.teacher.lm_head.weight,
                    seq[:, 1:].flatten() if cfg.hard_weight > 0 else None, temperature=cfg.temperature,
                    hard_weight=cfg.hard_weight, backend=setup.backend)
                relations = relation_loss(rel_s, rel_t, cfg.attention_relation_heads, setup.backend)
                trace.append(relations.item())
                return kd + cfg.attention_weight * relations
            return loss
        return make_loss

    per_seed: dict[str, list[dict]] = {"distilled": [], STUDENT: []}
    for seed in seeds:
        kd, kd_curve = setup.baseline("distilled", seed)
        student, curve = setup.train_student(seed, with_relations(seed), "LM student KD + attention")
        for name, model, c in (("distilled", kd, kd_curve), (STUDENT, student, curve)):
            per_seed[name].append({"perplexity": c[-1][1], "relation": held_out_relation(setup, model),
                                   "curve": c})
        print(f"attention-relation (seed {seed}): training relation loss {traces[seed][0]:.4f} at step 1 -> "
              f"{traces[seed][-1]:.4f} at step {len(traces[seed])}", flush=True)
    return {"seeds": seeds, "students": summarize(per_seed),
            "metric": {"key": "relation", "name": "held-out attention-relation loss to the teacher",
                       "lower_is_better": True},
            "reference": {"untrained student": {"relation": held_out_relation(setup, setup.new_student(seeds[0]))}},
            "training_relation_loss": {str(seed): {"first": t[0], "last": t[-1]} for seed, t in traces.items()},
            "settings": {"relations": "q-q, k-k, v-v of the last layer (MiniLMv2), causal",
                         "relation_heads": cfg.attention_relation_heads, "attention_weight": cfg.attention_weight}}
