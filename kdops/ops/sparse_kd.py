"""Distillation from a sparse teacher (its top-k log-probabilities): ``kdops.sparse_distill_loss``
and ``kdops.fused_linear_sparse_distill_loss``.

The teacher of a row is known through ``lt_k``, its log-probabilities at temperature ``T`` at the
K distinct vocabulary indices ``idx_k`` (e.g. from :class:`kdops.cache.TeacherCache`). With
``ls = log_softmax(s / T)`` over the student's full vocabulary, the divergence compares K + 1
buckets: the top-k entries and, when K < V, the rest of the vocabulary:

==================  =====================================  ==========================================
bucket              student                                teacher
==================  =====================================  ==========================================
top-k entry k       ``ls[idx_k]``                          ``rest_mass="bucket"``: ``lt_k``;
                                                           ``"ignore"``: ``lt_k - logsumexp(lt)``
rest (K < V)        ``log(1 - sum_k exp(ls[idx_k]))``      ``"bucket"``: ``log(1 - sum_k exp(lt_k))``;
                                                           ``"ignore"``: ``-inf`` (no mass)
==================  =====================================  ==========================================

``"ignore"`` renormalises the teacher's top-k to sum 1; it equals :func:`kdops.distill_loss`
against teacher logits ``T * lt`` at the top-k and ``-inf`` elsewhere (so reverse KL, and skew
reverse KL with ``beta = 0``, would be ``+inf`` and are refused). ``"bucket"`` keeps the teacher's
probabilities and compares its rest mass with the student's. With K = V both are
:func:`kdops.distill_loss` on the teacher's full log-probabilities.

Row loss ``a * CE(s, label) + (1 - a) * c * D(teacher buckets, student buckets)`` with
``a = hard_weight`` and ``c = T**2`` (``scale_by_temperature_squared``). Kernels compute the loss
and the gradient in one call (the student's log-sum-exp online, then
``grad = softmax(s / T) * coef`` over the vocabulary and the top-k entries scattered), so backward
is a scale of the saved gradient. The kernels take the student's rest mass as
``1 - sum_k exp(ls[idx_k])`` (they never mark the top-k in the vocabulary): in float32 its
absolute error is about 1e-7 to 1e-6, so a rest mass below about 1e-4 is approximate (the torch
reference sums the rest exactly).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from kdops import _dispatch, reference
from kdops.backends.native import sparse_kd as native_sparse_kd
from kdops._alloc import compute_dtype
from kdops.ops import validation
from kdops.ops.fused_linear import _check_pair, chunk_rows
from kdops.ops.saved_grad import scale_saved_grad

REST_MASS = ("ignore", "bucket")
_INDEX_DTYPES = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)


def _triton_sparse_kd_forward(*args):
    from kdops.backends.triton.sparse_kd import sparse_kd_forward  # late: TRITON_INTERPRET is read at import

    return sparse_kd_forward(*args)


# backend -> sparse_kd_forward(student, topk_logprobs, topk_indices, labels, divergence,
#   temperature, beta, hard_weight, soft_weight, ignore_index, bucket, compute_grad) -> (rows, grad)
SPARSE_KD_KERNELS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "triton": _triton_sparse_kd_forward,
    "cuda": native_sparse_kd.sparse_kd_forward,
    "cpu": native_sparse_kd.sparse_kd_forward,
}



@torch.library.custom_op("kdops::sparse_distill_rows", mutates_args=())
def sparse_distill_rows(
    student: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    labels: Optional[Tensor],
    divergence: int,
    temperature: float,
    beta: float,
    hard_weight: float,
    soft_weight: float,
    ignore_index: int,
    bucket: bool,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Row losses ``[N]`` of ``[N, V]`` student logits against ``[N, K]`` teacher top-k
    (float32 / float64 log-probabilities, int32 indices) and, if ``compute_grad``, their gradients
    with respect to ``student`` (``[N, V]``, student dtype; else an empty tensor)."""
    return SPARSE_KD_KERNELS[backend](
        student, topk_logprobs, topk_indices, labels, divergence, temperature, beta, hard_weight,
        soft_weight, ignore_index, bucket, compute_grad,
    )


@sparse_distill_rows.register_fake
def _(student, topk_logprobs, topk_indices, labels, divergence, temperature, beta, hard_weight,
      soft_weight, ignore_index, bucket, compute_grad, backend):
    loss = student.new_empty(student.shape[:1], dtype=compute_dtype(student.dtype))
    return loss, student.new_empty(student.shape if compute_grad else (0,))


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no [N, V] zeros for the unused gradient of output[1]
    ctx.save_for_backward(output[1])
    ctx.compute_grad = inputs[11]


def _backward(ctx, grad_loss: Tensor, _grad_of_grad: Optional[Tensor]):
    if not ctx.compute_grad:
        raise RuntimeError("kdops: the loss was computed without gradient tracking of the student logits")
    if grad_loss is None:  # only output[1] was used: no gradient to the logits
        return (None,) * len(ctx.needs_input_grad)
    (row_grad,) = ctx.saved_tensors
    return (scale_saved_grad(row_grad, grad_loss.unsqueeze(-1)),) + (None,) * 12


sparse_distill_rows.register_autograd(_backward, setup_context=_setup_context)


def _check_topk(topk_logprobs: Tensor, topk_indices: Tensor, lead: torch.Size, vocab: int, what: str) -> int:
    """Shapes and dtypes of the teacher's top-k; returns K."""
    validation.check_float_tensor("topk_logprobs", topk_logprobs)
    if not isinstance(topk_indices, Tensor):
        raise TypeError(f"topk_indices must be a torch.Tensor; got {type(topk_indices).__name__}")
    if topk_indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"topk_indices must be an integer tensor (int32 or int64); got {topk_indices.dtype}")
    if topk_logprobs.dim() < 1 or topk_logprobs.shape[:-1] != lead:
        raise ValueError(
            f"topk_logprobs must have shape (..., K) with the leading shape of {what}, {tuple(lead)}; "
            f"got {tuple(topk_logprobs.shape)}"
        )
    if topk_indices.shape != topk_logprobs.shape:
        raise ValueError(
            f"topk_indices must have the shape of topk_logprobs {tuple(topk_logprobs.shape)}; "
            f"got {tuple(topk_indices.shape)}"
        )
    k = topk_logprobs.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"topk_logprobs must have 1 <= K <= V = {vocab} entries per row; got K = {k}")
    if topk_indices.device.type == "cpu" and topk_indices.numel() and not torch.compiler.is_compiling():
        low, high = int(topk_indices.min()), int(topk_indices.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"topk_indices must lie in [0, {vocab}); found {low if low < 0 else high}")
    return k


def _check_sparse_options(rest_mass: str, divergence: str, beta: float) -> bool:
    """Checks ``rest_mass`` against the divergence; returns whether it is ``"bucket"``."""
    if rest_mass not in REST_MASS:
        raise ValueError(f"rest_mass must be one of {', '.join(map(repr, REST_MASS))}; got {rest_mass!r}")
    if rest_mass == "ignore" and (divergence == "reverse_kl" or (divergence == "skew_reverse_kl" and beta == 0)):
        raise ValueError(
            f"divergence={divergence!r} with rest_mass='ignore' is +inf whenever the student has mass "
            "outside the teacher's top-k (the renormalised teacher has none there); use rest_mass='bucket'"
        )
    return rest_mass == "bucket"


def _kernel_topk(topk_logprobs: Tensor, topk_indices: Tensor, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The top-k as the kernels take them: contiguous ``[N, K]`` float32 (float64 for float64
    students) log-probabilities and int32 indices (copies only if needed: ``N * K`` elements)."""
    values = topk_logprobs.detach().reshape(-1, k).to(compute_dtype(dtype)).contiguous()
    return values, topk_indices.reshape(-1, k).to(torch.int32).contiguous()


def sparse_distill_loss(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    labels: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    rest_mass: str = "ignore",
    hard_weight: float = 0.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """Knowledge distillation of ``student_logits (..., V)`` from a sparse teacher: its top-k
    log-probabilities ``topk_logprobs (..., K)`` at temperature ``temperature`` (any float dtype,
    e.g. bf16 from a cache) at the distinct vocabulary indices ``topk_indices (..., K)``.

    Row loss ``a * CE(student, label) + (1 - a) * c * D(teacher, student)`` over the buckets of
    this module's docstring: the K top-k entries of ``log_softmax(student / T)`` (over the full
    vocabulary) and, if K < V, the student's remaining mass as one bucket.
    ``rest_mass="ignore"``: the teacher's top-k renormalised to sum 1, no rest (refused for
    ``reverse_kl``: infinite); ``"bucket"``: the teacher's rest mass ``1 - sum exp(lt)`` against
    the student's. ``a = hard_weight``, ``c = T**2`` if ``scale_by_temperature_squared``.
    ``divergence``, ``beta``, ``labels``, ``ignore_index``, ``reduction``, ``backend`` as in
    :func:`kdops.distill_loss`. The gradient flows to ``student_logits`` only.
    """
    validation.check_float_tensor("student_logits", student_logits)
    if student_logits.dim() == 0:
        raise ValueError("student_logits must have at least one dimension (..., V); got a scalar")
    vocab = student_logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"student_logits must have a vocabulary dimension V >= 1; got shape {tuple(student_logits.shape)}")
    lead = student_logits.shape[:-1]
    k = _check_topk(topk_logprobs, topk_indices, lead, vocab, "student_logits")
    labels = validation.check_labels(labels, lead, "student_logits")
    validation.check_same_device(student_logits=student_logits, topk_logprobs=topk_logprobs,
                                 topk_indices=topk_indices, labels=labels)
    code = validation.check_options(temperature=temperature, divergence=divergence, beta=beta,
                                    hard_weight=hard_weight, reduction=reduction, has_labels=labels is not None)
    bucket = _check_sparse_options(rest_mass, divergence, beta)
    if labels is not None and hard_weight > 0:
        validation.check_labels_in_range(labels, ignore_index, vocab)
    name = _dispatch.resolve_backend(backend, student_logits.device, student_logits.dtype)
    if name == "torch":
        return reference.sparse_distill_loss(
            student_logits, topk_logprobs, topk_indices, labels, temperature=temperature,
            divergence=divergence, beta=beta, rest_mass=rest_mass, hard_weight=hard_weight,
            scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
            reduction=reduction,
        )
    student = student_logits.reshape(-1, vocab)
    if student.stride(-1) != 1:
        student = student.contiguous()
    values, indices = _kernel_topk(topk_logprobs, topk_indices, k, student.dtype)
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    soft_weight = (1.0 - hard_weight) * (temperature * temperature if scale_by_temperature_squared else 1.0)
    compute_grad = student_logits.requires_grad and torch.is_grad_enabled()
    rows, _ = sparse_distill_rows(
        student, values, indices, flat_labels, code, float(temperature), float(beta),
        float(hard_weight), float(soft_weight), int(ignore_index), bucket, compute_grad, name,
    )
    valid = torch.ones(rows.shape, dtype=torch.bool, device=rows.device) if flat_labels is None else flat_labels != ignore_index
    return reference.reduce_rows(rows, valid, reduction).reshape(lead if reduction == "none" else ())


# ---- fused linear: chunks of rows, the [N, V] student logits never formed ----


def _chunked_sparse(
    h: Tensor, w: Tensor, b: Optional[Tensor], values: Tensor, indices: Tensor,
    labels: Optional[Tensor], row_weights: Optional[Tensor], divergence: int, temperature: float,
    beta: float, hard_weight: float, soft_weight: float, ignore_index: int, bucket: bool,
    chunk: int, needs: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row losses, and the gradients of ``sum_r row_weights[r] * row[r]`` (weights 1 if None)
    to ``h``, ``w``, ``b`` where ``needs`` says so (else empty tensors). Ignored rows are skipped."""
    kernel = SPARSE_KD_KERNELS[backend]
    rows = h.new_zeros(h.shape[0], dtype=compute_dtype(h.dtype))
    gh = torch.zeros_like(h) if needs[0] else h.new_empty(0)
    gw = torch.zeros(w.shape, dtype=compute_dtype(w.dtype), device=w.device) if needs[1] else w.new_empty(0)
    gb = torch.zeros(w.shape[0], dtype=compute_dtype(w.dtype), device=w.device) if needs[2] else w.new_empty(0)
    any_grad = any(needs)
    order = None if labels is None else (labels != ignore_index).nonzero().squeeze(1)
    count = h.shape[0] if order is None else order.numel()
    for start in range(0, count, chunk):
        idx = slice(start, min(start + chunk, count)) if order is None else order[start:start + chunk]
        hc = h[idx]
        logits = torch.nn.functional.linear(hc, w, b)
        r, g = kernel(logits, values[idx], indices[idx], None if labels is None else labels[idx],
                      divergence, temperature, beta, hard_weight, soft_weight, ignore_index, bucket, any_grad)
        rows[idx] = r
        if not any_grad:
            continue
        if row_weights is not None:
            g.mul_(row_weights[idx].unsqueeze(1).to(g.dtype))
        if needs[0]:
            gh[idx] = g @ w
        if needs[1]:
            gw.addmm_(g.t().to(gw.dtype), hc.to(gw.dtype))
        if needs[2]:
            gb.add_(g.sum(0, dtype=gb.dtype))
    return rows, gh, gw, gb


@torch.library.custom_op("kdops::fused_linear_sparse_distill", mutates_args=())
def fused_linear_sparse_distill(
    h: Tensor, w: Tensor, b: Optional[Tensor], values: Tensor, indices: Tensor,
    labels: Optional[Tensor], row_weights: Optional[Tensor], divergence: int, temperature: float,
    beta: float, hard_weight: float, soft_weight: float, ignore_index: int, bucket: bool,
    chunk: int, needs: list[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row losses ``[N]`` and the gradients of ``sum_r row_weights[r] * row[r]`` to ``h``, ``w``,
    ``b`` (as ``needs`` says; empty otherwise)."""
    rows, gh, gw, gb = _chunked_sparse(h, w, b, values, indices, labels, row_weights, divergence,
                                       temperature, beta, hard_weight, soft_weight, ignore_index,
                                       bucket, chunk, needs, backend)
    return rows, gh, gw.to(w.dtype), gb.to(w.dtype)


@fused_linear_sparse_distill.register_fake
def _(h, w, b, values, indices, labels, row_weights, divergence, temperature, beta, hard_weight,
      soft_weight, ignore_index, bucket, chunk, needs, backend):
    return (
        h.new_empty(h.shape[:1], dtype=compute_dtype(h.dtype)),
        h.new_empty(h.shape if needs[0] else (0,)),
        w.new_empty(w.shape if needs[1] else (0,)),
        w.new_empty(w.shape[:1] if needs[2] else (0,)),
    )


def _fused_setup(ctx, inputs, output):
    """Gradients computed in forward (no row weights: a sum) are saved; for per-row losses
    (``reduction="none"``) the inputs are, and backward runs a second chunked pass."""
    ctx.in_forward = any(inputs[15])
    if ctx.in_forward:
        ctx.save_for_backward(*output[1:])
        ctx.needs = inputs[15]
    else:
        ctx.save_for_backward(*(x for x in inputs[:6] if x is not None))
        ctx.present = [x is not None for x in inputs[:6]]
        ctx.scalars = inputs[7:15] + inputs[16:]


def _fused_backward(ctx, grad_rows, *_):
    if ctx.in_forward:  # the rows' weights were all 1: grad_rows is one value repeated (a sum)
        scale = grad_rows[:1] if grad_rows.numel() else grad_rows.new_zeros(1)
        grads = [scale_saved_grad(g, scale) if need else None for g, need in zip(ctx.saved_tensors, ctx.needs)]
    else:
        saved = iter(ctx.saved_tensors)
        h, w, b, values, indices, labels = (next(saved) if p else None for p in ctx.present)
        *scalars, backend = ctx.scalars
        needs = list(ctx.needs_input_grad[:3])
        _, gh, gw, gb = fused_linear_sparse_distill(h, w, b, values, indices, labels, grad_rows.contiguous(),
                                                    *scalars, needs, backend)
        grads = [g if need else None for g, need in zip((gh, gw, gb), needs)]
    return (*grads,) + (None,) * 14


fused_linear_sparse_distill.register_autograd(_fused_backward, setup_context=_fused_setup)


def fused_linear_sparse_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    labels: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    rest_mass: str = "ignore",
    hard_weight: float = 0.0,
    scale_by_temperature_squared: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """:func:`sparse_distill_loss` of ``student_hidden (..., H) @ student_weight (V, H).T +
    student_bias`` without forming the ``[N, V]`` logits: rows go in chunks of ``chunk_size``
    (default: from a 256 MiB budget, as :func:`kdops.fused_linear_distill_loss`), each chunk's
    logits give its row losses and ``dL/dlogits`` at once, and the gradients to the hidden
    states, weight and bias are accumulated. Other options as in :func:`sparse_distill_loss`.
    """
    _check_pair("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias)
    lead = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    k = _check_topk(topk_logprobs, topk_indices, lead, vocab, "student_hidden")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")
    labels = validation.check_labels(labels, lead, "student_hidden")
    validation.check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                                 student_bias=student_bias, topk_logprobs=topk_logprobs,
                                 topk_indices=topk_indices, labels=labels)
    code = validation.check_options(temperature=temperature, divergence=divergence, beta=beta,
                                    hard_weight=hard_weight, reduction=reduction, has_labels=labels is not None)
    bucket = _check_sparse_options(rest_mass, divergence, beta)
    if labels is not None and hard_weight > 0:
        validation.check_labels_in_range(labels, ignore_index, vocab)
    name = _dispatch.resolve_backend(backend, student_hidden.device, student_hidden.dtype)
    if name == "torch":
        return reference.fused_linear_sparse_distill_loss(
            student_hidden, student_weight, topk_logprobs, topk_indices, labels, student_bias=student_bias,
            temperature=temperature, divergence=divergence, beta=beta, rest_mass=rest_mass,
            hard_weight=hard_weight, scale_by_temperature_squared=scale_by_temperature_squared,
            ignore_index=ignore_index, reduction=reduction,
        )
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    values, indices = _kernel_topk(topk_logprobs, topk_indices, k, h.dtype)
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    soft_weight = (1.0 - hard_weight) * (temperature * temperature if scale_by_temperature_squared else 1.0)
    chunk = chunk_rows(h.shape[0], vocab, h.element_size(), chunk_size)
    grad_on = torch.is_grad_enabled() and reduction != "none"
    needs = [grad_on and x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)]
    rows, *_ = fused_linear_sparse_distill(
        h, student_weight, student_bias, values, indices, flat_labels, None, code, float(temperature),
        float(beta), float(hard_weight), float(soft_weight), int(ignore_index), bucket, chunk, needs, name,
    )
    valid = torch.ones(rows.shape, dtype=torch.bool, device=rows.device) if flat_labels is None else flat_labels != ignore_index
    return reference.reduce_rows(rows, valid, reduction).reshape(lead if reduction == "none" else ())
