"""The fused temperature-softmax KD kernel: one program per row, three passes over the vocabulary.

Per row, with ``s``, ``t`` the student / teacher logits, ``T`` the temperature and ``D`` the
divergence of :mod:`kdops.divergences` (math in :mod:`kdops.backends.triton.divergence`)::

    loss = soft_weight * D(softmax(t / T), softmax(s / T)) + hard_weight * (logsumexp(s) - s[label])
    grad = (soft_weight / T * (q - p_s * S) + hard_weight * (softmax(s) - onehot(label))) * ds/dz / divisor

where ``s``, ``t`` are the models' transformed logits ``z' = scale * z`` or
``c * tanh(scale * z / c)`` (:mod:`kdops.backends.triton.logit_transform`; constexpr kinds, the
identity compiles to nothing), ``ds/dz`` the student transform's slope, and ``divisor`` the
reduction's (``1 / count`` for a mean, ``normalizer``) read from a 0-dim device tensor, folded in
before the gradient's one rounding to the student's dtype.

1. online maxima and sums: ``lse_s = logsumexp(s / T)``, ``lse_t = logsumexp(t / T)`` and,
   with a hard term, ``lse_1 = logsumexp(s)``; with ``K > 1`` teachers (``MULTI``) ``lse_t`` is a
   ``[BLOCK_K]`` vector (the row's teachers load as ``[BLOCK_V, BLOCK_K]`` tiles) and the teacher
   log-probability of an element is the mixture's, ``logsumexp_k(log w_k + t_k / T - lse_k)``;
2. ``D = sum d`` and ``S = sum q`` of ``divergence_term(s/T - lse_s, t/T - lse_t)``; skipped for
   forward KL, whose ``S = -1``;
3. forward KL's ``D``, and the gradient row.

The divergence ``DIV`` is a constexpr (one kernel per code: each compiles to its own terms);
labels, the hard term and gradients are runtime flags (branches uniform over the program, so
that they add no compiled variant). The teacher stride ``N * V`` is annotated int64: Triton binds
an unannotated int as i32 below 2^31 and i64 above, two compiles of one kernel.

DeiT's hard target (``DIV == HARD``): ``D = -ls[target]``, ``q = -onehot(target)``, ``S = -1``,
with ``target`` the first index of the teacher's maximum, kept in pass 1 beside the student's
sums (one teacher: the transformed logits' running (max, first argmax) replace the teacher's
sums); with ``MULTI`` pass 2 takes the argmax of the mixture's ``lt``. Pass 3 reads only the
student. A NaN teacher logit makes the row's loss and gradient NaN.
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
    exp_sum,
    launch,
    mixture_logs,
    or_absent,
    row_block,
    row_warps,
    write_ignored_row,
)
from kdops.backends.triton.divergence import FORWARD_KL, HARD, divergence_term
from kdops.backends.triton.logit_transform import (
    TRANSFORM_NONE,
    TRANSFORM_SOFTCAP,
    load_transformed,
    transform_args,
    transform_slope,
)
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

# Largest vocabulary block: the GPU's, or a small one that keeps the interpreter's numpy fast.
_MAX_BLOCK_V = block(4096, 64)


@triton.jit
def _teacher_tile(t_row, cols, mask, teachers, teacher_k_stride, n_teachers, other, t_scale, t_cap,
                  T_KIND: tl.constexpr, ACC: tl.constexpr, MULTI: tl.constexpr):
    """The transformed teacher logits at ``cols`` in ACC: ``[BLOCK_V]``, or with MULTI
    ``[BLOCK_V, BLOCK_K]`` (teacher ``k`` in column k; columns past K and lanes past V read ``other``)."""
    if MULTI:  # int64: (K - 1) * N * V passes 2^31 (K = 3, N = 8192, V = 151936)
        ptrs = t_row + cols[:, None] + teachers.to(tl.int64)[None, :] * teacher_k_stride
        return load_transformed(ptrs, mask[:, None] & (teachers < n_teachers)[None, :], other, t_scale, t_cap,
                            T_KIND, ACC)
    else:
        return load_transformed(t_row + cols, mask, other, t_scale, t_cap, T_KIND, ACC)


@triton.jit
def _teacher_log_probs(t, m_t, off_t, inv_t, teachers, n_teachers, MULTI: tl.constexpr):
    """lt = (t - m_t)/T + off_t of a teacher tile (off_t = -log z_t; the form without cancellation
    for large logits); with MULTI, the mixture's lt = logsumexp_k((t_k - m_k)/T + off_k) with
    off_k = log w_k - log z_k (-inf where every term is)."""
    if MULTI:
        a = tl.where((teachers < n_teachers)[None, :], (t - m_t[None, :]) * inv_t + off_t[None, :], float("-inf"))
        hi = tl.max(a, axis=1)
        ref = tl.where(hi == float("-inf"), 0.0, hi)
        return ref + tl.log(tl.sum(tl.exp(a - ref[:, None]), axis=1))
    else:
        return (t - m_t) * inv_t + off_t


@triton.jit
def _log_probs(s_row, t_row, cols, mask, m_s, m_t, log_z_s, off_t, inv_t, teachers, teacher_k_stride,
               n_teachers, s_scale, s_cap, t_scale, t_cap, S_KIND: tl.constexpr, T_KIND: tl.constexpr,
               ACC: tl.constexpr, MULTI: tl.constexpr):
    """Transformed student logits s, the log-probabilities ls = s/T - lse_s = (s - m_s)/T - log z_s
    and the teacher's lt (:func:`_teacher_log_probs`). Lanes past V read 0: finite terms that the
    caller masks out."""
    s = load_transformed(s_row + cols, mask, 0.0, s_scale, s_cap, S_KIND, ACC)
    t = _teacher_tile(t_row, cols, mask, teachers, teacher_k_stride, n_teachers, 0.0, t_scale, t_cap, T_KIND, ACC,
                      MULTI)
    return s, (s - m_s) * inv_t - log_z_s, _teacher_log_probs(t, m_t, off_t, inv_t, teachers, n_teachers, MULTI)


@triton.jit
def _argmax_step(x, cols, V, best, target):
    """The running (max, first index of the max) of a row after the block ``x`` at ``cols``
    (lanes past V and NaNs must read -inf): a later block wins only if its max is greater, so
    ties go to the lowest index; an all -inf row keeps index 0."""
    block_max = tl.max(x, axis=0)
    first = tl.min(tl.where(x == block_max, cols, V), axis=0)
    return tl.maximum(best, block_max), tl.where(block_max > best, first, target)


@triton.jit
def _kd_row_kernel(
    student_ptr, teacher_ptr, labels_ptr, loss_ptr, grad_ptr,
    V, student_stride, teacher_stride, grad_stride, teacher_k_stride: "tl.int64", n_teachers, log_weights_ptr,
    inv_temperature: "tl.float64", beta: "tl.float64", log_beta: "tl.float64",
    log_1m_beta: "tl.float64", hard_weight: "tl.float64", soft_weight: "tl.float64",
    ignore_index, student_scale: "tl.float64", student_softcap: "tl.float64", teacher_scale: "tl.float64",
    teacher_softcap: "tl.float64", grad_divisor_ptr, has_labels, has_hard, compute_grad,
    DIV: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
    MULTI: tl.constexpr, BLOCK_K: tl.constexpr, S_KIND: tl.constexpr, T_KIND: tl.constexpr,
    HAS_DIVISOR: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * student_stride
    t_row = teacher_ptr + row * teacher_stride
    g_row = grad_ptr + row * grad_stride
    offs = tl.arange(0, BLOCK_V)
    teachers = tl.arange(0, BLOCK_K)  # with MULTI; BLOCK_K = 1 otherwise
    inv_t, b, log_b, log_1mb, hard_w, soft_w, s_scale, s_cap = row_scalars(
        inv_temperature, beta, log_beta, log_1m_beta, hard_weight, soft_weight, student_scale, student_softcap, ACC)
    t_scale = tl.full([], teacher_scale, ACC)
    t_cap = tl.full([], teacher_softcap, ACC)

    label, ignored = row_label(labels_ptr, row, ignore_index, has_labels)
    if ignored:
        write_ignored_row(g_row, loss_ptr, grad_ptr, row, V, BLOCK_V, compute_grad)
    else:
        # Pass 1: running maxima m_s, m_t of s and t; z_s, z_t, z_1 = sums of exp((s - m_s) / T),
        # exp((t - m_t) / T), exp(s - m_s). With MULTI, m_t and z_t are [BLOCK_K] (one per teacher).
        m_s = tl.full([], float("-inf"), ACC)
        z_s = tl.zeros([], ACC)
        if MULTI:
            m_t = tl.full([BLOCK_K], float("-inf"), ACC)
            z_t = tl.zeros([BLOCK_K], ACC)
        else:
            m_t = tl.full([], float("-inf"), ACC)
            z_t = tl.zeros([], ACC)
        z_1 = tl.zeros([], ACC)
        # HARD: target = the first index of the teacher's max (one teacher: m_t is that max);
        # n_nan counts NaN teacher logits (they make the row NaN, they are not compared).
        target = tl.zeros([], tl.int32)
        n_nan = tl.zeros([], tl.int32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            s = load_transformed(s_row + cols, mask, float("-inf"), s_scale, s_cap, S_KIND, ACC)
            t = _teacher_tile(t_row, cols, mask, teachers, teacher_k_stride, n_teachers, float("-inf"), t_scale,
                              t_cap, T_KIND, ACC, MULTI)
            m_s, z_s, z_1 = student_lse_step(s, m_s, z_s, z_1, inv_t, has_hard)
            if DIV == HARD:
                n_nan += tl.sum((t != t).to(tl.int32))
            if DIV == HARD and not MULTI:
                new_m_t, target = _argmax_step(tl.where(t == t, t, float("-inf")), cols, V, m_t, target)
            else:
                new_m_t = tl.maximum(m_t, tl.max(t, axis=0))
                z_t = exp_sum(z_t, m_t, new_m_t, t, inv_t)
            m_t = new_m_t
        label_ok, log_z_1 = hard_label_log_z(z_1, label, V)  # used with has_hard
        log_z_s = tl.log(z_s)
        if MULTI:  # teachers past K (sums 0) get off_t = 0: masked out in _log_probs
            in_k = teachers < n_teachers
            off_t = tl.load(log_weights_ptr + teachers, mask=in_k, other=0.0).to(ACC) - tl.log(tl.where(in_k, z_t, 1.0))
        elif DIV == HARD:  # unused: one teacher's argmax needs no softmax
            off_t = tl.zeros([], ACC)
        else:
            off_t = -tl.log(z_t)

        # Pass 2: D = sum d and S = sum q (forward KL: S = -sum p_t = -1, D summed in pass 3;
        # HARD: S = -1, and with MULTI the mixture's argmax).
        d_sum = tl.zeros([], ACC)
        if DIV == HARD:
            q_sum = tl.full([], -1.0, ACC)
            if MULTI:
                best = tl.full([], float("-inf"), ACC)
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    mask = cols < V
                    t = _teacher_tile(t_row, cols, mask, teachers, teacher_k_stride, n_teachers, 0.0, t_scale,
                                      t_cap, T_KIND, ACC, MULTI)
                    lt = _teacher_log_probs(t, m_t, off_t, inv_t, teachers, n_teachers, MULTI)
                    best, target = _argmax_step(tl.where(mask & (lt == lt), lt, float("-inf")), cols, V, best,
                                                target)
        elif DIV == FORWARD_KL:
            q_sum = tl.full([], -1.0, ACC)
        else:
            q_sum = tl.zeros([], ACC)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                _, ls, lt = _log_probs(s_row, t_row, cols, mask, m_s, m_t, log_z_s, off_t, inv_t, teachers,
                                        teacher_k_stride, n_teachers, s_scale, s_cap, t_scale, t_cap, S_KIND,
                                        T_KIND, ACC, MULTI)
                d, q = divergence_term(ls, lt, b, log_b, log_1mb, DIV)
                d_sum += tl.sum(tl.where(mask, d, 0.0), axis=0)
                q_sum += tl.sum(tl.where(mask, q, 0.0), axis=0)

        # Pass 3: forward KL's D; the gradient soft_w / T * (q - p_s * S) + hard_w * (p_1 - onehot),
        # times the student transform's slope, divided by the reduction's divisor.
        if HAS_DIVISOR:
            inv_divisor = 1.0 / tl.load(grad_divisor_ptr).to(ACC)
        if compute_grad | (DIV == FORWARD_KL):
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                if DIV == HARD:  # q = -onehot(target): the student's row only
                    s = load_transformed(s_row + cols, mask, 0.0, s_scale, s_cap, S_KIND, ACC)
                    ls = (s - m_s) * inv_t - log_z_s
                    q = tl.where(cols == target, -1.0, 0.0)
                else:
                    s, ls, lt = _log_probs(s_row, t_row, cols, mask, m_s, m_t, log_z_s, off_t, inv_t, teachers,
                                            teacher_k_stride, n_teachers, s_scale, s_cap, t_scale, t_cap, S_KIND,
                                            T_KIND, ACC, MULTI)
                    d, q = divergence_term(ls, lt, b, log_b, log_1mb, DIV)
                    if DIV == FORWARD_KL:
                        d_sum += tl.sum(tl.where(mask, d, 0.0), axis=0)
                if compute_grad:
                    g = soft_w * inv_t * (q - tl.exp(ls) * q_sum)
                    if has_hard:
                        g += hard_label_grad(s, cols, label, m_s, log_z_1, hard_w)
                    if S_KIND != TRANSFORM_NONE:
                        g *= transform_slope(s, s_scale, s_cap, S_KIND)
                    if HAS_DIVISOR:
                        g *= inv_divisor
                    if DIV == HARD:
                        g = tl.where(n_nan > 0, float("nan"), g)
                    tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)

        if DIV == HARD:  # D = -ls[target]; NaN with a NaN teacher logit
            s_target = load_transformed(s_row + target, target < V, 0.0, s_scale, s_cap, S_KIND, ACC)
            d_sum = tl.where(n_nan > 0, float("nan"), log_z_s - (s_target - m_s) * inv_t)
        loss = soft_w * d_sum
        if has_hard:
            loss += hard_label_loss(s_row, label, label_ok, m_s, log_z_1, hard_w, s_scale, s_cap, S_KIND, ACC)
        tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))


def kd_forward(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    options: "DistillOptions",
    compute_grad: bool,
    teacher_log_weights: Optional[Tensor] = None,
    grad_divisor: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Row losses ``[N]`` (float32; float64 for float64 logits) of ``[N, V]`` logits with unit
    element stride (transformed by ``options``' logit transforms) and, if ``compute_grad``, their
    contiguous gradients ``[N, V]`` with respect to ``student`` in its dtype, divided by the 0-dim
    ``grad_divisor`` (loss dtype) when given (else an empty tensor). Rows whose label is ``ignore_index`` get loss
    0 and a zero gradient. ``teacher`` ``[N, V]``, or ``[K, N, V]`` mixed with the log weights
    ``teacher_log_weights`` ``(K,)``. The caller has checked the arguments (see :mod:`kdops.ops.kd`)."""
    acc = acc_dtype(student.dtype)
    n_rows, vocab = student.shape
    loss_dtype = _alloc.compute_dtype(student.dtype)
    loss = _alloc.empty(n_rows, dtype=loss_dtype, device=student.device)
    grad = (
        _alloc.empty(n_rows, vocab, dtype=student.dtype, device=student.device)
        if compute_grad else student.new_empty(0)
    )
    if n_rows == 0:
        return loss, grad
    multi = teacher.dim() == 3
    n_teachers = teacher.shape[0] if multi else 1
    block_k = triton.next_power_of_2(n_teachers)
    s_scale, s_cap, s_kind = transform_args(options.student_logit_scale, options.student_softcap)
    t_scale, t_cap, t_kind = transform_args(options.teacher_logit_scale, options.teacher_softcap)
    # A [BLOCK_V, BLOCK_K] teacher tile holds about as many elements as one row block; float64
    # rows take half the lanes (4096 float64 lanes on 8 warps spilled ~400 B per thread), and a
    # softcapped float64 mixture twice the warps (its tanh spilled ~300 B at 512 lanes x 4
    # teachers on 2 warps). Warps by the tile's elements, BLOCK_V * BLOCK_K: by BLOCK_V alone,
    # 16 float64 teachers took 1 warp for a [128, 16] tile and spilled 632 B on sm_80 (8: 48 B).
    block_v = row_block(vocab, _MAX_BLOCK_V // block_k // (2 if acc == tl.float64 else 1))
    softcapped_mixture = multi and acc == tl.float64 and TRANSFORM_SOFTCAP.value in (s_kind, t_kind)
    num_warps = row_warps(block_v * block_k * (2 if softcapped_mixture else 1))
    launch(
        _kd_row_kernel, (n_rows,), student.device,
        student, teacher, or_absent(labels, torch.int64, student.device), loss, grad,
        vocab, student.stride(0), teacher.stride(-2), vocab, teacher.stride(0) if multi else 0,
        n_teachers, teacher_log_weights if multi else None,
        1.0 / options.temperature, options.beta, *mixture_logs(options.divergence, options.beta),
        options.hard_weight, options.soft_weight, options.ignore_index, s_scale, s_cap, t_scale, t_cap,
        grad_divisor, labels is not None, labels is not None and options.hard_weight > 0,
        compute_grad, DIV=options.divergence,
        ACC=acc, BLOCK_V=block_v, MULTI=multi, BLOCK_K=block_k, S_KIND=s_kind, T_KIND=t_kind,
        HAS_DIVISOR=grad_divisor is not None, num_warps=num_warps,
    )
    return loss, grad
