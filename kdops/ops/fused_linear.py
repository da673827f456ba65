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
formed: the blockwise kernel of :mod:`kdops.backends.triton.fused_linear` keeps each logit tile on chip
(extra memory ``O(N)`` besides the float32 gradients). float64 takes the chunked path there.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from kdops import _dispatch, reference
from kdops._alloc import compute_dtype
from kdops.ops import validation
from kdops.ops.kd import KD_KERNELS
from kdops.ops.saved_grad import scale_saved_grad

# Memory for one chunk's temporaries (student and teacher logits and their gradient).
CHUNK_BUDGET_BYTES = 256 * 2**20
# Input dtypes of the blockwise Triton kernel (float64 takes the chunked path).
_BLOCKWISE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def chunk_rows(n_rows: int, vocab: int, itemsize: int, chunk_size: Optional[int], n_teachers: int = 1) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many as fit in ``CHUNK_BUDGET_BYTES``."""
    if chunk_size is not None:
        return max(1, min(chunk_size, max(n_rows, 1)))
    # logits s, the K teachers' t, their gradient, and float32 row temporaries
    per_row = vocab * ((2 + n_teachers) * itemsize + 4)
    return max(1, min(max(n_rows, 1), CHUNK_BUDGET_BYTES // per_row))



# A teacher's (hidden [N, Ht], weight [V, Ht], bias [V] or None).
Teacher = tuple[Tensor, Tensor, Optional[Tensor]]


def _teachers(th, tw, tb) -> list[Teacher]:
    """The ops' teacher arguments as a list: one teacher's tensors, or (multi-teacher ops)
    lists of K hidden states, weights and biases."""
    return [(th, tw, tb)] if isinstance(th, Tensor) else list(zip(th, tw, tb))


def _chunked(
    h: Tensor, w: Tensor, b: Optional[Tensor], teachers: list[Teacher], log_weights: Optional[Tensor],
    labels: Optional[Tensor], row_weights: Optional[Tensor], divergence: int, temperature: float,
    beta: float, hard_weight: float, soft_weight: float, ignore_index: int, chunk: int,
    needs: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row losses, and the gradients of ``sum_r row_weights[r] * row[r]`` (weights 1 if None)
    with respect to ``h``, ``w``, ``b`` where ``needs`` says so (else empty tensors). ``K > 1``
    teachers: their chunk logits ``[K, n, V]`` go to the kernel, mixed with ``log_weights``."""
    kernel = KD_KERNELS[backend]
    n = h.shape[0]
    rows = h.new_zeros(n, dtype=compute_dtype(h.dtype))
    gh = torch.zeros_like(h) if needs[0] else h.new_empty(0)
    gw = torch.zeros(w.shape, dtype=compute_dtype(w.dtype), device=w.device) if needs[1] else w.new_empty(0)
    gb = torch.zeros(w.shape[0], dtype=compute_dtype(w.dtype), device=w.device) if needs[2] else w.new_empty(0)
    any_grad = any(needs)
    # Ignored rows cost nothing: only counted rows are visited.
    order = None if labels is None else (labels != ignore_index).nonzero().squeeze(1)
    count = n if order is None else order.numel()
    for start in range(0, count, chunk):
        idx = slice(start, min(start + chunk, count)) if order is None else order[start:start + chunk]
        hc = h[idx]
        s_logits = torch.nn.functional.linear(hc, w, b)
        t_logits = [torch.nn.functional.linear(th[idx], tw, tb).to(s_logits.dtype) for th, tw, tb in teachers]
        t_logits = t_logits[0] if len(teachers) == 1 else torch.stack(t_logits)
        lc = None if labels is None else labels[idx]
        r, g = kernel(s_logits, t_logits, lc, divergence, temperature, beta, hard_weight, soft_weight,
                      ignore_index, any_grad, log_weights)
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
    h: Tensor, w: Tensor, b: Optional[Tensor], teachers: list[Teacher], log_weights: Optional[Tensor],
    labels: Optional[Tensor], row_weights: Optional[Tensor], divergence: int, temperature: float,
    beta: float, hard_weight: float, soft_weight: float, ignore_index: int, chunk: int,
    needs: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_chunked`'s results; on the ``"triton"`` backend (float32, float16, bfloat16, one
    teacher) from the blockwise kernel of :mod:`kdops.backends.triton.fused_linear`, which ignores
    ``chunk``. K > 1 teachers take the chunked path on every backend (its KD kernel mixes them)."""
    if len(teachers) == 1:
        th, tw, tb = teachers[0]
        if backend == "triton" and h.dtype in _BLOCKWISE_DTYPES and th.dtype in _BLOCKWISE_DTYPES:
            from kdops.backends.triton.fused_linear import fused_linear_distill  # late: TRITON_INTERPRET

            return fused_linear_distill(h, w, b, th, tw, tb, labels, row_weights, divergence, temperature,
                                        beta, hard_weight, soft_weight, ignore_index, needs)
    return _chunked(h, w, b, teachers, log_weights, labels, row_weights, divergence, temperature, beta,
                    hard_weight, soft_weight, ignore_index, chunk, needs, backend)


# Each op exists twice: for one teacher (``Tensor th, Tensor tw, Tensor? tb``) and for K > 1
# teachers (lists, and their log mixture weights as a last argument); one Python function
# implements both.
_OPTIONS = ("SymInt divergence, float temperature, float beta, float hard_weight, float soft_weight, "
            "SymInt ignore_index, SymInt chunk")
_TEACHER_ARGS = {False: "Tensor th, Tensor tw, Tensor? tb", True: "Tensor[] th, Tensor[] tw, Tensor?[] tb"}
_MULTI_TAIL = {False: "", True: ", Tensor teacher_log_weights"}


def _define(name: str, fn, arguments: str, returns: str, multi: bool):
    schema = "(" + arguments.format(teachers=_TEACHER_ARGS[multi], options=_OPTIONS) + _MULTI_TAIL[multi] + ") -> " + returns
    return torch.library.custom_op(f"kdops::{name}", fn, mutates_args=(), schema=schema)


def _sum(h, w, b, th, tw, tb, labels, divergence, temperature, beta, hard_weight, soft_weight,
         ignore_index, chunk, needs, backend, teacher_log_weights=None):
    """Sum of the row losses, and its gradients to ``h``, ``w``, ``b`` (as ``needs`` says)."""
    rows, gh, gw, gb = _compute(h, w, b, _teachers(th, tw, tb), teacher_log_weights, labels, None, divergence,
                                temperature, beta, hard_weight, soft_weight, ignore_index, chunk, needs, backend)
    return rows.sum(), gh, gw.to(w.dtype), gb.to(w.dtype)


def _sum_fake(h, w, b, th, tw, tb, labels, divergence, temperature, beta, hard_weight, soft_weight,
              ignore_index, chunk, needs, backend, teacher_log_weights=None):
    return (
        h.new_empty((), dtype=compute_dtype(h.dtype)),
        h.new_empty(h.shape if needs[0] else (0,)),
        w.new_empty(w.shape if needs[1] else (0,)),
        w.new_empty(w.shape[:1] if needs[2] else (0,)),
    )


def _no_grads(inputs) -> tuple:
    """The backward's None for each of ``inputs`` (the teacher tensors and options), in their
    structure: a list of Nones for a list of teacher hidden states or weights."""
    return tuple([None] * len(x) if isinstance(x, list) and x and all(isinstance(e, Tensor) for e in x) else None
                 for x in inputs)


def _sum_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zeros for the unused gradients of the saved gradients
    ctx.save_for_backward(*output[1:])
    ctx.needs = inputs[14]
    ctx.no_grads = _no_grads(inputs[3:])


def _sum_backward(ctx, grad_total, *_):
    if grad_total is None:  # only the saved gradients were used: no gradient to the inputs
        return (None,) * len(ctx.needs_input_grad)
    grads = [scale_saved_grad(g, grad_total) if need else None for g, need in zip(ctx.saved_tensors, ctx.needs)]
    return (*grads, *ctx.no_grads)


def _rows(h, w, b, th, tw, tb, labels, divergence, temperature, beta, hard_weight, soft_weight,
          ignore_index, chunk, backend, teacher_log_weights=None):
    """The row losses ``[N]`` alone (their gradients come from ``fused_linear_distill_grad``)."""
    return _compute(h, w, b, _teachers(th, tw, tb), teacher_log_weights, labels, None, divergence, temperature,
                    beta, hard_weight, soft_weight, ignore_index, chunk, [False] * 3, backend)[0]


def _rows_fake(h, *_):
    return h.new_empty(h.shape[:1], dtype=compute_dtype(h.dtype))


def _grad(h, w, b, th, tw, tb, labels, row_weights, divergence, temperature, beta, hard_weight,
          soft_weight, ignore_index, chunk, needs, backend, teacher_log_weights=None):
    """Gradients of ``sum_r row_weights[r] * row[r]`` to ``h``, ``w``, ``b``."""
    _, gh, gw, gb = _compute(h, w, b, _teachers(th, tw, tb), teacher_log_weights, labels, row_weights,
                             divergence, temperature, beta, hard_weight, soft_weight, ignore_index, chunk,
                             needs, backend)
    return gh, gw.to(w.dtype), gb.to(w.dtype)


def _grad_fake(h, w, b, th, tw, tb, labels, row_weights, divergence, temperature, beta, hard_weight,
               soft_weight, ignore_index, chunk, needs, backend, teacher_log_weights=None):
    return (
        h.new_empty(h.shape if needs[0] else (0,)),
        w.new_empty(w.shape if needs[1] else (0,)),
        w.new_empty(w.shape[:1] if needs[2] else (0,)),
    )


def _rows_setup(ctx, inputs, output):
    h, w, b, *teachers, labels = inputs[:7]
    ctx.save_for_backward(*(x for x in (h, w, b, labels) if x is not None))
    ctx.present = [x is not None for x in (h, w, b, labels)]
    ctx.teachers = teachers  # constants: no gradient flows to them
    ctx.options = inputs[7:14]
    ctx.tail = inputs[14:]  # backend (and the log weights of the multi-teacher op)
    ctx.no_grads = _no_grads(inputs[3:])


def _rows_backward(ctx, grad_rows):
    saved = iter(ctx.saved_tensors)
    h, w, b, labels = (next(saved) if p else None for p in ctx.present)
    needs = list(ctx.needs_input_grad[:3])
    grad_op = fused_linear_distill_grad if isinstance(ctx.teachers[0], Tensor) else fused_linear_multi_distill_grad
    gh, gw, gb = grad_op(h, w, b, *ctx.teachers, labels, grad_rows.contiguous(), *ctx.options, needs, *ctx.tail)
    grads = [g if need else None for g, need in zip((gh, gw, gb), needs)]
    return (*grads, *ctx.no_grads)


_SUM_ARGS = "Tensor h, Tensor w, Tensor? b, {teachers}, Tensor? labels, {options}, bool[] needs, str backend"
_ROWS_ARGS = "Tensor h, Tensor w, Tensor? b, {teachers}, Tensor? labels, {options}, str backend"
_GRAD_ARGS = ("Tensor h, Tensor w, Tensor? b, {teachers}, Tensor? labels, Tensor row_weights, {options}, "
              "bool[] needs, str backend")

fused_linear_distill_sum = _define("fused_linear_distill_sum", _sum, _SUM_ARGS, "(Tensor, Tensor, Tensor, Tensor)", False)
fused_linear_multi_distill_sum = _define(
    "fused_linear_multi_distill_sum", _sum, _SUM_ARGS, "(Tensor, Tensor, Tensor, Tensor)", True)
fused_linear_distill_rows = _define("fused_linear_distill_rows", _rows, _ROWS_ARGS, "Tensor", False)
fused_linear_multi_distill_rows = _define("fused_linear_multi_distill_rows", _rows, _ROWS_ARGS, "Tensor", True)
fused_linear_distill_grad = _define("fused_linear_distill_grad", _grad, _GRAD_ARGS, "(Tensor, Tensor, Tensor)", False)
fused_linear_multi_distill_grad = _define(
    "fused_linear_multi_distill_grad", _grad, _GRAD_ARGS, "(Tensor, Tensor, Tensor)", True)
for _op in (fused_linear_distill_sum, fused_linear_multi_distill_sum):
    _op.register_fake(_sum_fake)
    _op.register_autograd(_sum_backward, setup_context=_sum_setup)
for _op in (fused_linear_distill_rows, fused_linear_multi_distill_rows):
    _op.register_fake(_rows_fake)
    _op.register_autograd(_rows_backward, setup_context=_rows_setup)
for _op in (fused_linear_distill_grad, fused_linear_multi_distill_grad):
    _op.register_fake(_grad_fake)


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


def _teacher_triples(teacher_hidden, teacher_weight, teacher_bias) -> list[Teacher]:
    """The teachers of :func:`fused_linear_distill_loss` as ``(hidden, weight, bias)`` triples,
    each checked: one teacher's tensors, or equal-length sequences of K teachers'."""
    if isinstance(teacher_hidden, Tensor):
        if not (isinstance(teacher_weight, Tensor) or teacher_weight is None):
            raise TypeError(f"teacher_weight must be a tensor when teacher_hidden is one; got {type(teacher_weight).__name__}")
        _check_pair("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias)
        return [(teacher_hidden, teacher_weight, teacher_bias)]
    if not isinstance(teacher_hidden, (list, tuple)) or not isinstance(teacher_weight, (list, tuple)):
        raise TypeError(
            "teacher_hidden and teacher_weight must both be tensors (one teacher) or lists/tuples of "
            f"tensors (K teachers); got {type(teacher_hidden).__name__} and {type(teacher_weight).__name__}"
        )
    k = len(teacher_hidden)
    biases = [None] * k if teacher_bias is None else teacher_bias
    if not isinstance(biases, (list, tuple)):
        raise TypeError(f"teacher_bias must be None or a list/tuple of K = {k} biases (or None); got {type(biases).__name__}")
    if k == 0 or len(teacher_weight) != k or len(biases) != k:
        raise ValueError(
            f"teacher_hidden, teacher_weight (and teacher_bias) must list the same K >= 1 teachers; got "
            f"{k}, {len(teacher_weight)}" + ("" if teacher_bias is None else f" and {len(biases)}")
        )
    for i, (th, tw, tb) in enumerate(zip(teacher_hidden, teacher_weight, biases)):
        _check_pair(f"teacher_hidden[{i}]", th, f"teacher_weight[{i}]", tw, f"teacher_bias[{i}]", tb)
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

    Multi-teacher: ``teacher_hidden`` and ``teacher_weight`` (and ``teacher_bias``, else None)
    lists of K teachers' tensors (each its own ``Ht_k``) distil from the mixture
    ``sum_k w_k softmax(t_k / T)`` with ``teacher_weights`` as in :func:`kdops.distill_loss`; a
    chunk holds the K teachers' logits (K > 1 takes the chunked path on the Triton backend too).
    Other options as in :func:`kdops.distill_loss`.
    """
    _check_pair("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias)
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
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")
    labels = validation.check_labels(labels, lead, "student_hidden")
    validation.check_same_device(
        student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias, labels=labels,
        **{f"teacher_{part}{f'[{i}]' if multi else ''}": x
           for i, teacher in enumerate(teachers) for part, x in zip(("hidden", "weight", "bias"), teacher)},
    )
    code = validation.check_options(
        temperature=temperature, divergence=divergence, beta=beta, hard_weight=hard_weight,
        reduction=reduction, has_labels=labels is not None,
    )
    vocab = student_weight.shape[0]
    if labels is not None and hard_weight > 0:
        validation.check_labels_in_range(labels, ignore_index, vocab)
    weights = validation.check_teacher_weights(teacher_weights, len(teachers), student_hidden.device) if multi else None
    name = _dispatch.resolve_backend(backend, student_hidden.device, student_hidden.dtype)
    if name == "torch":  # the reference: materialised logits
        return reference.fused_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, temperature=temperature,
            divergence=divergence, beta=beta, hard_weight=hard_weight,
            scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
            reduction=reduction, teacher_weights=weights,
        )

    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    flat = [(th.reshape(-1, th.shape[-1]), tw.detach(), None if tb is None else tb.detach()) for th, tw, tb in teachers]
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    soft_weight = (1.0 - hard_weight) * (temperature * temperature if scale_by_temperature_squared else 1.0)
    chunk = chunk_rows(h.shape[0], vocab, h.element_size(), chunk_size, len(flat))
    options = (code, float(temperature), float(beta), float(hard_weight), float(soft_weight), int(ignore_index), chunk)
    if len(flat) == 1:  # one teacher (either form): the single-teacher ops
        head = (h, student_weight, student_bias, *flat[0], flat_labels)
        tail: tuple = ()
        rows_op, sum_op = fused_linear_distill_rows, fused_linear_distill_sum
    else:
        head = (h, student_weight, student_bias, *map(list, zip(*flat)), flat_labels)
        tail = (weights.log().to(compute_dtype(h.dtype)),)
        rows_op, sum_op = fused_linear_multi_distill_rows, fused_linear_multi_distill_sum
    if reduction == "none":
        return rows_op(*head, *options, name, *tail).reshape(lead)
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)]
    total = sum_op(*head, *options, needs, name, *tail)[0]
    if reduction == "sum":
        return total
    count = h.shape[0] if flat_labels is None else (flat_labels != ignore_index).sum()
    return total / (count.clamp(min=1).to(total.dtype) if isinstance(count, Tensor) else max(count, 1))
