"""The sparse (top-k teacher) KD kernel: one program per row (the math of ``csrc/common/sparse_kd.h``).

Per row, with ``ls = log_softmax(s / T)``, the teacher's top-k log-probabilities ``lt_k`` at the
indices ``idx_k`` and the divergence terms ``(d, q)`` of :mod:`kdops.backends.triton.divergence`:

1. online maximum and sums over the vocabulary: ``lse_s = logsumexp(s / T)`` and, with a hard
   term, ``lse_1 = logsumexp(s)``;
2. over the top-k: ``P_s = sum exp(ls[idx_k])``, ``P_t = sum exp(lt_k)``; then the bucket terms
   of the top-k entries (teacher ``lt_k - log P_t`` for ``rest_mass="ignore"``) and of the rest
   (``log(1 - P_s)`` against ``log(1 - P_t)``, or ``-inf`` for "ignore"): ``D = sum d``,
   ``S = sum q``;
3. the gradient ``soft_weight / T * p_i * (q_rest / r_s - S)`` over the vocabulary, then (after
   a barrier) ``soft_weight / T * (q_k - p_k * S)`` at the top-k entries; plus the hard term
   ``hard_weight * (softmax(s) - onehot(label))``; each element times the student transform's
   slope ``ds/dz`` and divided by the gradient divisor (when given) before its one rounding.

``s`` are the student's transformed logits (:mod:`kdops.backends.triton.logit_transform`:
``z' = scale * z`` or ``c * tanh(scale * z / c)`` of the logits read; the identity compiles to
nothing); the gradient is to the raw logits. The divergence ``DIV`` is a constexpr; labels, the
hard term, the rest bucket and gradients are runtime flags (uniform branches: no compiled variant).
"""
from typing import TYPE_CHECKING, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdops import _alloc
from kdops.backends.triton._common import (
    acc_dtype,
    block,
    launch,
    mixture_logs,
    or_absent,
    row_block,
    row_warps,
    write_ignored_row,
)
from kdops.backends.triton.divergence import divergence_term
from kdops.backends.triton.logit_transform import load_transformed, transform_args, transform_slope
from kdops.backends.triton.row_loss import (
    hard_label_grad,
    hard_label_log_z,
    hard_label_loss,
    row_label,
    row_scalars,
    student_lse_step,
)

if TYPE_CHECKING:
    from kdops.ops._common import DistillOptions

# Largest vocabulary / top-k block: the GPU's, or a small one that keeps the interpreter fast.
_MAX_BLOCK = block(4096, 64)


@triton.jit
def _topk_block(s_row, idx_row, ks, K, V, m_s, log_z_s, inv_t, s_scale, s_cap, S_KIND: tl.constexpr,
                ACC: tl.constexpr):
    """The top-k entries ``ks`` of a row: (kmask = ks < K, ok = the index lies in [0, V), the
    indices, the transformed student logits s there and ls = (s - m_s) / T - log z_s; s = 0
    where not kmask & ok)."""
    kmask = ks < K
    idx = tl.load(idx_row + ks, mask=kmask, other=0)
    ok = (idx >= 0) & (idx < V)
    s = load_transformed(s_row + idx, kmask & ok, 0.0, s_scale, s_cap, S_KIND, ACC)
    return kmask, ok, idx, s, (s - m_s) * inv_t - log_z_s


@triton.jit
def _sparse_kd_row_kernel(
    student_ptr, lt_ptr, idx_ptr, labels_ptr, loss_ptr, grad_ptr, grad_divisor_ptr,
    V, K, student_stride, grad_stride,
    inv_temperature: "tl.float64", beta: "tl.float64", log_beta: "tl.float64",
    log_1m_beta: "tl.float64", hard_weight: "tl.float64", soft_weight: "tl.float64",
    ignore_index, student_scale: "tl.float64", student_softcap: "tl.float64",
    has_labels, has_hard, rest_bucket, compute_grad,
    DIV: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, S_KIND: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * student_stride
    lt_row = lt_ptr + row * K
    idx_row = idx_ptr + row * K
    g_row = grad_ptr + row * grad_stride
    offs_v = tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)
    inv_t, b, log_b, log_1mb, hard_w, soft_w, s_scale, s_cap = row_scalars(
        inv_temperature, beta, log_beta, log_1m_beta, hard_weight, soft_weight, student_scale, student_softcap, ACC)

    label, ignored = row_label(labels_ptr, row, ignore_index, has_labels)
    if ignored:
        write_ignored_row(g_row, loss_ptr, grad_ptr, row, V, BLOCK_V, compute_grad)
    else:
        # Pass 1: m_s = max s; z_s, z_1 = sums of exp((s - m_s) / T), exp(s - m_s).
        m_s = tl.full([], float("-inf"), ACC)
        z_s = tl.zeros([], ACC)
        z_1 = tl.zeros([], ACC)
        for start in range(0, V, BLOCK_V):
            cols = start + offs_v
            s = load_transformed(s_row + cols, cols < V, float("-inf"), s_scale, s_cap, S_KIND, ACC)
            m_s, z_s, z_1 = student_lse_step(s, m_s, z_s, z_1, inv_t, has_hard)
        log_z_s = tl.log(z_s)
        label_ok, log_z_1 = hard_label_log_z(z_1, label, V)  # used with has_hard

        # Pass 2: top-k masses (an index outside [0, V) makes the row's loss and gradient NaN:
        # ``outside``, the count of such indices; a NaN mass would not do, tl.maximum drops NaN),
        # then the terms.
        ps_top = tl.zeros([], ACC)
        pt_top = tl.zeros([], ACC)
        outside = tl.zeros([], tl.int32)
        for start in range(0, K, BLOCK_K):
            ks = start + offs_k
            kmask, ok, _, _, ls = _topk_block(s_row, idx_row, ks, K, V, m_s, log_z_s, inv_t, s_scale, s_cap, S_KIND,
                                              ACC)
            outside += tl.sum((kmask & ~ok).to(tl.int32), axis=0)
            ps_top += tl.sum(tl.where(kmask & ok, tl.exp(ls), 0.0), axis=0)
            pt_top += tl.sum(tl.where(kmask, tl.exp(tl.load(lt_row + ks, mask=kmask, other=0.0)), 0.0), axis=0)
        shift = tl.zeros([], ACC)
        if not rest_bucket:
            shift = tl.log(pt_top)
        d_sum = tl.zeros([], ACC)
        q_sum = tl.zeros([], ACC)
        for start in range(0, K, BLOCK_K):
            ks = start + offs_k
            kmask, _, _, _, ls = _topk_block(s_row, idx_row, ks, K, V, m_s, log_z_s, inv_t, s_scale, s_cap, S_KIND,
                                             ACC)
            lt = tl.load(lt_row + ks, mask=kmask, other=0.0) - shift
            d, q = divergence_term(ls, lt, b, log_b, log_1mb, DIV)
            d_sum += tl.sum(tl.where(kmask, d, 0.0), axis=0)
            q_sum += tl.sum(tl.where(kmask, q, 0.0), axis=0)
        ratio = tl.zeros([], ACC)
        if K < V:  # the rest bucket
            rs = tl.maximum(1.0 - ps_top, 0.0)
            lt_rest = tl.full([], float("-inf"), ACC)
            if rest_bucket:
                rt = 1.0 - pt_top
                lt_rest = tl.where(rt > 0.0, tl.log(tl.where(rt > 0.0, rt, 1.0)), float("-inf"))
            d, q = divergence_term(tl.log(rs), lt_rest, b, log_b, log_1mb, DIV)
            d_sum += d
            q_sum += q
            ratio = tl.where(rs > 0.0, q / tl.where(rs > 0.0, rs, 1.0), 0.0)
        d_sum = tl.where(outside > 0, float("nan"), d_sum)
        q_sum = tl.where(outside > 0, float("nan"), q_sum)  # every gradient element: NaN

        loss = soft_w * d_sum
        if has_hard:
            loss += hard_label_loss(s_row, label, label_ok, m_s, log_z_1, hard_w, s_scale, s_cap, S_KIND, ACC)
        tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))

        # Pass 3: p_i * coefficient over the vocabulary, then the top-k entries.
        if compute_grad:
            if grad_divisor_ptr is not None:
                inv_div = 1.0 / tl.load(grad_divisor_ptr).to(ACC)
            else:
                inv_div = tl.full([], 1.0, ACC)
            rest_coef = soft_w * inv_t * (ratio - q_sum)
            for start in range(0, V, BLOCK_V):
                cols = start + offs_v
                mask = cols < V
                s = load_transformed(s_row + cols, mask, 0.0, s_scale, s_cap, S_KIND, ACC)
                g = tl.exp((s - m_s) * inv_t - log_z_s) * rest_coef
                if has_hard:
                    g += hard_label_grad(s, cols, label, m_s, log_z_1, hard_w)
                g *= transform_slope(s, s_scale, s_cap, S_KIND) * inv_div
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
            tl.debug_barrier()
            for start in range(0, K, BLOCK_K):
                ks = start + offs_k
                in_k, ok, idx, s, ls = _topk_block(s_row, idx_row, ks, K, V, m_s, log_z_s, inv_t, s_scale, s_cap,
                                                   S_KIND, ACC)
                kmask = in_k & ok
                lt = tl.load(lt_row + ks, mask=kmask, other=0.0) - shift
                _, q = divergence_term(ls, lt, b, log_b, log_1mb, DIV)
                g = soft_w * inv_t * (q - tl.exp(ls) * q_sum)
                if has_hard:
                    g += hard_label_grad(s, idx, label, m_s, log_z_1, hard_w)
                g *= transform_slope(s, s_scale, s_cap, S_KIND) * inv_div
                tl.store(g_row + idx, g.to(grad_ptr.dtype.element_ty), mask=kmask)


def sparse_kd_forward(
    student: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    labels: Optional[Tensor],
    options: "DistillOptions",
    compute_grad: bool,
    grad_divisor: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Row losses ``[N]`` and, if ``compute_grad``, the contiguous gradients ``[N, V]`` w.r.t.
    ``student`` in its dtype (divided by the 0-dim ``grad_divisor`` when given; else an empty
    tensor), with the options' student logit transform applied to the logits read. Inputs as for
    :func:`kdops.backends.native.sparse_kd.sparse_kd_forward` (checked by :mod:`kdops.ops.sparse_kd`)."""
    acc = acc_dtype(student.dtype)
    n_rows, vocab = student.shape
    k = topk_indices.shape[1]
    loss_dtype = _alloc.compute_dtype(student.dtype)
    loss = _alloc.empty(n_rows, dtype=loss_dtype, device=student.device)
    grad = (_alloc.empty(n_rows, vocab, dtype=student.dtype, device=student.device) if compute_grad
            else student.new_empty(0))
    if n_rows == 0:
        return loss, grad
    block_v = row_block(vocab, _MAX_BLOCK)
    block_k = row_block(k, _MAX_BLOCK)
    s_scale, s_softcap, s_kind = transform_args(options.student_logit_scale, options.student_softcap)
    launch(
        _sparse_kd_row_kernel, (n_rows,), student.device,
        student, topk_logprobs, topk_indices, or_absent(labels, torch.int64, student.device), loss, grad,
        grad_divisor,
        vocab, k, student.stride(0), vocab,
        1.0 / options.temperature, options.beta, *mixture_logs(options.divergence, options.beta),
        options.hard_weight, options.soft_weight, options.ignore_index, s_scale, s_softcap,
        labels is not None, labels is not None and options.hard_weight > 0,
        bool(options.rest_bucket), compute_grad, DIV=options.divergence, ACC=acc,
        BLOCK_V=block_v, BLOCK_K=block_k, S_KIND=s_kind, num_warps=row_warps(block_v),
    )
    return loss, grad
