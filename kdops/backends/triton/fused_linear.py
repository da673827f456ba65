"""Blockwise fused linear + distillation in Triton: the ``[N, V]`` logits never leave on-chip memory.

A program takes ``BM`` counted rows and one segment of the vocabulary; for each vocabulary block
of ``BV`` columns it forms the logit tiles with ``tl.dot`` over ``BK``-blocks of the hidden sizes::

    s = f_s(h_s[rows] @ W_s[cols].T + b_s[cols])        t = f_t(h_t[rows] @ W_t[cols].T + b_t[cols])

(float32 accumulation, whatever the input dtype; ``f_s``, ``f_t`` the models' logit transforms
of :mod:`kdops.backends.triton.logit_transform`, the identity unless a scale or softcap is
given) and uses them at once. The three passes of
``csrc/common/divergence.h`` are three launches of one kernel (``PASS``), each recomputing the
tiles; only ``O(N)`` per-row values are kept between them:

1. online maxima and sums of ``exp((s - m_s) / T)``, ``exp((t - m_t) / T)`` and, with a hard
   term, ``exp(s - m_s)`` and ``s[label]``: ``lse_s``, ``lse_t``, ``lse_1`` per row;
2. ``D = sum d`` and ``S = sum q`` of ``divergence_term(ls, lt)`` (skipped for forward KL with
   gradients: ``S = -1`` and ``D`` is summed in pass 3);
3. the gradient tile ``G = w_r * (soft_weight / T * (q - p_s * S) + hard_weight * (softmax(s) -
   onehot(label))) * df_s/dz`` (``w_r`` the row weight; the transform's slope: the exact chain
   rule in float32), and with it ``grad_h[rows] += G @ W_s[cols]``,
   ``grad_W[cols] += G.T @ h_s[rows]``, ``grad_b[cols] += G.sum(0)``.

Parallelism: the grid is (row blocks, vocabulary segments); a pass's per-segment partial
results (maxima and sums, ``D``, ``S``) are merged by a few ``[segments, N]`` torch operations.
Gradients are accumulated with float32 atomic adds: ``grad_h`` across vocabulary blocks and
segments, ``grad_W`` / ``grad_b`` across row blocks (so they are not bitwise deterministic).
Ignored rows (label ``ignore_index``) are never visited: the kernel reads the counted rows
through an index. Whether the row index, hard labels, biases, row weights and each gradient are
there are runtime flags (branches uniform over a program; an absent tensor is an empty one): one
compiled kernel per pass, divergence and dtype serves them all.
"""
import math
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdops import _alloc
from kdops.backends.triton._common import UPCAST_DOT, block, launch, mixture_logs, or_absent
from kdops.backends.triton.divergence import FORWARD_KL, divergence_term
from kdops.backends.triton.logit_transform import transform, transform_args, transform_slope
from kdops.divergences import divergence_code

if TYPE_CHECKING:
    from kdops.ops._common import DistillOptions

_FORWARD_KL = divergence_code("forward_kl")


@triton.jit
def _logit_tile(x_ptr, sx0, sx1, w_ptr, sw0, sw1, b_ptr, has_bias, rows, row_mask, cols, col_mask, K,
                PRECISION: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """The float32 tile ``x[rows] @ w[cols].T (+ b[cols] with ``has_bias``)`` ([BM, BV]); masked lanes
    read 0."""
    acc = tl.zeros([BM, BV], tl.float32)
    for k in range(0, K, BK):
        ks = (k + tl.arange(0, BK)).to(tl.int64)  # int64: k * stride passes 2^31 for column-major x or w
        x = tl.load(x_ptr + rows[:, None] * sx0 + ks[None, :] * sx1,
                    mask=row_mask[:, None] & (ks < K)[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * sw0 + ks[None, :] * sw1,
                    mask=col_mask[:, None] & (ks < K)[None, :], other=0.0)
        if UPCAST_DOT:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if has_bias:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _online_sum(z, m_old, m_new, x, scale):
    """Per row: z * exp((m_old - m_new) * scale) + sum_j exp((x_j - m_new) * scale). A running
    maximum m_new = -inf (the row all -inf so far) is read as 0, so that no NaN is made."""
    m = tl.where(m_new == float("-inf"), 0.0, m_new)
    return z * tl.exp((m_old - m) * scale) + tl.sum(tl.exp((x - m[:, None]) * scale), axis=1)


@triton.jit
def _store_part(part_ptr, i, seg, n_seg, M, offs, mask, x):
    """Partial result ``i`` of segment ``seg``: ``part[i, seg, offs] = x`` (part: [*, n_seg, M])."""
    tl.store(part_ptr + (i * n_seg + seg).to(tl.int64) * M + offs, x, mask=mask)


@triton.jit
def _add_grads(g, h_ptr, sh0, sh1, w_ptr, sw0, sw1, grad_h_ptr, grad_w_ptr, grad_b_ptr, wants_h, wants_w, wants_b,
               rows, row_mask, cols, col_mask, Hs, PRECISION: tl.constexpr, BK: tl.constexpr):
    """``grad_h[rows] += g @ w[cols]``, ``grad_w[cols] += g.T @ h[rows]`` (both [*, Hs], float32,
    contiguous) and ``grad_b[cols] += g.sum(0)`` by atomic adds, each under its runtime flag
    ``wants_h``, ``wants_w``, ``wants_b``.
    ``g`` is rounded to the dtype of ``h`` for the dots (float32 accumulation)."""
    gd = g.to(h_ptr.dtype.element_ty)
    if UPCAST_DOT:
        gd = gd.to(tl.float32)
    if wants_h:
        for k in range(0, Hs, BK):
            ks = (k + tl.arange(0, BK)).to(tl.int64)
            w = tl.load(w_ptr + cols[:, None] * sw0 + ks[None, :] * sw1,
                        mask=col_mask[:, None] & (ks < Hs)[None, :], other=0.0)
            if UPCAST_DOT:
                w = w.to(tl.float32)
            tl.atomic_add(grad_h_ptr + rows[:, None] * Hs + ks[None, :],
                          tl.dot(gd, w, input_precision=PRECISION),
                          mask=row_mask[:, None] & (ks < Hs)[None, :], sem="relaxed")
    if wants_w:
        gd_t = tl.trans(gd)
        for k in range(0, Hs, BK):
            ks = (k + tl.arange(0, BK)).to(tl.int64)
            h = tl.load(h_ptr + rows[:, None] * sh0 + ks[None, :] * sh1,
                        mask=row_mask[:, None] & (ks < Hs)[None, :], other=0.0)
            if UPCAST_DOT:
                h = h.to(tl.float32)
            tl.atomic_add(grad_w_ptr + cols[:, None] * Hs + ks[None, :],
                          tl.dot(gd_t, h, input_precision=PRECISION),
                          mask=col_mask[:, None] & (ks < Hs)[None, :], sem="relaxed")
    if wants_b:
        tl.atomic_add(grad_b_ptr + cols, tl.sum(g, axis=0), mask=col_mask, sem="relaxed")


@triton.jit
def _fused_linear_kd_kernel(
    h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr,
    row_ids_ptr, labels_ptr, weights_ptr, stats_ptr, part_ptr, grad_h_ptr, grad_w_ptr, grad_b_ptr,
    M, V, Hs, Ht, blocks_per_seg,
    sh0, sh1, sw0, sw1, sth0, sth1, stw0, stw1,
    inv_temperature, beta, log_beta, log_1m_beta, hard_weight, soft_weight,
    s_scale, s_softcap, t_scale, t_softcap, has_labels, has_hard, has_bias, has_t_bias, has_row_weights,
    wants_h, wants_w, wants_b,
    PASS: tl.constexpr, DIV: tl.constexpr, S_TRANSFORM: tl.constexpr, T_TRANSFORM: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
):
    """Pass ``PASS`` (1, 2 or 3; see the module docstring) for rows ``[BM * pid0, + BM)`` of the
    M counted rows (rows ``row_ids[j]`` with ``has_labels``, else ``j``) and vocabulary segment
    ``pid1``; ``has_labels``, ``has_hard`` (labels read), ``has_bias``, ``has_t_bias``,
    ``has_row_weights`` and the gradients wanted (``wants_*``) are runtime flags.
    ``stats``: [6, M] = m_s, log z_s, log z_1, m_t, log z_t, S (from passes 1 and 2);
    ``part``: this pass's per-segment partials [*, segments, M]. ``S_TRANSFORM`` / ``T_TRANSFORM``
    (with ``s_scale``, ``s_softcap``, ``t_scale``, ``t_softcap``): the logit transforms. A hard
    label outside [0, V) (not checked under torch.compile) makes its row's gradient NaN."""
    seg = tl.program_id(1)
    n_seg = tl.num_programs(1)
    offs = tl.program_id(0) * BM + tl.arange(0, BM)
    row_mask = offs < M
    rows = offs.to(tl.int64)
    if has_labels:
        rows = tl.load(row_ids_ptr + offs, mask=row_mask, other=0).to(tl.int64)
    label = tl.full([BM], -1, tl.int64)
    if has_hard:
        label = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    label_ok = (label >= 0) & (label < V)
    inv_t = tl.full([], inv_temperature, tl.float32)
    b = tl.full([], beta, tl.float32)
    log_b = tl.full([], log_beta, tl.float32)
    log_1mb = tl.full([], log_1m_beta, tl.float32)
    hard_w = tl.full([], hard_weight, tl.float32)
    soft_w = tl.full([], soft_weight, tl.float32)

    if PASS == 1:  # running maxima and sums, and s[label]
        m_s = tl.full([BM], float("-inf"), tl.float32)
        m_t = tl.full([BM], float("-inf"), tl.float32)
        z_s = tl.zeros([BM], tl.float32)
        z_t = tl.zeros([BM], tl.float32)
        z_1 = tl.zeros([BM], tl.float32)
        s_label = tl.zeros([BM], tl.float32)
    else:
        m_s = tl.load(stats_ptr + offs, mask=row_mask, other=0.0)
        log_z_s = tl.load(stats_ptr + M + offs, mask=row_mask, other=0.0)
        log_z_1 = tl.load(stats_ptr + 2 * M + offs, mask=row_mask, other=0.0)
        m_t = tl.load(stats_ptr + 3 * M + offs, mask=row_mask, other=0.0)
        log_z_t = tl.load(stats_ptr + 4 * M + offs, mask=row_mask, other=0.0)
        d_sum = tl.zeros([BM], tl.float32)
        q_sum = tl.zeros([BM], tl.float32)
        if PASS == 3:  # S from pass 2; forward KL's S = -sum p_t = -1 (pass 2 skipped)
            if DIV == FORWARD_KL:
                q_sum = tl.full([BM], -1.0, tl.float32)
            else:
                q_sum = tl.load(stats_ptr + 5 * M + offs, mask=row_mask, other=0.0)
            row_w = tl.full([BM], 1.0, tl.float32)
            if has_row_weights:
                row_w = tl.load(weights_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)

    v_start = seg * blocks_per_seg * BV
    v_end = tl.minimum(V, v_start + blocks_per_seg * BV)
    for v0 in range(v_start, v_end, BV):
        cols = (v0 + tl.arange(0, BV)).to(tl.int64)  # int64: V * H may pass 2**31
        col_mask = cols < V
        s = _logit_tile(h_ptr, sh0, sh1, w_ptr, sw0, sw1, b_ptr, has_bias, rows, row_mask, cols, col_mask, Hs,
                        PRECISION, BM, BV, BK)
        s = transform(s, s_scale, s_softcap, S_TRANSFORM)
        t = _logit_tile(th_ptr, sth0, sth1, tw_ptr, stw0, stw1, tb_ptr, has_t_bias, rows, row_mask, cols, col_mask,
                        Ht, PRECISION, BM, BV, BK)
        t = transform(t, t_scale, t_softcap, T_TRANSFORM)
        if PASS == 1:
            s = tl.where(col_mask[None, :], s, float("-inf"))
            t = tl.where(col_mask[None, :], t, float("-inf"))
            new_m_s = tl.maximum(m_s, tl.max(s, axis=1))
            new_m_t = tl.maximum(m_t, tl.max(t, axis=1))
            z_s = _online_sum(z_s, m_s, new_m_s, s, inv_t)
            z_t = _online_sum(z_t, m_t, new_m_t, t, inv_t)
            if has_hard:
                z_1 = _online_sum(z_1, m_s, new_m_s, s, 1.0)
                s_label += tl.sum(tl.where(cols[None, :] == label[:, None], s, 0.0), axis=1)
            m_s = new_m_s
            m_t = new_m_t
        else:
            mask = row_mask[:, None] & col_mask[None, :]
            ls = (s - m_s[:, None]) * inv_t - log_z_s[:, None]
            lt = (t - m_t[:, None]) * inv_t - log_z_t[:, None]
            d, q = divergence_term(ls, lt, b, log_b, log_1mb, DIV)
            if PASS == 2:
                d_sum += tl.sum(tl.where(mask, d, 0.0), axis=1)
                if DIV != FORWARD_KL:
                    q_sum += tl.sum(tl.where(mask, q, 0.0), axis=1)
            else:
                if DIV == FORWARD_KL:
                    d_sum += tl.sum(tl.where(mask, d, 0.0), axis=1)
                g = soft_w * inv_t * (q - tl.exp(ls) * q_sum[:, None])
                if has_hard:
                    p_1 = tl.exp(s - m_s[:, None] - log_z_1[:, None])
                    g += hard_w * (p_1 - tl.where(cols[None, :] == label[:, None], 1.0, 0.0))
                    g = tl.where(label_ok[:, None], g, float("nan"))
                g *= transform_slope(s, s_scale, s_softcap, S_TRANSFORM)
                if has_row_weights:
                    g *= row_w[:, None]
                g = tl.where(mask, g, 0.0)
                _add_grads(g, h_ptr, sh0, sh1, w_ptr, sw0, sw1, grad_h_ptr, grad_w_ptr, grad_b_ptr, wants_h,
                           wants_w, wants_b, rows, row_mask, cols, col_mask, Hs, PRECISION, BK)

    if PASS == 1:
        _store_part(part_ptr, 0, seg, n_seg, M, offs, row_mask, m_s)
        _store_part(part_ptr, 1, seg, n_seg, M, offs, row_mask, z_s)
        _store_part(part_ptr, 2, seg, n_seg, M, offs, row_mask, z_1)
        _store_part(part_ptr, 3, seg, n_seg, M, offs, row_mask, m_t)
        _store_part(part_ptr, 4, seg, n_seg, M, offs, row_mask, z_t)
        _store_part(part_ptr, 5, seg, n_seg, M, offs, row_mask, s_label)
    elif PASS == 2:
        _store_part(part_ptr, 0, seg, n_seg, M, offs, row_mask, d_sum)
        _store_part(part_ptr, 1, seg, n_seg, M, offs, row_mask, q_sum)
    elif DIV == FORWARD_KL:  # pass 3: forward KL's D
        _store_part(part_ptr, 0, seg, n_seg, M, offs, row_mask, d_sum)


class _Blocks(NamedTuple):
    bm: int
    bv: int
    bk: int  # passes 1 and 2
    bk_grad: int  # pass 3
    num_warps: int
    num_stages: int


def _blocks(dtype: torch.dtype) -> _Blocks:
    """Tile sizes and launch options. On GPUs: chosen by compiling (``tools/aot_check.py``: no
    spill over its budget on sm_80 / 90 / 100 under Triton 3.9 and 3.6; not timed). Every pass
    takes BM = 64 rows (float32: 32): the divergence terms of a [BM, BV] tile are element-wise, BM * BV / 256
    values per thread for each live tile (s, t, their log-probabilities, d, q), and BM = 128 for
    16-bit inputs spilled 16-64 B in the mixture divergences' pass 2 on sm_80 under Triton 3.6
    (255 registers; 180-187 at BM = 64), as BM = 128 did in pass 3 on sm_90 / 100 (28-84 B with
    hard labels or softcaps). BK: 64 for 16-bit passes 1-2, 16 for float32 (32 spilled 40 B in
    the JSD pass 2 on sm_90) and for pass 3 (its two gradient dots hold more). The interpreter
    runs every block operation in numpy: the smallest blocks ``tl.dot`` takes keep tests fast
    (unless KDOPS_TRITON_GPU_BLOCKS=1, see :mod:`kdops.backends.triton._common`)."""
    if dtype.itemsize == 2:
        gpu = _Blocks(64, 64, 64, 16, 8, 3)
    else:  # float32 in 32 rows: pass 3 at 64 spilled 28-40 B on sm_100 under Triton 3.6 (reverse KL);
        # 2 stages: with its flags at runtime, pass 3 at 3 stages spilled 36 B on sm_90 (JSD, Triton 3.9)
        gpu = _Blocks(32, 64, 16, 16, 8, 2)
    return block(gpu, _Blocks(16, 16, 16, 16, 1, 1))


def _target_programs(device: torch.device) -> int:
    """Programs per launch to aim for when splitting the vocabulary into segments."""
    if device.type != "cuda":
        return 4  # the interpreter: a few segments, so that the merge is exercised
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _merge_max_sum(m: Tensor, z: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Per-segment maxima ``m`` and sums ``z = sum exp((x - m) * scale)`` ([segments, M]) merged:
    the row maximum ``top`` and ``log sum exp((x - top) * scale)`` (an all -inf row: top read as 0)."""
    top = m.amax(0)
    safe = torch.where(top == float("-inf"), 0.0, top)
    return top, (z * torch.exp((m - safe) * scale)).sum(0).log()


def fused_linear_distill(
    h: Tensor, w: Tensor, b: Optional[Tensor], th: Tensor, tw: Tensor, tb: Optional[Tensor],
    labels: Optional[Tensor], row_weights: Optional[Tensor], options: "DistillOptions", needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row losses ``[N]`` (float32, 0 for ignored rows) of the logits ``f_s(h @ w.T + b)`` against
    ``f_t(th @ tw.T + tb)`` (``f_s``, ``f_t``: the options' logit transforms), and the gradients
    of ``sum_r row_weights[r] * row[r]`` (weights 1 if None) to ``h``, ``w``, ``b`` where
    ``needs`` says so (in their dtypes; else empty tensors).
    ``h`` [N, Hs], ``w`` [V, Hs], ``th`` [N, Ht], ``tw`` [V, Ht], any strides; float32, float16
    or bfloat16. The caller has checked the arguments (see :mod:`kdops.ops.fused_linear`)."""
    divergence, temperature, beta = options.divergence, options.temperature, options.beta
    hard_weight, soft_weight, ignore_index = options.hard_weight, options.soft_weight, options.ignore_index
    n, hs = h.shape
    vocab, ht = w.shape[0], th.shape[1]
    device = h.device
    f32 = dict(dtype=torch.float32, device=device)
    grads = [
        torch.zeros(h.shape, **f32) if needs[0] else None,
        torch.zeros(w.shape, **f32) if needs[1] else None,
        torch.zeros(vocab, **f32) if needs[2] and b is not None else None,
    ]
    compute_grad = any(g is not None for g in grads)
    rows = torch.zeros(n, **f32)
    row_ids = None if labels is None else (labels != ignore_index).nonzero().squeeze(1)
    count = n if row_ids is None else row_ids.numel()
    hard = labels is not None and hard_weight > 0
    if count > 0 and vocab > 0:
        s_scale, s_softcap, s_kind = transform_args(options.student_logit_scale, options.student_softcap)
        t_scale, t_softcap, t_kind = transform_args(options.teacher_logit_scale, options.teacher_softcap)
        blocks = _blocks(h.dtype)
        v_blocks = triton.cdiv(vocab, blocks.bv)
        per_seg = triton.cdiv(v_blocks, min(v_blocks, triton.cdiv(_target_programs(device),
                                                                   triton.cdiv(count, blocks.bm))))
        segs = triton.cdiv(v_blocks, per_seg)
        stats = _alloc.empty(6, count, **f32)  # m_s, log z_s, log z_1, m_t, log z_t, S

        def given(x: Optional[Tensor], dtype: torch.dtype) -> Tensor:
            return or_absent(x, dtype, device)

        def run_pass(pass_: int, part: Optional[Tensor], grad_ptrs: list[Optional[Tensor]]) -> None:
            # pass 2 reads no label, passes 1-2 no row weight
            pass_hard = hard and pass_ != 2
            weights = row_weights if pass_ == 3 else None
            launch(
                _fused_linear_kd_kernel, (triton.cdiv(count, blocks.bm), segs), device,
                h, w, given(b, w.dtype), th, tw, given(tb, tw.dtype), given(row_ids, torch.int64),
                given(labels if pass_hard else None, torch.int64), given(weights, torch.float32), stats,
                given(part, torch.float32),
                *(given(g, torch.float32) for g in grad_ptrs),
                count, vocab, hs, ht, per_seg, *h.stride(), *w.stride(), *th.stride(), *tw.stride(),
                1.0 / temperature, beta, *mixture_logs(divergence, beta), hard_weight, soft_weight,
                s_scale, s_softcap, t_scale, t_softcap, row_ids is not None, pass_hard, b is not None,
                tb is not None, weights is not None, *(g is not None for g in grad_ptrs),
                PASS=pass_, DIV=divergence if pass_ > 1 else 0, S_TRANSFORM=s_kind, T_TRANSFORM=t_kind,
                PRECISION=_dot_precision(), BM=blocks.bm, BV=blocks.bv,
                BK=blocks.bk_grad if pass_ == 3 else blocks.bk,
                num_warps=blocks.num_warps, num_stages=blocks.num_stages,
            )

        no_grads = [None, None, None]
        part = _alloc.empty(6, segs, count, **f32)
        run_pass(1, part, no_grads)
        stats[0], stats[1] = _merge_max_sum(part[0], part[1], 1.0 / temperature)
        stats[2] = _merge_max_sum(part[0], part[2], 1.0)[1]
        stats[3], stats[4] = _merge_max_sum(part[3], part[4], 1.0 / temperature)
        s_label = part[5].sum(0)
        if divergence != _FORWARD_KL or not compute_grad:
            part = _alloc.empty(2, segs, count, **f32)
            run_pass(2, part, no_grads)
            div, stats[5] = part.sum(1)
        if compute_grad:
            part = _alloc.empty(1, segs, count, **f32) if divergence == _FORWARD_KL else None
            run_pass(3, part, grads)
            if part is not None:
                div = part[0].sum(0)
        loss = soft_weight * div
        if hard:
            counted = labels[row_ids]
            ce = torch.where((counted >= 0) & (counted < vocab), stats[0] + stats[2] - s_label, math.nan)
            loss = loss + hard_weight * ce
        if row_ids is None:
            rows = loss
        else:
            rows.index_copy_(0, row_ids, loss)
    gh, gw, gb = grads
    return (
        rows,
        h.new_empty(0) if gh is None else gh.to(h.dtype),
        w.new_empty(0) if gw is None else gw.to(w.dtype),
        w.new_empty(0) if gb is None else gb.to(w.dtype),
    )


def _dot_precision() -> str:
    """float32 dots as torch's matmuls do them: exact unless TF32 is allowed."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
