"""The one chunked lm_head driver: losses of ``h @ w.T + b`` without the ``[N, V]`` logits.

Rows go in chunks of counted rows (labels not ``ignore_index``; ignored rows cost nothing). For
each chunk the student logits are formed in float32 (float64 for float64 inputs) whatever the
input dtype: float32 accumulation *and* a float32 result, so that bf16 / fp16 logits are never
rounded before the loss. A family's ``row_loss`` turns them into the chunk's row losses and their
gradient ``G = dL/dlogits`` (compute dtype), and the gradients are accumulated at once::

    grad_h[chunk] = (w_r * G) @ w        grad_w += (w_r * G).T @ h[chunk]        grad_b += (w_r * G).sum(0)

(``w_r`` the row weights, 1 if None). ``G``, the row weights and all three gradients are in the
compute dtype (``grad_h`` too: :mod:`kdops.distributed` sums it over ranks); ``G`` is rounded to
``w``'s dtype only as the operand of the ``grad_h`` matmul (the rounding autograd through
materialised logits does). The callers cast the gradients to the input dtypes once. Used by
:mod:`kdops.ops.fused_linear` (dense teachers), :mod:`kdops.ops.sparse_kd` (top-k teachers) and
:mod:`kdops.distributed` (vocabulary shards).

A model's final-logit transform (:class:`LogitTransform`: logit scale, softcapping), for a
``row_loss`` whose kernel does not apply it itself (the kd and sparse kernels do), is applied to
each chunk's float32 logits in place before ``row_loss``, and its derivative multiplies ``G`` in
place after it (chain rule; no temporaries beyond the chunk's).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from kdops._alloc import compute_dtype

# Memory for one chunk's temporaries (student and teacher logits and their gradient).
CHUNK_BUDGET_BYTES = 256 * 2**20
# Most bytes of an lm_head weight upcast at once when forming 16-bit logits in float32.
UPCAST_BUDGET_BYTES = 64 * 2**20
# torch.mm(..., out_dtype=) (16-bit operands, float32 result; CUDA kernels only), where this torch has it.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")

# row_loss(rows of the chunk, student logits [n, V] compute dtype, want_grad) -> (row losses [n], G or None)
RowLoss = Callable[[Union[slice, Tensor], Tensor, bool], tuple[Tensor, Optional[Tensor]]]


class LogitTransform(NamedTuple):
    """A model's final-logit transform, applied before the temperature::

        z' = scale * z                              (softcap None: Cohere, Granite, Falcon-H1)
        z' = softcap * tanh(scale * z / softcap)    (Gemma 2 / 3 final-logit softcapping)

    with ``dz'/dz = scale`` or ``scale * (1 - (z' / softcap)**2)``."""

    scale: float = 1.0
    softcap: Optional[float] = None

    @staticmethod
    def checked(model: str, scale: float, softcap: Optional[float]) -> "LogitTransform":
        """The transform of ``{model}_logit_scale`` (a finite number > 0: a -inf logit stays
        -inf) and ``{model}_softcap`` (None or a finite number > 0); errors name the argument."""
        for name, value in ((f"{model}_logit_scale", scale), (f"{model}_softcap", softcap)):
            if value is None and name.endswith("softcap"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number" + (" or None" if name.endswith("softcap") else "")
                                + f"; got {type(value).__name__}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0; got {value}")
        return LogitTransform(float(scale), None if softcap is None else float(softcap))

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply_(self, z: Tensor) -> Tensor:
        """``z'`` in place of the logits ``z``."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def chain_(self, g: Tensor, z: Tensor) -> Tensor:
        """``g * dz'/dz`` in place of the gradient ``g`` to the transformed logits ``z`` (= z',
        overwritten when softcapped)."""
        if self.softcap is not None:
            g.mul_(z.div_(self.softcap).square_().neg_().add_(1.0))
        if self.scale != 1.0:
            g.mul_(self.scale)
        return g


def forward_row_weights(labels: Optional[Tensor], ignore_index: int, reduction: str,
                        normalizer: Union[None, int, Tensor], h: Tensor, needs: Sequence[bool]) -> Optional[Tensor]:
    """The row weights ``[N]`` that fold a mean's ``1 / count`` (or ``1 / normalizer``) into the
    gradients an lm_head op computes in forward (``needs`` set), in float32 before their one
    rounding to the input dtype; the op then returns the weighted rows, whose sum is the loss
    (backward: a scale by 1). None otherwise (``"sum"``; ``"none"``, whose gradients come in
    backward). Formed on the device: no sync."""
    from kdops.ops._common import reduction_divisor

    if not any(needs):
        return None
    divisor = reduction_divisor(labels, ignore_index, reduction, normalizer, h.shape[0], compute_dtype(h.dtype),
                                h.device)
    return None if divisor is None else divisor.reciprocal().expand(h.shape[0]).contiguous()


def weighted_rows(rows: Tensor, row_weights: Optional[Tensor], needs: Sequence[bool]) -> Tensor:
    """An lm_head op's row output: ``rows * row_weights`` when its gradients are computed in
    forward with row weights (the summands of the reduced loss), else ``rows``."""
    return rows * row_weights.to(rows.dtype) if row_weights is not None and any(needs) else rows


def row_entropy(z: Tensor, temperature: float, transform: LogitTransform = LogitTransform()) -> Tensor:
    """``H(softmax(z' / T))`` per row of finite logits ``z`` (``z' = transform(z)``):
    ``logsumexp(y) - sum softmax(y) y``, ``y = z' / T`` (two chunk-sized temporaries)."""
    y = transform.apply_(z.clone()).div_(temperature)
    return torch.logsumexp(y, dim=-1).sub_(torch.softmax(y, dim=-1).mul_(y).sum(-1))


def chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, chunk_size: Optional[int], n_teachers: int = 1) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many as fit in ``CHUNK_BUDGET_BYTES``: the
    student's and the ``n_teachers`` teachers' logits and their gradient in the compute dtype of
    ``dtype`` inputs, and a float32 row temporary."""
    if chunk_size is not None:
        return max(1, min(chunk_size, max(n_rows, 1)))
    per_row = vocab * ((2 + n_teachers) * compute_dtype(dtype).itemsize + 4)
    return max(1, min(max(n_rows, 1), CHUNK_BUDGET_BYTES // per_row))


def check_chunk_size(chunk_size: Optional[int]) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")


def chunk_logits(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """``x @ w.T + b`` as a ``[n, V]`` tensor of the compute dtype (float32; float64 for float64)
    with float32 accumulation: 16-bit inputs give exact float32 products and one float32 result
    per logit. On CUDA through ``torch.mm(..., out_dtype=float32)`` where torch has it (not run on
    a GPU here); elsewhere the weight is upcast in vocabulary slices of at most ``UPCAST_BUDGET_BYTES``."""
    dtype = compute_dtype(x.dtype)
    if x.dtype == dtype and w.dtype == dtype:
        return torch.nn.functional.linear(x, w, b)
    if x.is_cuda and x.dtype == w.dtype and _MM_OUT_DTYPE:
        out = torch.mm(x, w.t(), out_dtype=dtype)
        return out if b is None else out.add_(b.to(dtype))
    out = torch.empty(x.shape[0], w.shape[0], dtype=dtype, device=x.device)
    x_up = x.to(dtype)
    step = max(1, UPCAST_BUDGET_BYTES // max(1, w.shape[1] * dtype.itemsize))
    for v0 in range(0, w.shape[0], step):
        cols = slice(v0, v0 + step)
        bias = None if b is None else b[cols].to(dtype)
        out[:, cols] = torch.nn.functional.linear(x_up, w[cols].to(dtype), bias)
    return out


def lm_head_rows(
    h: Tensor, w: Tensor, b: Optional[Tensor], row_loss: RowLoss, labels: Optional[Tensor], ignore_index: int,
    row_weights: Optional[Tensor], chunk: int, needs: Sequence[bool], transform: LogitTransform = LogitTransform(),
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Row losses ``[N]`` (compute dtype, 0 for ignored rows) of the logits
    ``transform(h @ w.T + b)``, and the gradients of ``sum_r row_weights[r] * row[r]`` (weights 1
    if None) to ``h``, ``w``, ``b`` where ``needs`` says so (else None), in the compute dtype."""
    dtype = compute_dtype(h.dtype)
    rows = torch.zeros(h.shape[0], dtype=dtype, device=h.device)
    gh = torch.zeros(h.shape, dtype=dtype, device=h.device) if needs[0] else None
    gw = torch.zeros(w.shape, dtype=dtype, device=w.device) if needs[1] else None
    gb = torch.zeros(w.shape[0], dtype=dtype, device=w.device) if needs[2] and b is not None else None
    want_grad = any(needs)
    order = None if labels is None else (labels != ignore_index).nonzero().squeeze(1)
    count = h.shape[0] if order is None else order.numel()
    for start in range(0, count, chunk):
        idx = slice(start, min(start + chunk, count)) if order is None else order[start:start + chunk]
        hc = h[idx]
        logits = transform.apply_(chunk_logits(hc, w, b))
        r, g = row_loss(idx, logits, want_grad)
        rows[idx] = r
        if not want_grad:
            continue
        g = transform.chain_(g.to(dtype), logits)
        if row_weights is not None:
            g.mul_(row_weights[idx].to(dtype).unsqueeze(1))
        if gh is not None:
            gh[idx] = (g.to(w.dtype) @ w).to(dtype)
        if gw is not None:
            gw.addmm_(g.t(), hc.to(dtype))
        if gb is not None:
            gb.add_(g.sum(0))
    return rows, gh, gw, gb
