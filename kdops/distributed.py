"""Distillation across processes with ``torch.distributed``: vocabulary-parallel losses, and the
row count that makes data-parallel (DDP / FSDP) training match single-process training.

**Vocabulary parallelism** (a tensor-parallel ``lm_head``, as in Megatron-LM): every rank of
``group`` holds the same ``N`` rows and its contiguous slice ``[v0, v0 + V_r)`` of the vocabulary.
With student logits ``s``, teacher logits ``t`` and temperature ``T``, a row of
:func:`kdops.distill_loss` needs only per-row scalars from the other ranks, exchanged in three
all-reduces (never the logits)::

    1. MAX  m_s = max_j s_j,  m_t = max_j t_j                                          2 per row
    2. SUM  Z_s = sum_j exp((s_j - m_s) / T),  Z_t likewise; with hard_weight > 0 also  2 (+3) per row
            Z_1 = sum_j exp(s_j - m_s),  s_label,  the number of ranks holding the label
    3. SUM  D = sum_j d_j(log p_s, log p_t),  A = sum_j a_j (a_j = dD/dlog p_s,j)      2 (+1) per row
            (+ the student's entropy -sum_j p_s,j log p_s,j with return_entropy)

with ``log p_s,j = (s_j - m_s) / T - log Z_s`` (``p_t`` likewise), ``s`` and ``t`` the logits
after the models' transforms (``c * tanh(scale * z / c)``: elementwise, so each rank applies them
to its shard and chains their derivative into its gradient). Every divergence of
:mod:`kdops.divergences` (jsd and the skew divergences included: their mixture is elementwise)
is a sum of elementwise terms ``d_j`` of ``log p_s`` and ``log p_t``, so each rank sums its own,
and the gradient is local once ``A`` is known::

    dD/ds_j = (a_j - p_s,j * A) / T
    CE = m_s + log Z_1 - s_label,      dCE/ds_j = exp(s_j - m_s) / Z_1 - [j = label]

The terms ``d_j`` and ``q_j = a_j`` up to a per-row constant times ``p_s,j`` (which cancels) are
those of the kernels (:mod:`kdops.backends.triton.divergence`). Work is done with per-shard torch ops in
float32 (float64 for float64 logits), with a few ``[N, V_r]`` temporaries (no fused kernel: on
one CPU process about 3x the time of :func:`kdops.distill_loss`); the gradient is computed in
forward, so backward is a scale.

Without an initialised process group (or with a group of one rank) the same code runs without
communication: the loss of :func:`kdops.distill_loss` on the full vocabulary.

**Data parallelism** (DDP, FSDP): use :func:`kdops.distill_loss` or
:func:`kdops.fused_linear_distill_loss` on each rank's rows unchanged. DDP and FSDP average the
gradients over the ranks, which equals the gradient of the mean over the concatenated batch only
when every rank counts as many rows; in general use ``reduction="sum"`` divided by
:func:`global_row_count` times the world size (ranks whose rows are all ignored included)::

    loss = kdops.distill_loss(s, t, y, reduction="sum") * world_size / global_row_count(y)
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from kdops._alloc import compute_dtype
from kdops._codes import DIVERGENCES
from kdops.ops import validation
from kdops.ops._chunked import LogitTransform, check_chunk_size, chunk_logits, chunk_rows, lm_head_rows
from kdops.ops._common import (
    DistillOptions,
    distill_options,
    function_grads,
    reduce_rows,
    scale_forward_grads,
)
from kdops.ops.saved_grad import scale_saved_grad

__all__ = ["global_row_count", "vocab_parallel_distill_loss", "vocab_parallel_fused_linear_distill_loss"]


# ------------------------------------------------------------------------------- collectives


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_size(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group) if _initialized() else 1


def _collective(what: str, group: Optional[dist.ProcessGroup], run) -> None:
    """Runs the collective ``run()``; a failure (a peer that raised or died: connection closed; a
    peer that never arrived: the process group's timeout) becomes an error that says so."""
    try:
        run()
    except RuntimeError as error:  # gloo / NCCL errors (DistBackendError is a RuntimeError)
        raise RuntimeError(
            f"kdops.distributed: the {what} on rank {dist.get_rank(group)} of {dist.get_world_size(group)} "
            f"failed ({error}); another rank of the group raised, died or did not reach this step of the "
            "loss in time (init_process_group(timeout=...) bounds the wait)"
        ) from error


def _all_reduce(x: Tensor, op: str, group: Optional[dist.ProcessGroup]) -> None:
    """In-place all-reduce of ``x`` over ``group`` (``op``: ``"sum"`` or ``"max"``); nothing alone."""
    if _world_size(group) > 1:
        _collective(f"all-reduce ({op}) of {list(x.shape)}", group, lambda: dist.all_reduce(
            x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group))


# What every rank of a call must agree on, in the order of the all-gathered fingerprint (after the
# rank's own vocabulary shard size and first column): a disagreement would deadlock a later
# collective (other rows, labels or reduction: other chunks and backward passes) or silently mix
# two losses (other options).
_AGREED = ("the number of rows N (the leading shape)", "divergence", "temperature", "beta", "hard_weight",
           "soft weight (1 - hard_weight) * T^2 (scale_by_temperature_squared)", "ignore_index", "reduction",
           "dtype", "labels given", "student_logit_scale", "student_softcap (0: None)", "teacher_logit_scale",
           "teacher_softcap (0: None)", "return_entropy", "number of counted rows (labels != ignore_index)",
           "labels (a checksum)")


def _shard_sizes(vocab_shard: int, n_rows: int, device: torch.device, group: Optional[dist.ProcessGroup], *,
                 opts: DistillOptions, reduction: str, dtype: torch.dtype, labels: Optional[Tensor],
                 vocab_start: Optional[int] = None, entropy: bool = False) -> list[int]:
    """Every rank's vocabulary shard size, from one all-gather of a small fingerprint of the call
    (float64: ``V_r``, ``vocab_start`` (-1: None), then the :data:`_AGREED` values) before any
    other collective; every rank checks that all of them agree (and that given ``vocab_start``s
    tile the vocabulary), so that all of them raise the same ValueError naming the option."""
    world = _world_size(group)
    if world == 1:
        return [vocab_shard]
    fields = [vocab_shard, -1 if vocab_start is None else vocab_start, n_rows, opts.divergence, opts.temperature,
              opts.beta, opts.hard_weight, opts.soft_weight, opts.ignore_index,
              validation.REDUCTIONS.index(reduction), validation.FLOAT_DTYPES.index(dtype), labels is not None,
              opts.student_logit_scale, opts.student_softcap or 0.0, opts.teacher_logit_scale,
              opts.teacher_softcap or 0.0, entropy]
    mine = torch.tensor(fields + [0, 0], dtype=torch.float64, device=device)
    if labels is not None:  # counted rows and an exact int64 checksum of the labels
        weights = torch.arange(labels.numel(), device=labels.device) % 65521 + 1
        mine[-2:] = torch.stack([(labels != opts.ignore_index).sum(), (labels.long() * weights).sum()]).double()
    everyone = [torch.empty_like(mine) for _ in range(world)]
    _collective("all-gather of the call's fingerprint", group, lambda: dist.all_gather(everyone, mine, group=group))
    table = torch.stack(everyone).tolist()
    for column, name in enumerate(_AGREED, start=2):
        values = [row[column] for row in table]
        if len(set(values)) > 1:
            shown = [validation.REDUCTIONS[int(v)] for v in values] if name == "reduction" else (
                [str(validation.FLOAT_DTYPES[int(v)]) for v in values] if name == "dtype" else values)
            raise ValueError(
                f"the ranks of the group disagree on {name}: {shown} (rank 0, 1, ...); every rank must pass "
                "the same rows, labels and options (only the vocabulary shards differ)"
            )
    sizes = [int(row[0]) for row in table]
    starts = [int(row[1]) for row in table]
    if any(start >= 0 for start in starts):
        expected = [sum(sizes[:r]) for r in range(world)]
        if starts != expected:
            raise ValueError(
                f"vocab_start must be given on every rank and tile the vocabulary in rank order: got {starts} for "
                f"shards of {sizes} columns (expected {expected})"
            )
    return sizes


def _vocab_start(sizes: list[int], group: Optional[dist.ProcessGroup]) -> int:
    return sum(sizes[: dist.get_rank(group)]) if len(sizes) > 1 else 0


def global_row_count(labels: Tensor, *, ignore_index: int = -100,
                     group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Number of rows whose label is not ``ignore_index``, summed over the ranks of ``group`` by
    one all-reduce, at least 1, as a float32 tensor on the device of ``labels`` (without labels,
    pass ``torch.zeros(n_rows)``: every row counts).

    Data-parallel recipe: ``distill_loss(..., reduction="sum") * world_size / global_row_count(labels)``
    has, after DDP / FSDP average the gradients, the gradient of the mean over the whole batch."""
    count = (labels != ignore_index).sum().float()
    _all_reduce(count, "sum", group)
    return count.clamp(min=1)


_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}  # an integer view per element size


def _replicated(tensors: list[Optional[Tensor]], group: Optional[dist.ProcessGroup]) -> bool:
    """Whether every rank of ``group`` holds the same ``tensors`` bit for bit (None: a tensor
    that is absent everywhere), from one all-gather of an exact int64 checksum per tensor (its
    shape, and the sum of its elements' bits times ``1 + i % 65521``, wrapping; an ``[n]`` int64
    temporary per tensor of ``n`` elements). True without communication alone."""
    if _world_size(group) == 1:
        return True
    device = next(x.device for x in tensors if x is not None)
    sums = []
    for x in tensors:
        if x is None:
            sums += [-1, 0]
            continue
        bits = x.detach().contiguous().reshape(-1).view(_BITS[x.element_size()]).long()
        sums += [x.numel(), (bits * (torch.arange(bits.numel(), device=x.device) % 65521 + 1)).sum().to(device)]
    mine = torch.stack([torch.as_tensor(v, dtype=torch.int64, device=device) for v in sums])
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    _collective("all-gather of the rows' checksums", group, lambda: dist.all_gather(everyone, mine, group=group))
    return all(torch.equal(other, mine) for other in everyone)


# ------------------------------------------------------------------------------- the row protocol



def _row_max(x: Tensor) -> Tensor:
    return x.amax(-1) if x.shape[-1] else x.new_full(x.shape[:-1], -math.inf)


def _divergence_terms(log_ps: Tensor, log_pt: Tensor, ps: Tensor, pt: Tensor, divergence: str,
                      beta: float) -> tuple[Tensor, Tensor]:
    """Elementwise ``(d, q)`` of a divergence at student / teacher log-probabilities: ``D = sum d``
    and ``q = p_s * dD/dp_s`` up to a per-row constant times ``p_s``, so that with ``S = sum q``
    the gradient to the logits ``z = s / T`` is ``q - p_s * S`` (the formulas of
    :mod:`kdops.backends.triton.divergence`; ``p * x`` is 0 where ``p = 0``, as in the reference)."""
    def times(log_p: Tensor, p: Tensor, x: Tensor) -> Tensor:  # masked on log p (the kernels' times)
        return torch.where(log_p > -math.inf, torch.where(x == math.inf, math.inf, p * x), 0.0)

    log_b = math.log(beta) if beta > 0 else -math.inf
    log_1mb = math.log1p(-beta)
    if divergence == "forward_kl":
        return times(log_pt, pt, log_pt - log_ps), -pt
    if divergence == "reverse_kl":
        d = times(log_ps, ps, log_ps - log_pt)
        return d, d
    if divergence == "jsd":
        log_m = torch.logaddexp(log_pt + log_b, log_ps + log_1mb)
        q = times(log_ps, ps, log_ps - log_m)
        return beta * times(log_pt, pt, log_pt - log_m) + (1.0 - beta) * q, (1.0 - beta) * q
    if divergence == "skew_forward_kl":
        log_m = torch.logaddexp(log_pt + log_b, log_ps + log_1mb)
        # -(1 - b) p_s p_t / M in log space (exact where p_s, p_t underflow; -p_t at b = 0)
        q = torch.where(log_ps > -math.inf, (log_pt + (log_ps - log_m)).exp_().mul_(beta - 1.0), 0.0)
        return times(log_pt, pt, log_pt - log_m), q
    if divergence == "skew_reverse_kl":
        log_m = torch.logaddexp(log_ps + log_b, log_pt + log_1mb)
        share = beta * (log_ps - log_m).exp() if beta > 0 else 0.0  # b p_s / M (0 * inf at b = 0, p_t = 0)
        return times(log_ps, ps, log_ps - log_m), times(log_ps, ps, log_ps - log_m - share)
    if divergence == "tvd":
        diff = ps - pt
        return 0.5 * diff.abs(), 0.5 * ps * diff.sign()
    raise ValueError(f"unknown divergence {divergence!r}")


def _shard_rows(
    student: Tensor, teacher: Tensor, labels: Optional[Tensor], vocab_start: int, opts: DistillOptions,
    group: Optional[dist.ProcessGroup], compute_grad: bool, entropy: bool = False,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Row losses ``[N]`` of the full-vocabulary rows whose columns ``[vocab_start, vocab_start + V_r)``
    are the ``[N, V_r]`` shards ``student`` and ``teacher`` (logits after the models' transforms),
    (if ``compute_grad``) the ``[N, V_r]`` gradient of each row loss to its shard, and (if
    ``entropy``) the student's row entropies ``H(p_s) = -sum_j p_s,j log p_s,j``, summed in the
    third all-reduce; all in the compute dtype. Three all-reduces of per-row scalars (see the
    module docstring); rows whose label is ``ignore_index`` are 0 with a zero gradient."""
    dtype = compute_dtype(student.dtype)
    s, t = student.to(dtype), teacher.to(dtype)
    temperature, shard = opts.temperature, s.shape[1]
    hard = opts.hard_weight > 0

    maxes = torch.stack([_row_max(s), _row_max(t)])
    _all_reduce(maxes, "max", group)
    m_s = maxes[0].unsqueeze(1)
    log_ps = (s - m_s).div_(temperature)  # shifted logits z, made log-probabilities below
    log_pt = (t - maxes[1].unsqueeze(1)).div_(temperature)
    ps, pt = log_ps.exp(), log_pt.exp()  # exp(z), made probabilities below
    sums = [ps.sum(-1), pt.sum(-1)]
    valid = None if labels is None else labels != opts.ignore_index
    if hard:
        e_1 = ps if temperature == 1.0 else (s - m_s).exp_()
        local = labels - vocab_start
        owned = valid & (local >= 0) & (local < shard)
        column = local.clamp(0, max(shard - 1, 0)).unsqueeze(1)
        label_logit = s.gather(1, column).squeeze(1) if shard else s.new_zeros(s.shape[0])
        sums += [e_1.sum(-1), torch.where(owned, label_logit, 0.0), owned.to(dtype)]
    sums = torch.stack(sums)
    _all_reduce(sums, "sum", group)
    if hard:  # softmax(s): before ps (which e_1 may be) is normalised in place
        softmax_1 = e_1 / sums[2].unsqueeze(1)
    log_ps.sub_(sums[0].log().unsqueeze(1))
    log_pt.sub_(sums[1].log().unsqueeze(1))
    ps.div_(sums[0].unsqueeze(1))
    pt.div_(sums[1].unsqueeze(1))

    d, q = _divergence_terms(log_ps, log_pt, ps, pt, DIVERGENCES[opts.divergence], opts.beta)
    partial = [d.sum(-1), q.sum(-1)]  # the same size on every rank, with or without grad
    if entropy:
        partial.append(-(ps * torch.where(ps > 0, log_ps, 0.0)).sum(-1))
    partial = torch.stack(partial)
    _all_reduce(partial, "sum", group)
    row_entropy = None
    if entropy:
        row_entropy = partial[2] if valid is None else torch.where(valid, partial[2], 0.0)

    row = opts.soft_weight * partial[0]
    if hard:
        labelled_once = sums[4] == 1  # a counted label held by no rank (out of range) or by several
        if labels.device.type == "cpu" and not torch.compiler.is_compiling() and bool((valid & ~labelled_once).any()):
            raise ValueError(
                "labels must lie in [0, V) (V the concatenated vocabulary) or equal "
                f"ignore_index={opts.ignore_index}, and the ranks' vocab_start must tile [0, V); "
                "a counted label is held by no rank or by several"
            )
        ce = (m_s.squeeze(1) - sums[3]) + sums[2].log()  # max - label logit first: exact where they are close
        row = row + opts.hard_weight * torch.where(labelled_once, ce, math.nan)
    if valid is not None:
        row = torch.where(valid, row, 0.0)
    if not compute_grad:
        return row, None, row_entropy

    grad = q.sub_(ps.mul_(partial[1].unsqueeze(1))).mul_(opts.soft_weight / temperature)
    if hard:
        grad.add_(softmax_1, alpha=opts.hard_weight)
        if shard:
            grad.scatter_add_(1, column, (owned.to(dtype) * -opts.hard_weight).unsqueeze(1))
    if valid is not None:
        grad.masked_fill_(~valid.unsqueeze(1), 0.0)
    return row, grad, row_entropy


# ------------------------------------------------------------------------------- logits shards


def _transformed(logits: Tensor, transform: LogitTransform) -> Tensor:
    """``transform(logits)`` in the compute dtype; a copy, never ``logits`` changed in place."""
    dtype = compute_dtype(logits.dtype)
    return logits.to(dtype) if transform.is_identity else transform.apply_(logits.to(dtype, copy=True))


class _VocabParallelRows(torch.autograd.Function):
    """Row losses of logit shards (the models' logit transforms applied to copies first, their
    derivative chained into the gradient); the gradient is computed in forward, backward scales it."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, labels: Optional[Tensor], vocab_start: int,
                opts: DistillOptions, group: Optional[dist.ProcessGroup], compute_grad: bool) -> Tensor:
        s = _transformed(student, opts.student_transform)
        t = _transformed(teacher, opts.teacher_transform)
        rows, grad, _ = _shard_rows(s, t, labels, vocab_start, opts, group, compute_grad)
        if compute_grad:
            grad = opts.student_transform.chain_(grad, s).to(student.dtype)
        ctx.save_for_backward(grad)
        return rows

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        (grad,) = ctx.saved_tensors
        return function_grads(ctx, scale_saved_grad(grad, grad_rows.unsqueeze(1)))


def vocab_parallel_distill_loss(
    student_logits_shard: Tensor,
    teacher_logits_shard: Tensor,
    labels: Optional[Tensor] = None,
    *,
    group: Optional[dist.ProcessGroup] = None,
    temperature: float = 2.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    hard_weight: float = 0.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    vocab_start: Optional[int] = None,
    normalizer: Union[None, int, Tensor] = None,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: Optional[float] = None,
) -> Tensor:
    """:func:`kdops.distill_loss` of logits whose vocabulary is split over the ranks of ``group``.

    Each rank passes its contiguous shard ``(..., V_r)`` of the student and teacher logits (the
    shards, in rank order, concatenate to ``(..., V)``; ``V_r`` may differ between ranks), the
    same ``labels`` (full-vocabulary indices) and the same options; every rank gets the loss of
    the concatenated logits, and the gradient of its shard. ``vocab_start``: this rank's first
    column (None: from the shard sizes). Logit transforms (``student_logit_scale``,
    ``student_softcap``, ``teacher_*``), ``normalizer`` and the other options as in
    :func:`kdops.distill_loss`: ``z' = scale * z``, or ``z' = c * tanh(scale * z / c)`` with a
    softcap ``c``, elementwise, so each rank transforms its own shard (exact chain rule in the
    gradient). First, one all-gather of a 19-number fingerprint of the
    call checks that the ranks agree on the rows, labels and options (and that given
    ``vocab_start``s tile the vocabulary): a ValueError naming what differs, on every rank, before
    any collective could deadlock or mix them; a failed collective (a rank that raised or died,
    or the group's timeout) is a RuntimeError saying so. Then three all-reduces of ``[k, N]`` per-row scalars,
    k = 2, 2 (5 with ``hard_weight > 0``) and 2: 24 bytes per row (36) in float32.
    Without an initialised process group: the loss of the full logits, no communication.
    Temporaries: a few ``[N, V_r]`` float32 tensors.
    """
    validation.check_float_tensor("student_logits_shard", student_logits_shard)
    validation.check_float_tensor("teacher_logits_shard", teacher_logits_shard)
    if student_logits_shard.dim() == 0:
        raise ValueError("student_logits_shard must have at least one dimension (..., V_r); got a scalar")
    if teacher_logits_shard.shape != student_logits_shard.shape:
        raise ValueError(
            f"teacher_logits_shard must have the shape of student_logits_shard (..., V_r); got teacher "
            f"{tuple(teacher_logits_shard.shape)} and student {tuple(student_logits_shard.shape)}"
        )
    if teacher_logits_shard.dtype != student_logits_shard.dtype:
        raise TypeError(
            f"teacher_logits_shard must have the dtype of student_logits_shard; got teacher "
            f"{teacher_logits_shard.dtype} and student {student_logits_shard.dtype}"
        )
    if vocab_start is not None and (type(vocab_start) is not int or vocab_start < 0):
        raise ValueError(f"vocab_start must be a non-negative integer or None; got {vocab_start!r}")
    shard = student_logits_shard.shape[-1]
    lead = student_logits_shard.shape[:-1]
    labels = validation.check_labels(labels, lead, "student_logits_shard")
    validation.check_same_device(student_logits_shard=student_logits_shard,
                                 teacher_logits_shard=teacher_logits_shard, labels=labels)
    opts = distill_options(temperature=temperature, divergence=divergence, beta=beta, hard_weight=hard_weight,
                           scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
                           reduction=reduction, labels=labels, vocab=None, normalizer=normalizer,
                           student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                           teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap)
    student = student_logits_shard.reshape(lead.numel(), shard)  # V_r may be 0: no -1
    flat_labels = None if labels is None else labels.reshape(-1)
    sizes = _shard_sizes(shard, student.shape[0], student.device, group, opts=opts, reduction=reduction,
                         dtype=student.dtype, labels=flat_labels, vocab_start=vocab_start)
    if vocab_start is None:
        vocab_start = _vocab_start(sizes, group)
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    rows = _VocabParallelRows.apply(student, teacher_logits_shard.detach().reshape(student.shape),
                                    flat_labels, vocab_start, opts, group, compute_grad)
    return reduce_rows(rows, flat_labels, ignore_index, reduction, lead, normalizer)


# ------------------------------------------------------------------------------- lm_head shards


def _lm_head_rows(
    h: Tensor, w: Tensor, b: Optional[Tensor], th: Tensor, tw: Tensor, tb: Optional[Tensor],
    labels: Optional[Tensor], row_weights: Optional[Tensor], vocab_start: int, chunk: int,
    opts: DistillOptions, group: Optional[dist.ProcessGroup], needs: tuple[bool, bool, bool], entropy: bool,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Row losses ``[N]``, the gradients of ``sum_r row_weights[r] * row[r]`` (weights 1 if
    None) to ``h`` (summed over the group), ``w``, ``b`` where ``needs`` says so (else None) and
    the student's row entropies if ``entropy`` (0 for ignored rows; else None): the chunked
    driver of :mod:`kdops.ops._chunked` with the student's logit transform, each chunk's
    ``[chunk, V_r]`` shard logits (the teacher's transformed here) through the row protocol of
    :func:`_shard_rows` (every rank visits the same chunks)."""
    entropies = torch.zeros(h.shape[0], dtype=compute_dtype(h.dtype), device=h.device) if entropy else None

    def row_loss(idx, logits: Tensor, want_grad: bool):
        teacher = opts.teacher_transform.apply_(chunk_logits(th[idx], tw, tb)).to(logits.dtype)
        row, grad, row_entropy = _shard_rows(logits, teacher, None if labels is None else labels[idx], vocab_start,
                                             opts, group, want_grad, entropy)
        if entropies is not None:
            entropies[idx] = row_entropy
        return row, grad

    rows, gh, gw, gb = lm_head_rows(h, w, b, row_loss, labels, opts.ignore_index, row_weights, chunk, needs,
                                    opts.student_transform)
    if gh is not None:
        _all_reduce(gh, "sum", group)
    return rows, gh, gw, gb, entropies


class _VocabParallelFusedLinear(torch.autograd.Function):
    """Row losses (and the student's row entropies, no gradient; empty unless ``entropy``) of a
    vocabulary-sharded lm_head. With ``needs`` set (reduction "sum" / "mean": the rows are only
    summed) the gradients are computed in forward and backward scales them; without (reduction
    "none") backward runs a second chunked pass (with communication) with the row weights (the
    wiring of :func:`kdops.ops._common.register_lm_head_autograd`)."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, b: Optional[Tensor], th: Tensor, tw: Tensor, tb: Optional[Tensor],
                labels: Optional[Tensor], vocab_start: int, chunk: int, opts: DistillOptions,
                group: Optional[dist.ProcessGroup], needs: tuple[bool, bool, bool],
                entropy: bool) -> tuple[Tensor, Tensor]:
        ctx.setup = (vocab_start, chunk, opts, group)
        ctx.in_forward = any(needs)
        rows, *grads, entropies = _lm_head_rows(h, w, b, th, tw, tb, labels, None, vocab_start, chunk, opts, group,
                                                needs, entropy)
        if ctx.in_forward:
            ctx.needs = needs
            ctx.save_for_backward(*(None if g is None else g.to(x.dtype) for g, x in zip(grads, (h, w, w))))
        else:
            ctx.save_for_backward(h, w, b, th, tw, tb, labels)
        entropies = rows.new_empty(0) if entropies is None else entropies
        ctx.mark_non_differentiable(entropies)
        return rows, entropies

    @staticmethod
    def backward(ctx, grad_rows: Tensor, _grad_entropies: Optional[Tensor]):
        vocab_start, chunk, opts, group = ctx.setup
        if ctx.in_forward:
            grads = scale_forward_grads(ctx.saved_tensors, ctx.needs, grad_rows)
        else:
            h, w, b, th, tw, tb, labels = ctx.saved_tensors
            needs = tuple(ctx.needs_input_grad[:3])
            _, *grads, _ = _lm_head_rows(h, w, b, th, tw, tb, labels, grad_rows.contiguous(), vocab_start, chunk,
                                         opts, group, needs, False)
            grads = [None if g is None else g.to(x.dtype) for g, x in zip(grads, (h, w, w))]
        return function_grads(ctx, *grads)


def vocab_parallel_fused_linear_distill_loss(
    student_hidden: Tensor,
    student_weight_shard: Tensor,
    teacher_hidden: Tensor,
    teacher_weight_shard: Tensor,
    labels: Optional[Tensor] = None,
    *,
    student_bias_shard: Optional[Tensor] = None,
    teacher_bias_shard: Optional[Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    hard_weight: float = 0.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Union[None, int, Tensor] = None,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: Optional[float] = None,
    return_entropy: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`kdops.fused_linear_distill_loss` with the lm_head split over the vocabulary.

    Each rank passes the same hidden states ``(..., Hs)`` / ``(..., Ht)`` and labels, and its
    contiguous rows ``(V_r, H)`` of the student and teacher lm_head weights (and biases ``(V_r,)``);
    the shards, in rank order, concatenate to the full ``(V, H)`` weights. Every rank gets the loss
    of the full logits. Rows are processed in token chunks (``chunk_size`` rows, default from a
    256 MiB budget for the largest shard): per chunk the ``[chunk, V_r]`` shard logits are formed
    and the all-reduces of :func:`vocab_parallel_distill_loss` run; the ``[N, V_r]`` logits are
    never formed at once. The gradient to ``student_hidden`` is **summed over the group** (one
    all-reduce of ``[N, Hs]``), so it is the full gradient on every rank: do not all-reduce it
    again (as a tensor-parallel "copy to region" would). Gradients to the weight and bias shards
    are this rank's (``requires_grad`` of each input must agree over the ranks). ``reduction="none"``
    computes the gradients in backward, with communication: every rank must run backward.
    Logit transforms (``student_logit_scale``, ``student_softcap``, ``teacher_*``: ``z' = scale * z``
    or ``c * tanh(scale * z / c)``, on each chunk's shard logits, exact chain rule),
    ``normalizer``, ``return_entropy`` (``(loss, entropy)``: the student's ``H(softmax(z' / T))``
    per row or summed over the counted rows, no gradient; one more per-row scalar in the third
    all-reduce) and the other options as in :func:`kdops.fused_linear_distill_loss` (temperature
    1 by default).
    """
    validation.check_linear("student_hidden", student_hidden, "student_weight_shard", student_weight_shard,
                            "student_bias_shard", student_bias_shard)
    validation.check_linear("teacher_hidden", teacher_hidden, "teacher_weight_shard", teacher_weight_shard,
                            "teacher_bias_shard", teacher_bias_shard)
    if teacher_weight_shard.shape[0] != student_weight_shard.shape[0]:
        raise ValueError(
            f"teacher_weight_shard and student_weight_shard must hold the same vocabulary rows V_r; got "
            f"{teacher_weight_shard.shape[0]} and {student_weight_shard.shape[0]}"
        )
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(
            f"teacher_hidden must have the leading shape of student_hidden, {tuple(lead)}; got "
            f"{tuple(teacher_hidden.shape[:-1])}"
        )
    check_chunk_size(chunk_size)
    labels = validation.check_labels(labels, lead, "student_hidden")
    validation.check_same_device(
        student_hidden=student_hidden, student_weight_shard=student_weight_shard,
        student_bias_shard=student_bias_shard, teacher_hidden=teacher_hidden,
        teacher_weight_shard=teacher_weight_shard, teacher_bias_shard=teacher_bias_shard, labels=labels,
    )
    opts = distill_options(temperature=temperature, divergence=divergence, beta=beta, hard_weight=hard_weight,
                           scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
                           reduction=reduction, labels=labels, vocab=None, normalizer=normalizer,
                           student_logit_scale=student_logit_scale, student_softcap=student_softcap,
                           teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool; got {type(return_entropy).__name__}")
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1)
    sizes = _shard_sizes(student_weight_shard.shape[0], h.shape[0], h.device, group, opts=opts, reduction=reduction,
                         dtype=h.dtype, labels=flat_labels, entropy=return_entropy)
    # the same on every rank; the entropy's temporaries count as two more teachers' logits
    chunk = chunk_rows(h.shape[0], max(*sizes, 1), h.dtype, chunk_size, 3 if return_entropy else 1)
    grad_on = torch.is_grad_enabled() and reduction != "none"  # "none": the gradients come in backward
    needs = tuple(grad_on and x is not None and x.requires_grad
                  for x in (student_hidden, student_weight_shard, student_bias_shard))
    rows, entropies = _VocabParallelFusedLinear.apply(
        h, student_weight_shard, student_bias_shard, th, teacher_weight_shard.detach(),
        None if teacher_bias_shard is None else teacher_bias_shard.detach(), flat_labels,
        _vocab_start(sizes, group), chunk, opts, group, needs, return_entropy,
    )
    loss = reduce_rows(rows, flat_labels, ignore_index, reduction, lead, normalizer)
    if not return_entropy:
        return loss
    return loss, entropies.reshape(lead) if reduction == "none" else entropies.sum()
