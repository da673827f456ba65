"""The soft targets a teacher cache stores per token: the top-k of the teacher's distribution, or
k draws from it (sampled soft targets)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def topk_targets(teacher_logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, indices, rest)`` of ``(..., V)`` logits: the top-k of ``log_softmax(logits / T)``
    (float32), their int32 indices and ``log`` of the probability outside the top-k (float32,
    computed as a log-sum-exp over those entries, so accurate when it is tiny)."""
    logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    values, indices = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, indices, -math.inf).logsumexp(-1)
    return values, indices.to(torch.int32), rest


def sample_targets(teacher_logits: Tensor, k: int, temperature: float,
                   generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """``(counts, indices)`` of ``(..., V)`` logits: per row, ``k`` independent draws (with
    replacement, from ``generator``) from ``softmax(logits / T)``, as ``k`` distinct int32
    vocabulary indices and their int32 counts (summing to ``k``). The ``d <= k`` drawn ids come
    first (ascending); the other ``k - d`` entries are the smallest ids not drawn, with count 0.

    ``counts / k`` is an unbiased estimate of the teacher's distribution: its expectation over
    the draws is ``softmax(logits / T)`` at every vocabulary entry.
    """
    vocab = teacher_logits.shape[-1]
    lead = teacher_logits.shape[:-1]
    probs = torch.softmax(teacher_logits.detach().reshape(-1, vocab).float() / temperature, dim=-1)
    rows = probs.shape[0]
    if rows == 0:
        empty = torch.empty(*lead, k, dtype=torch.int32, device=teacher_logits.device)
        return empty, empty.clone()
    draws = torch.multinomial(probs, k, replacement=True, generator=generator).sort(-1).values  # [N, k]
    position = torch.arange(k, device=draws.device).expand(rows, k)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    run = torch.searchsorted(draws, draws, right=True) - position  # at a run's first entry: its length
    # the distinct drawn ids first: the other entries get keys past the vocabulary, in order
    order = torch.where(first, draws, vocab + position).argsort(-1)
    drawn = draws.gather(-1, order)
    drawn_counts = torch.where(first, run, torch.zeros_like(run)).gather(-1, order)
    distinct = first.sum(-1, keepdim=True)
    # padding: the smallest ids not drawn, among the first min(V, 2k) (at least k - d of them)
    candidates = torch.arange(min(vocab, 2 * k), device=draws.device).expand(rows, -1).contiguous()
    found = torch.searchsorted(draws, candidates).clamp(max=k - 1)
    unused = draws.gather(-1, found) != candidates
    spare = torch.where(unused, candidates, vocab + candidates).sort(-1).values
    pad_at = (position - distinct).clamp(min=0)
    is_drawn = position < distinct
    indices = torch.where(is_drawn, drawn, spare.gather(-1, pad_at))
    counts = torch.where(is_drawn, drawn_counts, torch.zeros_like(drawn_counts))
    return counts.to(torch.int32).reshape(*lead, k), indices.to(torch.int32).reshape(*lead, k)


def sample_logprobs(counts: Tensor, k: int) -> Tensor:
    """``log(counts / k)`` in float32 (``-inf`` where a count is 0): the log-probabilities of the
    sampled soft targets, as :func:`kdops.sparse_distill_loss` takes them (with
    ``rest_mass="ignore"``: they sum to 1, there is no rest)."""
    return torch.log(counts.float() / k)
