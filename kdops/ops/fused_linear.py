"""Fused linear + distillation for large vocabularies: ``kdops.fused_linear_distill_loss``.

The loss of ``kdops.distill_loss(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t, labels, ...)`` without the
``[N, V]`` logits: rows are processed in chunks (:mod:`kdops.ops._chunked`); for each chunk the
student and teacher logits are formed in float32, one fused KD kernel gives the chunk's row
losses and ``dL/dlogits``, and the gradients are accumulated at once::

    grad_h[chunk] = G @ W_s        grad_W_s += G.T @ h_s[chunk]        grad_b_s += G.sum(0)

so backward is a scale by ``grad_output`` (nothing when it is 1: a mean's ``1 / count``, or
``1 / normalizer``, is folded into the float32 gradients as row weights before their one
rounding to the input dtype). Extra memory: one chunk of logits (the chunk size is
chosen from a memory budget, or given), plus the gradients themselves. Ignored rows are skipped.
The ``"torch"`` backend is the reference, which does form the logits.
With ``reduction="none"`` the per-row weights are only known in backward, so the gradients are
computed there, in a second chunked pass.

The ``"triton"`` backend also has a blockwise kernel (float32, float16, bfloat16 inputs,
:mod:`kdops.backends.triton.fused_linear`) that forms not even a chunk of logits (extra memory
``O(N)`` besides the float32 gradients); :func:`blockwise_preferred` says where the automatic
choice takes it (not on a GPU, where it measured 18x slower than the chunked design's GEMMs).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from kdops import _dispatch, reference
from kdops._alloc import compute_dtype
from kdops.ops import validation
from kdops.ops._chunked import (
    check_chunk_size,
    chunk_logits,
    chunk_rows,
    forward_row_weights,
    lm_head_rows,
    row_entropy,
    weighted_rows,
)
from kdops.ops._common import (
    DistillOptions,
    OpArgs,
    define,
    distill_options,
    reduce_rows,
    register_lm_head_autograd,
)

# A teacher's (hidden [N, Ht], weight [V, Ht], bias [V] or None).
Teacher = tuple[Tensor, Tensor, Optional[Tensor]]


def blockwise_preferred(device: torch.device) -> bool:
    """Whether a backend's blockwise kernel is taken over the chunked path for ``device`` tensors:
    not on a GPU, where the Triton one (three passes, each recomputing both models' logit tiles;
    float32 gradient tiles added to ``grad_W`` atomically from every row block) took 200 / 1068 ms
    forward / forward + backward against 28 / 57 ms for materialised logits and ``distill_loss``
    (H200, Triton 3.6, bf16, N 8192, H 4096, V 128256: benchmarks/results/h200-2026-12-04); under
    the Triton interpreter (CPU tensors: the tests) it is."""
    return device.type != "cuda"


def _compute(
    h: Tensor, w: Tensor, b: Optional[Tensor], th, tw, tb, teacher_log_weights: Optional[Tensor],
    labels: Optional[Tensor], row_weights: Optional[Tensor], needs: list[bool], chunk: int, entropy: bool,
    backend: str, *options,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row losses ``[N]`` (times ``row_weights`` when given and ``needs`` is set: the summands of
    a reduced loss) and the gradients of ``sum_r row_weights[r] * row[r]`` (weights 1 if None) to
    ``h``, ``w``, ``b`` where ``needs`` says so (their dtypes, rounded once; else empty tensors), and
    if ``entropy`` the student's row entropies ``H(softmax(z' / T))`` (0 for ignored rows; else
    empty). ``th``, ``tw``, ``tb``: one teacher's tensors, or lists of K teachers' (mixed with
    ``teacher_log_weights``). The backend's blockwise ``"fused_linear"`` kernel where it has one
    for the call (Triton: one teacher, 16/32-bit inputs, no entropy) and
    :func:`blockwise_preferred`, else the chunked driver over its ``"kd"`` kernels (K teachers'
    chunk logits ``[K, n, V]`` mixed there). Either kernel applies the logit transforms of
    ``options`` to the logits it reads (the chain rule in its float32 gradient); the entropy
    transforms a copy of the chunk's student logits."""
    opts = DistillOptions(*options)
    teachers: list[Teacher] = [(th, tw, tb)] if isinstance(th, Tensor) else list(zip(th, tw, tb))
    # the blockwise kernels add float32 partial gradients atomically (order-dependent on a GPU):
    # deterministic mode takes the chunked path (deterministic "kd" kernel per chunk, then matmuls)
    blockwise = not entropy and not torch.are_deterministic_algorithms_enabled() and blockwise_preferred(h.device)
    if blockwise and all(_dispatch.offers("fused_linear", backend, h.device, x.dtype, len(teachers))
                         for x in (h, teachers[0][0])):
        rows, *grads = _dispatch.kernels("fused_linear", backend).fused_linear_distill(
            h, w, b, th, tw, tb, labels, row_weights, opts, needs)
        return (weighted_rows(rows, row_weights, needs), *grads, h.new_empty(0))
    kd = _dispatch.kernels("kd", backend)
    row_entropies = torch.zeros(h.shape[0], dtype=compute_dtype(h.dtype), device=h.device) if entropy else None

    def row_loss(idx, logits: Tensor, want_grad: bool):
        t = [chunk_logits(x[idx], t_w, t_b).to(logits.dtype) for x, t_w, t_b in teachers]
        t = t[0] if len(t) == 1 else torch.stack(t)
        if row_entropies is not None:
            row_entropies[idx] = row_entropy(logits, opts.temperature, opts.student_transform)
        return kd.kd_forward(logits, t, None if labels is None else labels[idx], opts, want_grad, teacher_log_weights)

    rows, gh, gw, gb = lm_head_rows(h, w, b, row_loss, labels, opts.ignore_index, row_weights, chunk, needs)
    return (weighted_rows(rows, row_weights, needs), h.new_empty(0) if gh is None else gh.to(h.dtype),
            w.new_empty(0) if gw is None else gw.to(w.dtype), w.new_empty(0) if gb is None else gb.to(w.dtype),
            h.new_empty(0) if row_entropies is None else row_entropies)


def _compute_fake(h, w, b, th, tw, tb, teacher_log_weights, labels, row_weights, needs, chunk, entropy, backend,
                  *options):
    return (
        h.new_empty(h.shape[:1], dtype=compute_dtype(h.dtype)),
        h.new_empty(h.shape if needs[0] else (0,)),
        w.new_empty(w.shape if needs[1] else (0,)),
        w.new_empty(w.shape[:1] if needs[2] else (0,)),
        h.new_empty(h.shape[:1] if entropy else (0,), dtype=compute_dtype(h.dtype)),
    )


# Two ops, one implementation: one teacher's tensors, or lists of K teachers' with their log
# mixture weights. (rows, grad_h, grad_w, grad_b, entropies); autograd: see kdops.ops._common.
_TAIL = "Tensor? labels, Tensor? row_weights, bool[] needs, SymInt chunk, bool entropy, str backend, {options}"
_RETURNS = "(Tensor, Tensor, Tensor, Tensor, Tensor)"
_ARGS = OpArgs("Tensor h, Tensor w, Tensor? b, Tensor th, Tensor tw, Tensor? tb, Tensor? teacher_log_weights, "
               + _TAIL)
_MULTI_ARGS = OpArgs("Tensor h, Tensor w, Tensor? b, Tensor[] th, Tensor[] tw, Tensor?[] tb, "
                     "Tensor teacher_log_weights, " + _TAIL)
fused_linear_distill = define("fused_linear_distill", _ARGS, _RETURNS, _compute, _compute_fake)
fused_linear_multi_distill = define("fused_linear_multi_distill", _MULTI_ARGS, _RETURNS, _compute, _compute_fake)
register_lm_head_autograd(fused_linear_distill, _ARGS)
register_lm_head_autograd(fused_linear_multi_distill, _MULTI_ARGS)


def _teacher_triples(teacher_hidden, teacher_weight, teacher_bias) -> list[Teacher]:
    """The teachers of :func:`fused_linear_distill_loss` as ``(hidden, weight, bias)`` triples,
    each checked: one teacher's tensors, or equal-length sequences of K teachers'."""
    if isinstance(teacher_hidden, Tensor):
        if not (isinstance(teacher_weight, Tensor) or teacher_weight is None):
            raise TypeError(
                f"teacher_weight must be a tensor when teacher_hidden is one; got {type(teacher_weight).__name__}")
        validation.check_linear("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight,
                                "teacher_bias", teacher_bias)
        return [(teacher_hidden, teacher_weight, teacher_bias)]
    if not isinstance(teacher_hidden, (list, tuple)) or not isinstance(teacher_weight, (list, tuple)):
        raise TypeError(
            "teacher_hidden and teacher_weight must both be tensors (one teacher) or lists/tuples of "
            f"tensors (K teachers); got {type(teacher_hidden).__name__} and {type(teacher_weight).__name__}"
        )
    k = len(teacher_hidden)
    biases = [None] * k if teacher_bias is None else teacher_bias
    if not isinstance(biases, (list, tuple)):
        raise TypeError(
            f"teacher_bias must be None or a list/tuple of K = {k} biases (or None); got {type(biases).__name__}")
    if k == 0 or len(teacher_weight) != k or len(biases) != k:
        raise ValueError(
            f"teacher_hidden, teacher_weight (and teacher_bias) must list the same K >= 1 teachers; got "
            f"{k}, {len(teacher_weight)}" + ("" if teacher_bias is None else f" and {len(biases)}")
        )
    for i, (th, tw, tb) in enumerate(zip(teacher_hidden, teacher_weight, biases)):
        validation.check_linear(f"teacher_hidden[{i}]", th, f"teacher_weight[{i}]", tw, f"teacher_bias[{i}]", tb)
    return list(zip(teacher_hidden, teacher_weight, biases))


def fused_linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Union[Tensor, Sequence[Tensor]],
    teacher_weight: Union[Tensor, Sequence[Tensor]],
    labels: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Union[None, Tensor, Sequence[Optional[Tensor]]] = None,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    hard_weight: float = 0.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    teacher_weights: Optional[Union[Sequence[float], Tensor]] = None,
    normalizer: Union[None, int, Tensor] = None,
    student_logit_scale: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: Optional[float] = None,
    return_entropy: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`kdops.distill_loss` of ``student_hidden @ student_weight.T + student_bias`` against
    ``teacher_hidden @ teacher_weight.T + teacher_bias`` without forming either ``[N, V]`` logits.

    Logit transforms (a model's own, before the temperature): ``z' = scale * z``, or with a
    softcap ``c``, ``z' = c * tanh(scale * z / c)`` (``student_logit_scale``,
    ``student_softcap``; ``teacher_*`` for every teacher): Cohere's ``logit_scale``, Granite's
    ``1 / logits_scaling``, Gemma 2/3's ``final_logit_softcapping``. Applied to each chunk's
    float32 logits (in the blockwise Triton kernel's logit tiles), the exact chain rule in the
    gradient. ``return_entropy``: returns ``(loss, entropy)``, ``entropy`` the student's
    ``H(softmax(z' / T))`` from the same pass (float32, no gradient): per row (0 where ignored)
    for ``reduction="none"``, else summed over the counted rows; it takes the chunked path on
    every backend.

    ``student_hidden (..., Hs)``, ``student_weight (V, Hs)``, ``teacher_hidden (..., Ht)``,
    ``teacher_weight (V, Ht)``: ``Ht`` may differ from ``Hs``. Both logits are formed in float32
    (float64 for float64) with float32 accumulation, never rounded to a 16-bit input dtype.
    Gradients flow to the student's hidden states, weight and bias only.
    ``chunk_size``: rows per chunk (default: from a 256 MiB budget for the chunk's logits); the
    blockwise Triton kernel, where it is taken (not on a GPU: :func:`blockwise_preferred`), works
    in on-chip tiles and ignores it.

    Multi-teacher: ``teacher_hidden`` and ``teacher_weight`` (and ``teacher_bias``, else None)
    lists of K teachers' tensors (each its own ``Ht_k``) distil from the mixture
    ``sum_k w_k softmax(t_k / T)`` with ``teacher_weights`` as in :func:`kdops.distill_loss`; a
    chunk holds the K teachers' logits (K > 1 takes the chunked path on the Triton backend too).
    Other options as in :func:`kdops.distill_loss`.
    """
    validation.check_linear("student_hidden", student_hidden, "student_weight", student_weight,
                            "student_bias", student_bias)
    teachers = _teacher_triples(teacher_hidden, teacher_weight, teacher_bias)
    multi = not isinstance(teacher_hidden, Tensor)
    if teacher_weights is not None and not multi:
        raise ValueError("teacher_weights needs K teachers: lists of teacher_hidden and teacher_weight tensors")
    lead = student_hidden.shape[:-1]
    for i, (th, tw, _) in enumerate(teachers):
        which = f"[{i}]" if multi else ""
        if tw.shape[0] != student_weight.shape[0]:
            raise ValueError(
                f"teacher_weight{which} and student_weight must have the same vocabulary size V; got "
                f"{tw.shape[0]} and {student_weight.shape[0]}"
            )
        if th.shape[:-1] != lead:
            raise ValueError(
                f"teacher_hidden{which} must have the leading shape of student_hidden, {tuple(lead)}; got "
                f"{tuple(th.shape[:-1])}"
            )
    check_chunk_size(chunk_size)
    labels = validation.check_labels(labels, lead, "student_hidden")
    validation.check_same_device(
        student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias, labels=labels,
        **{f"teacher_{part}{f'[{i}]' if multi else ''}": x
           for i, teacher in enumerate(teachers) for part, x in zip(("hidden", "weight", "bias"), teacher)},
    )
    vocab = student_weight.shape[0]
    opts = distill_options(temperature=temperature, divergence=divergence, beta=beta, hard_weight=hard_weight,
                           scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
                           reduction=reduction, labels=labels, vocab=vocab,
                           normalizer=normalizer, student_logit_scale=student_logit_scale,
                           student_softcap=student_softcap, teacher_logit_scale=teacher_logit_scale,
                           teacher_softcap=teacher_softcap)
    weights = validation.check_teacher_weights(teacher_weights, len(teachers), student_hidden.device) if multi else None
    name = _dispatch.resolve_backend(backend, student_hidden.device, student_hidden.dtype, "kd", len(teachers))
    if name == "torch":  # the reference: materialised logits
        return reference.fused_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, temperature=temperature,
            divergence=divergence, beta=beta, hard_weight=hard_weight,
            scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
            reduction=reduction, teacher_weights=weights, normalizer=normalizer,
            student_logit_scale=student_logit_scale, student_softcap=student_softcap,
            teacher_logit_scale=teacher_logit_scale, teacher_softcap=teacher_softcap, return_entropy=return_entropy,
        )

    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    flat = [(th.reshape(-1, th.shape[-1]), tw.detach(), None if tb is None else tb.detach()) for th, tw, tb in teachers]
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    # the entropy's two chunk-sized temporaries count as two more teachers' logits in the budget
    chunk = chunk_rows(h.shape[0], vocab, h.dtype, chunk_size, len(flat) + (2 if return_entropy else 0))
    if len(flat) == 1:  # one teacher (either form): the single-teacher op
        op, teacher_args = fused_linear_distill, (*flat[0], None)
    else:
        op = fused_linear_multi_distill
        teacher_args = (*map(list, zip(*flat)), weights.log().to(compute_dtype(h.dtype)))
    grad_on = torch.is_grad_enabled() and reduction != "none"  # "none": the gradients come in backward
    needs = [grad_on and x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)]
    row_weights = forward_row_weights(flat_labels, ignore_index, reduction, normalizer, h, needs)
    rows, *_, entropies = op(h, student_weight, student_bias, *teacher_args, flat_labels, row_weights, needs, chunk,
                             return_entropy, name, *opts)
    loss = rows.sum() if row_weights is not None else reduce_rows(rows, flat_labels, ignore_index, reduction, lead,
                                                                  normalizer)
    if not return_entropy:
        return loss
    entropies = entropies.detach()
    return loss, entropies.reshape(lead) if reduction == "none" else entropies.sum()
