"""Triton kernels of the attention-relation loss (math in :mod:`kdops.ops.attention_relation`).

Inputs are ``[B, H, L, d]`` views with unit stride on ``d`` (any other strides); one program
handles ``BLOCK_M`` query rows (forward, ``da``) or ``BLOCK_N`` key rows (``db``) of one (sample,
head). Score tiles ``s = a b^T c_s``, ``t = a_t b_t^T c_t`` (``c = 1 / (sqrt(d) T)``) come from
``tl.dot`` with fp32 accumulation ("ieee"), float64 for float64 inputs; they are recomputed in
every pass, never stored. Offsets are int64.

* forward: pass 1, online maxima / sums of both softmaxes over key blocks (``lse_s``, ``lse_t``);
  pass 2, ``D = sum d`` and ``S = sum q`` of ``divergence_term(s - lse_s, t - lse_t)``. Writes the
  row loss (0 where the query does not count) and ``stats = (lse_s, lse_t, S)``.
* backward: ``W_ij = g_i (q_ij - p_ij S_i) c_s`` per tile; ``da = W b`` (loop over key blocks),
  ``db = W^T a`` (loop over query blocks). With ``causal`` the loops skip the tiles above the
  diagonal. ``causal``, ``has_mask`` and the head count are runtime arguments (uniform
  branches): one compiled kernel per divergence, dtype and tile shape serves them all.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdops import _alloc
from kdops.backends.triton._common import UPCAST_DOT, acc_dtype, launch, mixture_logs, or_absent
from kdops.backends.triton.divergence import divergence_term

# Query / key tile rows (the kernels' BLOCK_M = BLOCK_N). 64 x 64 spills on sm_90 (two fp32 score
# tiles and the divergence terms live at once: tools/aot_check.py reported 0.3-30 KB of spills per
# thread); 32 x 32 is checked for 16-bit inputs (tensor-core dots). float32 ("ieee": CUDA-core FMA
# dots) and float64 dots keep the head width of their operand rows in each thread: at 32 rows
# they spilled 236-1004 B (float32 forward) and 36-72 B (float64) on sm_90 / sm_100, at 16 rows
# at most 32 B on sm_80 / 90 / 100.
TILE_ROWS = 32
WIDE_TILE_ROWS = 16  # float32 and float64
# A program holds about five row tiles at once (its own a or b tile of both models, the loop's
# tile of both models, the accumulator): per tile row, (BLOCK_DS + BLOCK_DT) input elements
# twice and BLOCK_DS accumulators. From WARP_WORDS 32-bit words per row the program takes 8 warps, not 4 (on 4,
# tools/aot_check.py: float32 at head sizes 128 / 128, 64 / 128 and float64 from 64 / 64 spilled 50-1100 B on sm_90 /
# sm_100 with skew reverse KL; 16-bit at 128 / 64, 224 words, 40 B on sm_80 under Triton 3.9, the full matrix).
WARP_WORDS = 224
# Software pipelining keeps ``num_stages`` copies of the loop's two row tiles (student and teacher,
# ``BLOCK_N x (BLOCK_DS + BLOCK_DT)`` inputs) in shared memory; the stages are capped so that the
# copies take at most PIPELINE_BYTES (sm_80 has 163 KB a block): float64 head tiles 128 / 128 of
# 32 rows (64 KB a stage) needed 192-207 KB with 3 stages, 128-137 KB with 2; of 16 rows, 3 stages
# take 96-101 KB. The cap binds from head size 256 in float64, 512 in the other dtypes.
PIPELINE_BYTES = 128 * 1024
MAX_STAGES = 3  # Triton's default


@triton.jit
def _load_rows(base, rows, stride_l, L, D, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """The ``[len(rows), BLOCK_D]`` tile of rows ``rows`` (zeros past L and D)."""
    cols = tl.arange(0, BLOCK_D)
    x = tl.load(base + rows.to(tl.int64)[:, None] * stride_l + cols[None, :],
                mask=(rows[:, None] < L) & (cols[None, :] < D), other=0.0)
    if UPCAST_DOT:
        x = x.to(ACC)
    return x


@triton.jit
def _load_both(s_base, t_base, rows, s_stride_l, t_stride_l, L, Ds, Dt, BLOCK_DS: tl.constexpr,
               BLOCK_DT: tl.constexpr, ACC: tl.constexpr):
    """The student's and the teacher's tiles of rows ``rows`` (:func:`_load_rows`)."""
    return (_load_rows(s_base, rows, s_stride_l, L, Ds, BLOCK_DS, ACC),
            _load_rows(t_base, rows, t_stride_l, L, Dt, BLOCK_DT, ACC))


@triton.jit
def _counted(mask_row, rows, L, has_mask):
    """Whether each of ``rows`` is inside the sequence and (``has_mask``) the attention mask."""
    inside = rows < L
    if has_mask:
        inside = inside & (tl.load(mask_row + rows, mask=rows < L, other=0) != 0)
    return inside


@triton.jit
def _per_query(v, KEYS: tl.constexpr):
    """A per-query vector broadcast over a tile: queries on rows, or on columns with ``KEYS``."""
    if KEYS:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def _per_key(v, KEYS: tl.constexpr):
    """A per-key vector broadcast over a tile: keys on columns, or on rows with ``KEYS``."""
    if KEYS:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def _tiles(qs, qt, ks, kt, rows, cols, counted_q, counted_k, L, scale_s, scale_t, causal, ACC: tl.constexpr,
           KEYS: tl.constexpr):
    """(s, t, allowed) of a tile: the scaled scores of both models, -inf at the keys outside a
    query's softmax; ``[queries, keys]``, or ``[keys, queries]`` (the transposed tile, computed as
    such: no register transpose) with ``KEYS``. A query that does not count gets every key up to
    the causal bound (a finite row that its callers zero)."""
    if KEYS:
        s = tl.dot(ks, tl.trans(qs), input_precision="ieee", out_dtype=ACC) * scale_s
        t = tl.dot(kt, tl.trans(qt), input_precision="ieee", out_dtype=ACC) * scale_t
    else:
        s = tl.dot(qs, tl.trans(ks), input_precision="ieee", out_dtype=ACC) * scale_s
        t = tl.dot(qt, tl.trans(kt), input_precision="ieee", out_dtype=ACC) * scale_t
    allowed = (_per_key(counted_k, KEYS) | ~_per_query(counted_q, KEYS)) & _per_key(cols < L, KEYS)
    if causal:
        allowed = allowed & (_per_key(cols, KEYS) <= _per_query(rows, KEYS))
    return tl.where(allowed, s, float("-inf")), tl.where(allowed, t, float("-inf")), allowed


@triton.jit
def _online(m, z, x):
    """Running row maximum and sum of exp(x - m) after the tile x; a maximum of -inf counts as 0
    in the differences, so that no (-inf) - (-inf) appears."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, z * tl.exp(m - ref) + tl.sum(tl.exp(x - ref[:, None]), axis=1)


@triton.jit
def _causal_end(L, tile, causal, BLOCK_M: tl.constexpr):
    """The end of a query tile's key loop: the sequence, or (``causal``) the tile's last row + 1."""
    return tl.where(causal, tl.minimum(L, (tile + 1) * BLOCK_M), L)


@triton.jit
def _weights(qs, qt, ks, kt, rows, cols, counted_q, counted_k, lse_s, lse_t, q_sum, g, L, scale_s, scale_t,
             beta, log_b, log_1mb, DIV: tl.constexpr, causal, ACC: tl.constexpr, KEYS: tl.constexpr):
    """``W_ij = g_i (q_ij - p_ij S_i) c_s`` of a tile (0 outside the softmax and on rows that do
    not count); ``W^T`` with ``KEYS``."""
    s, t, allowed = _tiles(qs, qt, ks, kt, rows, cols, counted_q, counted_k, L, scale_s, scale_t, causal, ACC, KEYS)
    ls = s - _per_query(lse_s, KEYS)
    _, q = divergence_term(ls, t - _per_query(lse_t, KEYS), beta, log_b, log_1mb, DIV)
    w = (q - tl.exp(ls) * _per_query(q_sum, KEYS)) * _per_query(g * scale_s, KEYS)
    return tl.where(allowed & _per_query(counted_q, KEYS), w, 0.0)


# The head count only splits the program index (its divisibility by 16 helps no address): Triton
# takes it as it is, so that head counts of one kind or another compile to one kernel.
_UNSPECIALISED = ("H",)


@triton.jit
def _program(L, BLOCK: tl.constexpr):
    """(bh, tile, B * H * L) of this program. The grid is one axis of ``B * H * cdiv(L, BLOCK)``
    programs, the tile fastest (the programs of one head run together and share its key tiles
    in L2): a second axis of B * H stops at CUDA's 65535 (B = 2048 with 32 heads)."""
    tiles = tl.cdiv(L, BLOCK)
    pid = tl.program_id(0)
    return (pid // tiles).to(tl.int64), pid % tiles, (tl.num_programs(0) // tiles).to(tl.int64) * L


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _forward_kernel(sa_ptr, sb_ptr, ta_ptr, tb_ptr, mask_ptr, rows_ptr, stats_ptr,
                    H, L, Ds, Dt, sa_sb, sa_sh, sa_sl, sb_sb, sb_sh, sb_sl, ta_sb, ta_sh, ta_sl, tb_sb, tb_sh, tb_sl,
                    scale_s: "tl.float64", scale_t: "tl.float64", beta: "tl.float64", log_beta: "tl.float64",
                    log_1m_beta: "tl.float64", has_mask, causal, DIV: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr,
                    BLOCK_DT: tl.constexpr):
    bh, tile, n_stats = _program(L, BLOCK_M)
    b, h = bh // H, bh % H
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    c_s, c_t = tl.full([], scale_s, ACC), tl.full([], scale_t, ACC)
    bt, log_b, log_1mb = tl.full([], beta, ACC), tl.full([], log_beta, ACC), tl.full([], log_1m_beta, ACC)
    sb_base = sb_ptr + b * sb_sb + h * sb_sh
    tb_base = tb_ptr + b * tb_sb + h * tb_sh
    mask_row = mask_ptr + b * L
    qs, qt = _load_both(sa_ptr + b * sa_sb + h * sa_sh, ta_ptr + b * ta_sb + h * ta_sh, rows, sa_sl, ta_sl, L, Ds,
                        Dt, BLOCK_DS, BLOCK_DT, ACC)
    counted_q = _counted(mask_row, rows, L, has_mask)
    end = _causal_end(L, tile, causal, BLOCK_M)
    m_s = tl.full([BLOCK_M], float("-inf"), ACC)
    m_t = tl.full([BLOCK_M], float("-inf"), ACC)
    z_s = tl.zeros([BLOCK_M], ACC)
    z_t = tl.zeros([BLOCK_M], ACC)
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ks, kt = _load_both(sb_base, tb_base, cols, sb_sl, tb_sl, L, Ds, Dt, BLOCK_DS, BLOCK_DT, ACC)
        s, t, _ = _tiles(qs, qt, ks, kt, rows, cols, counted_q, _counted(mask_row, cols, L, has_mask), L, c_s, c_t,
                         causal, ACC, False)
        m_s, z_s = _online(m_s, z_s, s)
        m_t, z_t = _online(m_t, z_t, t)
    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)
    d_sum = tl.zeros([BLOCK_M], ACC)
    q_sum = tl.zeros([BLOCK_M], ACC)
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ks, kt = _load_both(sb_base, tb_base, cols, sb_sl, tb_sl, L, Ds, Dt, BLOCK_DS, BLOCK_DT, ACC)
        s, t, allowed = _tiles(qs, qt, ks, kt, rows, cols, counted_q, _counted(mask_row, cols, L, has_mask), L,
                               c_s, c_t, causal, ACC, False)
        d, q = divergence_term(s - lse_s[:, None], t - lse_t[:, None], bt, log_b, log_1mb, DIV)
        d_sum += tl.sum(tl.where(allowed, d, 0.0), axis=1)
        q_sum += tl.sum(tl.where(allowed, q, 0.0), axis=1)
    out = bh * L + rows
    in_l = rows < L
    tl.store(rows_ptr + out, tl.where(counted_q, d_sum, 0.0), mask=in_l)
    tl.store(stats_ptr + out, lse_s, mask=in_l)
    tl.store(stats_ptr + n_stats + out, lse_t, mask=in_l)
    tl.store(stats_ptr + 2 * n_stats + out, q_sum, mask=in_l)


@triton.jit
def _row_stats(stats_ptr, grad_ptr, bh, rows, L, n_stats):
    """(lse_s, lse_t, S, g) of ``rows`` (finite values past L)."""
    at = bh * L + rows
    in_l = rows < L
    lse_s = tl.load(stats_ptr + at, mask=in_l, other=0.0)
    lse_t = tl.load(stats_ptr + n_stats + at, mask=in_l, other=0.0)
    q_sum = tl.load(stats_ptr + 2 * n_stats + at, mask=in_l, other=0.0)
    return lse_s, lse_t, q_sum, tl.load(grad_ptr + at, mask=in_l, other=0.0).to(lse_s.dtype)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _backward_kernel(sa_ptr, sb_ptr, ta_ptr, tb_ptr, mask_ptr, stats_ptr, grad_ptr, out_ptr,
                     H, L, Ds, Dt, sa_sb, sa_sh, sa_sl, sb_sb, sb_sh, sb_sl, ta_sb, ta_sh, ta_sl, tb_sb, tb_sh, tb_sl,
                     scale_s: "tl.float64", scale_t: "tl.float64", beta: "tl.float64", log_beta: "tl.float64",
                     log_1m_beta: "tl.float64", has_mask, causal, DIV: tl.constexpr, KEYS: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr):
    """``KEYS`` False: ``da`` of BLOCK_M query rows (loop over key blocks); True: ``db`` of BLOCK_N
    key rows (loop over query blocks). ``out`` is contiguous ``[B, H, L, Ds]``."""
    bh, tile, n_stats = _program(L, BLOCK_N if KEYS else BLOCK_M)
    b, h = bh // H, bh % H
    c_s, c_t = tl.full([], scale_s, ACC), tl.full([], scale_t, ACC)
    bt, log_b, log_1mb = tl.full([], beta, ACC), tl.full([], log_beta, ACC), tl.full([], log_1m_beta, ACC)
    sa_base = sa_ptr + b * sa_sb + h * sa_sh
    sb_base = sb_ptr + b * sb_sb + h * sb_sh
    ta_base = ta_ptr + b * ta_sb + h * ta_sh
    tb_base = tb_ptr + b * tb_sb + h * tb_sh
    mask_row = mask_ptr + b * L
    if KEYS:
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        ks, kt = _load_both(sb_base, tb_base, cols, sb_sl, tb_sl, L, Ds, Dt, BLOCK_DS, BLOCK_DT, ACC)
        counted_k = _counted(mask_row, cols, L, has_mask)
        acc = tl.zeros([BLOCK_N, BLOCK_DS], ACC)
        start = tl.where(causal, (tile * BLOCK_N) // BLOCK_M * BLOCK_M, 0)
        for m0 in range(start, L, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            qs, qt = _load_both(sa_base, ta_base, rows, sa_sl, ta_sl, L, Ds, Dt, BLOCK_DS, BLOCK_DT, ACC)
            lse_s, lse_t, q_sum, g = _row_stats(stats_ptr, grad_ptr, bh, rows, L, n_stats)
            w_t = _weights(qs, qt, ks, kt, rows, cols, _counted(mask_row, rows, L, has_mask), counted_k, lse_s,
                           lse_t, q_sum, g, L, c_s, c_t, bt, log_b, log_1mb, DIV, causal, ACC, True)
            acc = tl.dot(w_t, qs.to(ACC), acc, input_precision="ieee")
        out_rows = cols
    else:
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        qs, qt = _load_both(sa_base, ta_base, rows, sa_sl, ta_sl, L, Ds, Dt, BLOCK_DS, BLOCK_DT, ACC)
        counted_q = _counted(mask_row, rows, L, has_mask)
        lse_s, lse_t, q_sum, g = _row_stats(stats_ptr, grad_ptr, bh, rows, L, n_stats)
        acc = tl.zeros([BLOCK_M, BLOCK_DS], ACC)
        end = _causal_end(L, tile, causal, BLOCK_M)
        for n0 in range(0, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            ks, kt = _load_both(sb_base, tb_base, cols, sb_sl, tb_sl, L, Ds, Dt, BLOCK_DS, BLOCK_DT, ACC)
            w = _weights(qs, qt, ks, kt, rows, cols, counted_q, _counted(mask_row, cols, L, has_mask), lse_s, lse_t,
                         q_sum, g, L, c_s, c_t, bt, log_b, log_1mb, DIV, causal, ACC, False)
            acc = tl.dot(w, ks.to(ACC), acc, input_precision="ieee")
        out_rows = rows
    cols_d = tl.arange(0, BLOCK_DS)
    tl.store(out_ptr + (bh * L + out_rows.to(tl.int64))[:, None] * Ds + cols_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(out_rows[:, None] < L) & (cols_d[None, :] < Ds))


# --------------------------------------------------------------------------- launchers


def _arguments(sa: Tensor, sb: Tensor, ta: Tensor, tb: Tensor, temperature: float, divergence: int,
               beta: float) -> tuple[list, dict]:
    """The shape, stride and scalar arguments shared by the kernels, and their constexprs and warps."""
    B, H, L, Ds = sa.shape
    Dt = ta.shape[-1]
    strides = [s for x in (sa, sb, ta, tb) for s in x.stride()[:3]]
    scalars = [1.0 / (math.sqrt(Ds) * temperature), 1.0 / (math.sqrt(Dt) * temperature), beta,
               *mixture_logs(divergence, beta)]
    block_ds, block_dt = max(16, triton.next_power_of_2(Ds)), max(16, triton.next_power_of_2(Dt))
    if sa.dtype == torch.float32:  # float32 (CUDA-core dots): both head tiles the wider one's width
        block_ds = block_dt = max(block_ds, block_dt)  # (64 / 128 spilled 370-1100 B per thread, 128 / 128 none)
    acc = acc_dtype(sa.dtype)
    words = ((block_ds + block_dt) * sa.element_size() + block_ds * acc.primitive_bitwidth // 8) // 4
    tile_rows = WIDE_TILE_ROWS if sa.element_size() >= 4 else TILE_ROWS
    stage_bytes = tile_rows * (block_ds + block_dt) * sa.element_size()
    constexprs = dict(DIV=divergence, ACC=acc, BLOCK_M=tile_rows, BLOCK_N=tile_rows, BLOCK_DS=block_ds,
                      BLOCK_DT=block_dt, num_warps=8 if words >= WARP_WORDS else 4,
                      num_stages=max(1, min(MAX_STAGES, PIPELINE_BYTES // stage_bytes)))
    return [H, L, Ds, Dt, *strides, *scalars], constexprs


def relation_forward(sa: Tensor, sb: Tensor, ta: Tensor, tb: Tensor, counted: Optional[Tensor], causal: bool,
                     temperature: float, divergence: int, beta: float) -> tuple[Tensor, Tensor]:
    """(row losses ``[B, H, L]``, stats ``[3, B, H, L]`` = lse_s, lse_t, S), compute dtype."""
    B, H, L, _ = sa.shape
    cdt = _alloc.compute_dtype(sa.dtype)
    rows = _alloc.empty(B, H, L, dtype=cdt, device=sa.device)
    stats = _alloc.empty(3, B, H, L, dtype=cdt, device=sa.device)
    if rows.numel():
        args, constexprs = _arguments(sa, sb, ta, tb, temperature, divergence, beta)
        launch(_forward_kernel, (B * H * triton.cdiv(L, constexprs["BLOCK_M"]),), sa.device, sa, sb, ta, tb,
               or_absent(counted, torch.uint8, sa.device), rows, stats, *args, counted is not None, causal,
               **constexprs)
    return rows, stats


def relation_backward(grad_rows: Tensor, sa: Tensor, sb: Tensor, ta: Tensor, tb: Tensor, counted: Optional[Tensor],
                      stats: Tensor, causal: bool, temperature: float, divergence: int,
                      beta: float) -> tuple[Tensor, Tensor]:
    """(dL/dsa, dL/dsb), contiguous, in the student dtype, from the contiguous ``[B, H, L]``
    gradient of the row losses."""
    B, H, L, Ds = sa.shape
    da = _alloc.empty(B, H, L, Ds, dtype=sa.dtype, device=sa.device)
    db = _alloc.empty(B, H, L, Ds, dtype=sa.dtype, device=sa.device)
    if da.numel():
        args, constexprs = _arguments(sa, sb, ta, tb, temperature, divergence, beta)
        for out, keys in ((da, False), (db, True)):
            grid = (B * H * triton.cdiv(L, constexprs["BLOCK_N" if keys else "BLOCK_M"]),)
            launch(_backward_kernel, grid, sa.device, sa, sb, ta, tb, or_absent(counted, torch.uint8, sa.device),
                   stats, grad_rows, out, *args, counted is not None, causal, KEYS=keys, **constexprs)
    return da, db
