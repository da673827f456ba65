"""Fused linear + distillation for large vocabularies: ``kdops.fused_linear_distill_loss``.

The loss of ``kdops.distill_loss(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t, labels, ...)`` without the
``[N, V]`` logits: rows are processed in chunks; for each chunk the student and teacher logits
are formed, one fused KD kernel gives the chunk's row losses and ``dL/dlogits``, and the
gradients are accumulated at once::

    grad_h[chunk] = G @ W_s        grad_W_s += G.T @ h_s[chunk]        grad_b_s += G.sum(0)

so backward is a scale by ``grad_output``. Extra memory: one chunk of logits (the chunk size is
chosen from a memory budget, or given), plus the gradients themselves. Ignored rows are skipped.
The ``"torch"`` backend is the reference, which does form the logits.
With ``reduction="none"`` the per-row weights are only known in backward, so the gradients are
computed there, in a second chunked pass.

On the ``"triton"`` backend (float32, float16, bfloat16 inputs) not even a chunk of logits is
formed: the blockwise kernel of :mod:`kdops.triton.fused_linear` keeps each logit tile on chip
(extra memory ``O(N)`` besides the float32 gradients). float64 takes the chunked path there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdops import _dispatch, reference
from kdops.ops import validation
from kdops.ops.kd import KD_KERNELS
from kdops.ops.saved_grad import scale_saved_grad

# Memory for one chunk's temporaries (student and teacher logits and their gradient).
CHUNK_BUDGET_BYTES = 256 * 2**20
# Input dtypes of the blockwise Triton kernel (float64 takes the chunked path).
_BLOCKWISE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def chunk_rows(n_rows: int, vocab: int, itemsize: int, chunk_size: Optional[int]) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many as fit in ``CHUNK_BUDGET_BYTES``."""
    if chunk_size is not None:
        return max(1, min(chunk_size, max(n_rows, 1)))
    per_row = vocab * (3 * itemsize + 4)  # logits s, t, their gradient, and float32 row temporaries
    return max(1, min(max(n_rows, 1), CHUNK_BUDGET_BYTES // per_row))


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Weight gradients are accumulated over chunks in float32 (float64 for float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunked(
    h: Tensor, w: Tensor, b: Optional[Tensor], th: Tensor, tw: Tensor, tb: Optional[Tensor],
    labels: Optional[Tensor], row_weights: Optional[Tensor], divergence: int, temperature: float,
    beta: float, hard_weight: float, soft_weight: float, ignore_index: int, chunk: int,
    needs: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row losses, and the gradients of ``sum_r row_weights[r] * row[r]`` (weights 1 if None)
    with respect to ``h``, ``w``, ``b`` where ``needs`` says so (else empty tensors)."""
    kernel = KD_KERNELS[backend]
    n = h.shape[0]
    rows = h.new_zeros(n, dtype=_grad_dtype(h.dtype))
    gh = torch.zeros_like(h) if needs[0] else h.new_empty(0)
    gw = torch.zeros(w.shape, dtype=_grad_dtype(w.dtype), device=w.device) if needs[1] else w.new_empty(0)
    gb = torch.zeros(w.shape[0], dtype=_grad_dtype(w.dtype), device=w.device) if needs[2] else w.new_empty(0)
    any_grad = any(needs)
    # Ignored rows cost nothing: only counted rows are visited.
    order = None if labels is None else (labels != ignore_index).nonzero().squeeze(1)
    count = n if order is None else order.numel()
    for start in range(0, count, chunk):
        idx = slice(start, min(start + chunk, count)) if order is None else order[start:start + chunk]
        hc = h[idx]
        s_logits = torch.nn.functional.linear(hc, w, b)
        t_logits = torch.nn.functional.linear(th[idx], tw, tb).to(s_logits.dtype)
        lc = None if labels is None else labels[idx]
        r, g = kernel(s_logits, t_logits, lc, divergence, temperature, beta, hard_weight, soft_weight,
                      ignore_index, any_grad)
        rows[idx] = r
        if not any_grad:
            continue
        if row_weights is not None:
            g.mul_(row_weights[idx].unsqueeze(1))
        if needs[0]:
            gh[idx] = g @ w
        if needs[1]:
            gw.addmm_(g.t().to(gw.dtype), hc.to(gw.dtype))
        if needs[2]:
            gb.add_(g.sum(0, dtype=gb.dtype))
    return rows, gh, gw, gb


def _compute(
    h: Tensor, w: Tensor, b: Optional[Tensor], th: Tensor, tw: Tensor, tb: Optional[Tensor],
    labels: Optional[Tensor], row_weights: Optional[Tensor], divergence: int, temperature: float,
    beta: float, hard_weight: float, soft_weight: float, ignore_index: int, chunk: int,
    needs: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_chunked`'s results; on the ``"triton"`` backend (float32, float16, bfloat16) from
    the blockwise kernel of :mod:`kdops.triton.fused_linear`, which ignores ``chunk``."""
    if backend == "triton" and h.dtype in _BLOCKWISE_DTYPES and th.dtype in _BLOCKWISE_DTYPES:
        from kdops.triton.fused_linear import fused_linear_distill  # late: TRITON_INTERPRET

        return fused_linear_distill(h, w, b, th, tw, tb, labels, row_weights, divergence, temperature,
                                    beta, hard_weight, soft_weight, ignore_index, needs)
    return _chunked(h, w, b, th, tw, tb, labels, row_weights, divergence, temperature, beta,
                    hard_weight, soft_weight, ignore_index, chunk, needs, backend)


@torch.library.custom_op("kdops::fused_linear_distill_sum", mutates_args=())
def fused_linear_distill_sum(
    h: Tensor, w: Tensor, b: Optional[Tensor], th: Tensor, tw: Tensor, tb: Optional[Tensor],
    labels: Optional[Tensor], divergence: int, temperature: float, beta: float, hard_weight: float,
    soft_weight: float, ignore_index: int, chunk: int, needs: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sum of the row losses, and its gradients to ``h``, ``w``, ``b`` (as ``needs`` says)."""
    rows, gh, gw, gb = _compute(h, w, b, th, tw, tb, labels, None, divergence, temperature, beta,
                                hard_weight, soft_weight, ignore_index, chunk, needs, backend)
    return rows.sum(), gh, gw.to(w.dtype), gb.to(w.dtype)


@fused_linear_distill_sum.register_fake
def _(h, w, b, th, tw, tb, labels, divergence, temperature, beta, hard_weight, soft_weight,
      ignore_index, chunk, needs, backend):
    return (
        h.new_empty((), dtype=_grad_dtype(h.dtype)),
        h.new_empty(h.shape if needs[0] else (0,)),
        w.new_empty(w.shape if needs[1] else (0,)),
        w.new_empty(w.shape[:1] if needs[2] else (0,)),
    )


def _sum_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.needs = inputs[14]


def _sum_backward(ctx, grad_total, *_):
    grads = [scale_saved_grad(g, grad_total) if need else None for g, need in zip(ctx.saved_tensors, ctx.needs)]
    return (*grads, None, None, None, None, None, None, None, None, None, None, None, None, None)


fused_linear_distill_sum.register_autograd(_sum_backward, setup_context=_sum_setup)


@torch.library.custom_op("kdops::fused_linear_distill_rows", mutates_args=())
def fused_linear_distill_rows(
    h: Tensor, w: Tensor, b: Optional[Tensor], th: Tensor, tw: Tensor, tb: Optional[Tensor],
    labels: Optional[Tensor], divergence: int, temperature: float, beta: float, hard_weight: float,
    soft_weight: float, ignore_index: int, chunk: int, backend: str,
) -> Tensor:
    """The row losses ``[N]`` alone (their gradients come from ``fused_linear_distill_grad``)."""
    return _compute(h, w, b, th, tw, tb, labels, None, divergence, temperature, beta, hard_weight,
                    soft_weight, ignore_index, chunk, [False] * 3, backend)[0]


@fused_linear_distill_rows.register_fake
def _(h, w, b, th, tw, tb, labels, divergence, temperature, beta, hard_weight, soft_weight,
      ignore_index, chunk, backend):
    return h.new_empty(h.shape[:1], dtype=_grad_dtype(h.dtype))


@torch.library.custom_op("kdops::fused_linear_distill_grad", mutates_args=())
def fused_linear_distill_grad(
    h: Tensor, w: Tensor, b: Optional[Tensor], th: Tensor, tw: Tensor, tb: Optional[Tensor],
    labels: Optional[Tensor], row_weights: Tensor, divergence: int, temperature: float, beta: float,
    hard_weight: float, soft_weight: float, ignore_index: int, chunk: int, needs: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum_r row_weights[r] * row[r]`` to ``h``, ``w``, ``b``."""
    _, gh, gw, gb = _compute(h, w, b, th, tw, tb, labels, row_weights, divergence, temperature, beta,
                             hard_weight, soft_weight, ignore_index, chunk, needs, backend)
    return gh, gw.to(w.dtype), gb.to(w.dtype)


@fused_linear_distill_grad.register_fake
def _(h, w, b, th, tw, tb, labels, row_weights, divergence, temperature, beta, hard_weight,
      soft_weight, ignore_index, chunk, needs, backend):
    return (
        h.new_empty(h.shape if needs[0] else (0,)),
        w.new_empty(w.shape if needs[1] else (0,)),
        w.new_empty(w.shape[:1] if needs[2] else (0,)),
    )


def _rows_setup(ctx, inputs, output):
    ctx.save_for_backward(*(x for x in inputs[:7] if x is not None))
    ctx.present = [x is not None for x in inputs[:7]]
    ctx.scalars = inputs[7:]


def _rows_backward(ctx, grad_rows):
    saved = iter(ctx.saved_tensors)
    h, w, b, th, tw, tb, labels = (next(saved) if p else None for p in ctx.present)
    *scalars, backend = ctx.scalars
    needs = list(ctx.needs_input_grad[:3])
    gh, gw, gb = fused_linear_distill_grad(
        h, w, b, th, tw, tb, labels, grad_rows.contiguous(), *scalars, needs, backend)
    grads = [g if need else None for g, need in zip((gh, gw, gb), needs)]
    return (*grads, None, None, None, None, None, None, None, None, None, None, None, None)


fused_linear_distill_rows.register_autograd(_rows_backward, setup_context=_rows_setup)


def _check_pair(hidden_name: str, hidden: Tensor, weight_name: str, weight: Tensor,
                bias_name: str, bias: Optional[Tensor]) -> None:
    validation.check_float_tensor(hidden_name, hidden)
    validation.check_float_tensor(weight_name, weight)
    if hidden.dim() < 1:
        raise ValueError(f"{hidden_name} must have shape (..., H); got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name} must have shape (V, H) with H = {hidden_name}.shape[-1] = "
            f"{hidden.shape[-1]}; got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{weight_name} must have the dtype of {hidden_name}; got {weight.dtype} and {hidden.dtype}")
    if bias is not None:
        validation.check_float_tensor(bias_name, bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{bias_name} must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{bias_name} must have the dtype of {weight_name}; got {bias.dtype} and {weight.dtype}")


def fused_linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    hard_weight: float = 0.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """:func:`kdops.distill_loss` of ``student_hidden @ student_weight.T + student_bias`` against
    ``teacher_hidden @ teacher_weight.T + teacher_bias`` without forming either ``[N, V]`` logits.

    ``student_hidden (..., Hs)``, ``student_weight (V, Hs)``, ``teacher_hidden (..., Ht)``,
    ``teacher_weight (V, Ht)``: ``Ht`` may differ from ``Hs``; the teacher's logits are cast to
    the student's dtype (the blockwise Triton kernel keeps both in float32). Gradients flow to
    the student's hidden states, weight and bias only.
    ``chunk_size``: rows per chunk (default: from a 256 MiB budget for the chunk's logits); the
    blockwise Triton kernel works in on-chip tiles and ignores it.
    Other options as in :func:`kdops.distill_loss`.
    """
    _check_pair("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias)
    _check_pair("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias)
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight and student_weight must have the same vocabulary size V; got "
            f"{teacher_weight.shape[0]} and {student_weight.shape[0]}"
        )
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(
            f"teacher_hidden must have the leading shape of student_hidden, {tuple(lead)}; got "
            f"{tuple(teacher_hidden.shape[:-1])}"
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")
    labels = validation.check_labels(labels, lead, "student_hidden")
    validation.check_same_device(
        student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias, labels=labels,
    )
    code = validation.check_options(
        temperature=temperature, divergence=divergence, beta=beta, hard_weight=hard_weight,
        reduction=reduction, has_labels=labels is not None,
    )
    vocab = student_weight.shape[0]
    if labels is not None and hard_weight > 0:
        validation.check_labels_in_range(labels, ignore_index, vocab)
    name = _dispatch.resolve_backend(backend, student_hidden.device, student_hidden.dtype)
    if name == "torch":  # the reference: materialised logits
        return reference.fused_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, temperature=temperature,
            divergence=divergence, beta=beta, hard_weight=hard_weight,
            scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
            reduction=reduction,
        )

    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    soft_weight = (1.0 - hard_weight) * (temperature * temperature if scale_by_temperature_squared else 1.0)
    chunk = chunk_rows(h.shape[0], vocab, h.element_size(), chunk_size)
    args = (h, student_weight, student_bias, th, teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(), flat_labels,
            code, float(temperature), float(beta), float(hard_weight), float(soft_weight), int(ignore_index), chunk)
    if reduction == "none":
        return fused_linear_distill_rows(*args, name).reshape(lead)
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)]
    total = fused_linear_distill_sum(*args, needs, name)[0]
    if reduction == "sum":
        return total
    count = h.shape[0] if flat_labels is None else (flat_labels != ignore_index).sum()
    return total / (count.clamp(min=1).to(total.dtype) if isinstance(count, Tensor) else max(count, 1))
