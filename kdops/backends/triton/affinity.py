"""Triton kernels of the relation-based losses: affinities, SP, RKD distance and RKD angle.

Notation: ``X [B, D]`` student rows, ``Y [B, D_t]`` teacher rows (constant), ``n_i = ||x_i||^2``,
``G = X X^T``, ``d2_ij = max(n_i + n_j - 2 G_ij, 0)`` (Gram form), ``h`` smooth-L1 with
parameter ``beta`` (``h(z) = z^2 / (2 beta)`` for ``|z| < beta``, else ``|z| - beta / 2``), ``h'``
its derivative. Math in float32 (float64 for float64 inputs); scalar arguments (``beta``) are
float32. Gram tiles come from ``tl.dot`` with fp32 accumulation ("ieee": no TF32).

Forward passes never store a ``[B, B]`` matrix for SP and RKD-D:

* SP: pass 1 per row ``r_i = max(sqrt(sum_j G_ij^2), eps)`` for each model; pass 2 per row
  ``sum_j (u_ij - v_ij)^2`` with ``u = G^s / r^s``, ``v = G^t / r^t`` (row-wise), and
  ``c_i = 2/B^2 sum_j (u_ij - v_ij) u_ij`` (``c_i = 0`` where ``r_i`` is clamped);
  ``L = sum / B^2``.
* RKD-D: pass 1 per row ``sum_{j != i} d_ij``, ``d_ij = sqrt(max(d2_ij, 1e-12))``, so
  ``mu = sum / P`` (``P = B(B-1)``); pass 2 per row ``sum_j h(z_ij)``, ``z = d^s/mu_s - d^t/mu_t``,
  and ``kappa = 1/P sum_ij h'(z_ij) d^s_ij / mu_s``; ``L = sum / P``.
* RKD-A: the exact squared distances ``E`` (``[B, B]``, from differences, so that duplicate
  samples give exactly 0) of each model, then per tile (p, q) a loop over anchors r of
  ``cos_prq = (a + b - c) / (2 sqrt(a) sqrt(b))`` with ``a = E_pr``, ``b = E_qr``, ``c = E_pq``
  (law of cosines; ``cos = 0`` where ``a`` or ``b <= 1e-24``), except where ``a`` and ``b``
  differ by more than ``1 / CLOSE_PAIR_RATIO`` (a pair close to the anchor: ``b - c`` cancels),
  where ``cos = (x_p - x_r) . (x_q - x_r) / sqrt(a b)`` from the differences of the rows:
  ``L = sum h(cos^s - cos^t) / B^3``. Memory ``O(B^2)``, no ``[B, B, B]`` buffer.

Every gradient ends in one "apply" step with pair weights ``W`` (rows of a chunk x B):

    GRAM form  dx_i = sum_j W_ij x_j + delta_i x_i
    DIST form  dx_i = sum_j W_ij (x_i - x_j)

* affinity, ``S = dA + dA^T``: dot ``W = S`` (GRAM); cosine ``W_ij = S_ij / (r_i r_j)``,
  ``delta_i = -(sum_j S_ij A_ij) / r_i^2`` (0 where ``r_i`` is clamped; GRAM);
  squared_euclidean ``W = 2 S``; euclidean ``W_ij = S_ij / A_ij`` where ``d2_ij > 1e-12`` (DIST).
* SP: ``W = M + M^T``, ``M_ij = (E_ij - c_i u_ij) / r^s_i``, ``E_ij = 2/B^2 (u_ij - v_ij)`` (GRAM).
* RKD-D: ``dL/dd_ij = w_ij = (h'(z_ij) - kappa) / (P mu_s)``, ``W_ij = 2 w_ij / d^s_ij`` where
  ``d2_ij > 1e-12`` (DIST). Rows are processed in chunks of ``_chunk_rows`` so ``W`` holds
  ``O(B * D)`` elements, recomputing the Gram tiles instead of storing ``[B, B]``.
* RKD-A: with ``g = h'(cos^s - cos^t) / B^3`` (0 where ``cos^s`` is masked),
  ``dcos/dc = -1 / (2 sqrt(ab))`` and ``dcos/da = 1 / (2 sqrt(ab)) - cos / (2a)``, the gradient
  w.r.t. the squared distances is ``Delta_pq = sum_r [g_prq dcos_prq/dc + 2 g_pqr dcos_pqr/da]``
  (``cos_pqr``: anchor q, ``a = E_pq``, ``b = E_rq``, ``c = E_pr``; ``dcos/db`` terms equal the
  ``dcos/da`` ones by the i <-> k symmetry, hence the 2), then ``dx`` is the squared_euclidean
  affinity gradient with ``dA = Delta`` (DIST form on the centred rows), whose close pairs (the
  weights ``~ 1 / a`` of a pair close to the anchor) take ``W_ij (x_i - x_j)`` from differences.

The same codes as :mod:`kdops.ops.affinity`: affinity kinds DOT, COSINE, EUCLIDEAN,
SQUARED_EUCLIDEAN (EXACT_SQUARED is internal); losses SP, RKD_DISTANCE, RKD_ANGLE.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdops import _alloc, _codes
from kdops.backends.triton._common import INTERPRETING, launch
from kdops.backends.triton._common import block as _block

DOT: tl.constexpr = tl.constexpr(0)
COSINE: tl.constexpr = tl.constexpr(1)
EUCLIDEAN: tl.constexpr = tl.constexpr(2)
SQUARED_EUCLIDEAN: tl.constexpr = tl.constexpr(3)
EXACT_SQUARED: tl.constexpr = tl.constexpr(4)  # squared distances from differences (RKD-A)

SP: tl.constexpr = tl.constexpr(0)
RKD_DISTANCE: tl.constexpr = tl.constexpr(1)
RKD_ANGLE: tl.constexpr = tl.constexpr(2)

NORM_EPS: tl.constexpr = tl.constexpr(1e-12)  # norms clamp (kdops.reference.NORM_EPS)
NORM_EPS2: tl.constexpr = tl.constexpr(1e-24)  # NORM_EPS^2: squared norms / distances below are 0
DIST_EPS2: tl.constexpr = tl.constexpr(1e-12)  # squared distances clamp (kdops.reference.DIST_EPS2)
# Gram-form squared distances below this fraction of n_i + n_j are recomputed from differences
CLOSE_PAIR_RATIO: tl.constexpr = tl.constexpr(_codes.CLOSE_PAIR_RATIO)

# Tiles: 64 x 64 Gram tiles; the interpreter runs whole numpy blocks, so larger K steps are
# faster there (unless KDOPS_TRITON_GPU_BLOCKS=1). Its bf16 tl.dot is wrong, so operands are
# upcast first when interpreting.
BLOCK = 64
BLOCK_K = _block(32, 128)
# K step of the row statistics' Gram dots: 32 spilled 40 B in bf16 RKD-D on sm_80 under Triton 3.9
# (255 registers; 16: 220, 0 B on sm_80 / 90, 20 B on sm_100); 16 everywhere made the float64
# RKD-D loss kernel spill 36 B on sm_90 (tools/aot_check.py)
ROW_STAT_BLOCK_K = _block(16, 128)
EXACT_BLOCK, EXACT_BLOCK_K = _block((32, 8), (32, 32))  # [M, N, K] difference blocks
ANGLE_BLOCK = _block(32, 128)  # RKD-A tiles (the interpreter pays per tile and anchor)
# Backward of SP / RKD-D: pair weights are materialised for at most max(B * D, this) elements.
_CHUNK_ELEMENTS = 1 << 22
# Warps of every relation kernel: with 8, a 64 x 64 float32 / float64 tile and its dot operands
# fit in the registers of a thread (with 4 the fp32 / fp64 Gram kernels reached 255 registers and
# spilled up to 1 KB per thread; tools/aot_check.py).
NUM_WARPS = 8
# Rows of X per dot in the dX kernel (the dot's K): on sm_80, whose dots keep both operands in
# registers, the 64-row dots spilled 176-544 B (float32 / tf32x3) and 4.6-5.3 KB (float32 with
# the close-pair tiles) per thread; with 16: 0 B on sm_80 / 90 / 100 (tools/aot_check.py).
APPLY_DOT_K = 16


def _launch(kernel, grid, device, *args, **options) -> None:
    launch(kernel, grid, device, *args, num_warps=NUM_WARPS, **options)



def _tl_compute(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_upcast(dtype: torch.dtype) -> bool:
    return INTERPRETING and dtype == torch.bfloat16


# --------------------------------------------------------------------------- per-element math


@triton.jit
def _smooth_l1(z, beta):
    """h(z); beta = 0 is L1 (the quadratic branch is then never taken)."""
    az = tl.abs(z)
    return tl.where(az < beta, 0.5 * z * z / tl.where(beta > 0.0, beta, 1.0), az - 0.5 * beta)


@triton.jit
def _smooth_l1_grad(z, beta):
    """h'(z): z / beta inside (-beta, beta), else sign(z) (0 at z = 0)."""
    sign = tl.where(z > 0.0, 1.0, tl.where(z < 0.0, -1.0, 0.0))
    return tl.where(tl.abs(z) < beta, z / tl.where(beta > 0.0, beta, 1.0), sign)


@triton.jit
def _inv_norm(sq):
    """1 / max(sqrt(sq), eps) of squared norms ``sq``."""
    return 1.0 / tl.maximum(tl.sqrt(sq), NORM_EPS)


@triton.jit
def _squared_distance(g, n_i, n_j, raw_ptr, stride, rows_i, rows_j, B, D, COMPUTE: tl.constexpr):
    """``d2_ij`` from the Gram tile ``g`` and the squared norms of the centred rows: the Gram form
    ``max(n_i + n_j - 2 g_ij, 0)``, except close pairs (``d2 < CLOSE_PAIR_RATIO (n_i + n_j)``,
    i != j, where the form cancels), recomputed from the differences ``sum_k (x_ik - x_jk)^2``
    of the ``raw`` (uncentred: exact differences of close values) rows, one feature at a time
    (only in tiles that hold such a pair)."""
    norms = n_i[:, None] + n_j[None, :]
    d2 = tl.maximum(norms - 2.0 * g, 0.0)
    close = (d2 < CLOSE_PAIR_RATIO * norms) & (rows_i[:, None] != rows_j[None, :])
    close = close & (rows_i[:, None] < B) & (rows_j[None, :] < B)
    if tl.max(tl.max(close.to(tl.int32), axis=1), axis=0) > 0:
        exact = tl.zeros(d2.shape, COMPUTE)
        base_i = raw_ptr + rows_i.to(tl.int64) * stride
        base_j = raw_ptr + rows_j.to(tl.int64) * stride
        for k in range(0, D):
            a = tl.load(base_i + k, mask=rows_i < B, other=0.0).to(COMPUTE)
            b = tl.load(base_j + k, mask=rows_j < B, other=0.0).to(COMPUTE)
            diff = a[:, None] - b[None, :]
            exact += diff * diff
        d2 = tl.where(close, exact, d2)
    return d2


@triton.jit
def _distance(d2, rows_i, rows_j):
    """(d, m): ``d_ij = sqrt(max(d2_ij, 1e-12))`` (0 on the diagonal) from the squared distances
    ``d2``; ``m`` where the clamp is inactive and i != j (gradient flows)."""
    off = rows_i[:, None] != rows_j[None, :]
    return tl.where(off, tl.sqrt(tl.maximum(d2, DIST_EPS2)), 0.0), off & (d2 > DIST_EPS2)


@triton.jit
def _pair_distances(g, raw_ptr, stride, D, norms_ptr, rows_i, rows_j, B, COMPUTE: tl.constexpr):
    """:func:`_distance` of the tile whose centred rows have the Gram tile ``g`` (``raw``: the rows)."""
    d2 = _squared_distance(g, _load_vector(norms_ptr, rows_i, B), _load_vector(norms_ptr, rows_j, B), raw_ptr, stride,
                           rows_i, rows_j, B, D, COMPUTE)
    return _distance(d2, rows_i, rows_j)


@triton.jit
def _cosine(a, sqrt_a, b, sqrt_b, c, x_ptr, off_u, off_v, off_w, valid, D, COMPUTE: tl.constexpr):
    """(cos, mask, 1 / (sqrt(a) sqrt(b))) of the angle at ``x_w`` between ``e_u = x_u - x_w`` and
    ``e_v = x_v - x_w``, with squared lengths ``a``, ``b`` and ``c = ||x_u - x_v||^2``; 0 where a
    difference is 0. The law of cosines ``(a + b - c) / (2 sqrt(a b))`` where ``a`` and ``b`` are
    within a factor ``1 / CLOSE_PAIR_RATIO`` (its error is then ~ eps (a + b) / sqrt(a b) < 33 eps);
    else (``b - c`` cancels) the normalised dot ``e_u . e_v`` of the differences of the rows of
    ``x`` (row offsets ``off_u``, ``off_v``, ``off_w`` of real rows, [M, 1], [1, N] or [1, 1];
    ``valid`` the tile's real triplets), one feature at a time, only in tiles that hold such a triplet."""
    mask = (a > NORM_EPS2) & (b > NORM_EPS2)
    inv = tl.where(mask, 1.0 / tl.where(mask, sqrt_a * sqrt_b, 1.0), 0.0)
    cos = (a + b - c) * 0.5 * inv
    skewed = mask & valid & ((a < CLOSE_PAIR_RATIO * b) | (b < CLOSE_PAIR_RATIO * a))
    if tl.max(tl.max(skewed.to(tl.int32), axis=1), axis=0) > 0:
        dot = tl.zeros(cos.shape, COMPUTE)
        for k in range(0, D):
            x_w = tl.load(x_ptr + off_w + k).to(COMPUTE)
            dot += (tl.load(x_ptr + off_u + k).to(COMPUTE) - x_w) * (tl.load(x_ptr + off_v + k).to(COMPUTE) - x_w)
        cos = tl.where(skewed, dot * inv, cos)
    return cos, mask, inv


# --------------------------------------------------------------------------- tiles


@triton.jit
def _load_rows(x_ptr, stride, rows, cols, B, D):
    mask = (rows[:, None] < B) & (cols[None, :] < D)
    return tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _gram_tile(x_ptr, stride, rows_i, rows_j, B, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``G_ij = x_i . x_j`` for rows_i x rows_j (rows >= B read as zeros)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), COMPUTE)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        a = _load_rows(x_ptr, stride, rows_i, cols, B, D)
        b = _load_rows(x_ptr, stride, rows_j, cols, B, D)
        if DOT_UPCAST:
            a = a.to(COMPUTE)
            b = b.to(COMPUTE)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    return acc


@triton.jit
def _exact_squared_tile(x_ptr, stride, rows_i, rows_j, B, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr):
    """``sum_k (x_ik - x_jk)^2`` from the differences: exactly 0 for equal rows."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), COMPUTE)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        a = _load_rows(x_ptr, stride, rows_i, cols, B, D).to(COMPUTE)
        b = _load_rows(x_ptr, stride, rows_j, cols, B, D).to(COMPUTE)
        diff = a[:, None, :] - b[None, :, :]
        acc += tl.sum(diff * diff, axis=2)
    return acc


@triton.jit
def _load_vector(ptr, idx, B):
    return tl.load(ptr + idx, mask=idx < B, other=0.0)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _sq_norms_kernel(x_ptr, out_ptr, B, D, stride, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     COMPUTE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M,), COMPUTE)
    for k0 in range(0, D, BLOCK_K):
        a = _load_rows(x_ptr, stride, rows, k0 + tl.arange(0, BLOCK_K), B, D).to(COMPUTE)
        acc += tl.sum(a * a, axis=1)
    tl.store(out_ptr + rows, acc, mask=rows < B)


@triton.jit
def _affinity_kernel(x_ptr, raw_ptr, norms_ptr, out_ptr, B, D, stride_x, stride_raw, stride_o, KIND: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     COMPUTE: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One tile of the [B, B] affinity (see the module docstring for the kinds)."""
    rows_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if KIND == EXACT_SQUARED:
        a = _exact_squared_tile(x_ptr, stride_x, rows_i, rows_j, B, D, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE)
    else:
        g = _gram_tile(x_ptr, stride_x, rows_i, rows_j, B, D, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE, DOT_UPCAST)
        if KIND == DOT:
            a = g
        else:
            n_i = _load_vector(norms_ptr, rows_i, B)
            n_j = _load_vector(norms_ptr, rows_j, B)
            if KIND == COSINE:
                a = g * _inv_norm(n_i)[:, None] * _inv_norm(n_j)[None, :]
            else:
                d2 = _squared_distance(g, n_i, n_j, raw_ptr, stride_raw, rows_i, rows_j, B, D, COMPUTE)
                if KIND == EUCLIDEAN:
                    a, _ = _distance(d2, rows_i, rows_j)
                else:
                    a = tl.where(rows_i[:, None] != rows_j[None, :], d2, 0.0)
    mask = (rows_i[:, None] < B) & (rows_j[None, :] < B)
    tl.store(out_ptr + rows_i.to(tl.int64)[:, None] * stride_o + rows_j[None, :], a, mask=mask)


@triton.jit
def _affinity_weights_kernel(grad_ptr, a_ptr, norms_ptr, w_ptr, delta_ptr, close_ptr, B, stride_g0, stride_g1,
                             stride_a, stride_w, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    """Pair weights W (and delta for cosine) of the affinity gradient ``dA`` (``grad``); for
    euclidean and EXACT_SQUARED (squared distances whose gradient has large weights on close
    pairs: RKD-A's) also the tile flags of :func:`_flag_close_pairs` (``norms`` of the centred rows)."""
    rows_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r64 = rows_i.to(tl.int64)
    if KIND == COSINE or KIND == EUCLIDEAN or KIND == EXACT_SQUARED:
        n_i = _load_vector(norms_ptr, rows_i, B)
    if KIND == COSINE:
        inv_i = _inv_norm(n_i)
        c = tl.zeros((BLOCK_M,), COMPUTE)
    for j0 in range(0, B, BLOCK_N):
        rows_j = j0 + tl.arange(0, BLOCK_N)
        j64 = rows_j.to(tl.int64)  # int64: j * stride passes 2^31 for B >= 46341 (either layout of grad)
        mask = (rows_i[:, None] < B) & (rows_j[None, :] < B)
        s = (tl.load(grad_ptr + r64[:, None] * stride_g0 + j64[None, :] * stride_g1, mask=mask, other=0.0)
             + tl.load(grad_ptr + j64[None, :] * stride_g0 + r64[:, None] * stride_g1, mask=mask, other=0.0))
        s = s.to(COMPUTE)
        if KIND == DOT:
            w = s
        elif KIND == COSINE:
            a = tl.load(a_ptr + r64[:, None] * stride_a + rows_j[None, :], mask=mask, other=0.0)
            c += tl.sum(s * a, axis=1)
            w = s * inv_i[:, None] * _inv_norm(_load_vector(norms_ptr, rows_j, B))[None, :]
        else:
            off = rows_i[:, None] != rows_j[None, :]
            if KIND == SQUARED_EUCLIDEAN:
                w = tl.where(off, 2.0 * s, 0.0)
            elif KIND == EXACT_SQUARED:  # squared_euclidean whose close pairs take the exact DIST terms
                w = tl.where(off, 2.0 * s, 0.0)
                a = tl.load(a_ptr + r64[:, None] * stride_a + rows_j[None, :], mask=mask, other=0.0)
                _flag_close_pairs(close_ptr, tl.program_id(0), tl.cdiv(B, BLOCK_N), j0 // BLOCK_N,
                                  off & mask & (w != 0.0), a, n_i, _load_vector(norms_ptr, rows_j, B))
            else:
                a = tl.load(a_ptr + r64[:, None] * stride_a + rows_j[None, :], mask=mask, other=1.0)
                # A_ij > sqrt(1e-12) exactly where d2_ij > 1e-12
                keep = off & (a * a > DIST_EPS2)
                w = tl.where(keep, s / tl.where(keep, a, 1.0), 0.0)
                _flag_close_pairs(close_ptr, tl.program_id(0), tl.cdiv(B, BLOCK_N), j0 // BLOCK_N, keep & mask, a * a,
                                  n_i, _load_vector(norms_ptr, rows_j, B))
        tl.store(w_ptr + r64[:, None] * stride_w + rows_j[None, :], w, mask=mask)
    if KIND == COSINE:
        delta = tl.where(n_i > NORM_EPS2, -c * inv_i * inv_i, 0.0)
        tl.store(delta_ptr + rows_i, delta, mask=rows_i < B)


@triton.jit
def _flag_close_pairs(close_ptr, tile_i, n_tiles_j, tile_j, mask, d2, n_i, n_j):
    """Marks tile (tile_i, tile_j) of the pair weights in ``close`` ([tiles_i, tiles_j] int32)
    if it holds a close pair (``d2 < CLOSE_PAIR_RATIO (n_i + n_j)`` among ``mask``), whose DIST
    term the apply kernel then forms from differences."""
    close = mask & (d2 < CLOSE_PAIR_RATIO * (n_i[:, None] + n_j[None, :]))
    tl.store(close_ptr + tile_i * n_tiles_j + tile_j, tl.max(tl.max(close.to(tl.int32), axis=1), axis=0))


@triton.jit
def _weights_dot(acc, row_sum, w_ptr, stride_w, x_ptr, stride_x, rows, rows_j, cols, R, B, D, DIST: tl.constexpr,
                 COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + W[rows, rows_j] X[rows_j, cols]`` and, with DIST, ``row_sum`` plus the W tile's row sums."""
    w = _load_rows(w_ptr, stride_w, rows, rows_j, R, B)
    x_j = _load_rows(x_ptr, stride_x, rows_j, cols, B, D).to(COMPUTE)
    acc = tl.dot(w, x_j, acc, input_precision=PRECISION)
    if DIST:
        row_sum += tl.sum(w, axis=1)
    return acc, row_sum


@triton.jit
def _apply_weights_kernel(w_ptr, delta_ptr, x_ptr, raw_ptr, close_ptr, out_ptr, row0, R, B, D, stride_w, stride_x,
                          stride_raw, stride_o,
                          DIST: tl.constexpr, HAS_DELTA: tl.constexpr, EXACT_CLOSE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          DOT_K: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    """Rows row0 + [0, R) of dX: GRAM ``W X + delta * X`` or DIST ``rowsum(W) * X - W X``
    (W holds the R rows of the chunk; ``W X`` in dots of ``DOT_K`` rows of X). With EXACT_CLOSE
    (DIST of centred X), the [BLOCK_M, BLOCK_N] W tiles that
    ``close`` flags (:func:`_flag_close_pairs`) add ``sum_j W_ij (x_i - x_j)`` from the
    differences of the ``raw`` (uncentred) rows, one j at a time: the large weights of
    near-duplicate pairs would otherwise
    multiply the rounding of ``rowsum(W) * x_i - W X``. ``PRECISION`` of the ``W X`` dot: "ieee" for float32 /
    float64 X; "tf32x3" for 16-bit X, which is exact in tf32, so that only the tf32 split of W
    rounds (relative error ~2^-22, far below the 16-bit rounding of dX) and the dot runs on
    tensor cores (an "ieee" float32 dot of a 64 x 64 x 64 tile on CUDA cores spilled 1.5-8 KB)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_D), COMPUTE)
    row_sum = tl.zeros((BLOCK_M,), COMPUTE)
    x_i = _load_rows(x_ptr, stride_x, row0 + rows, cols, row0 + R, D).to(COMPUTE)
    if EXACT_CLOSE:
        raw_i = _load_rows(raw_ptr, stride_raw, row0 + rows, cols, row0 + R, D).to(COMPUTE)
        exact = tl.zeros((BLOCK_M, BLOCK_D), COMPUTE)
        n_tiles_j = tl.cdiv(B, BLOCK_N)
    if EXACT_CLOSE:
        for j0 in range(0, B, BLOCK_N):  # the close-pair flags' tiles
            if tl.load(close_ptr + tl.program_id(0) * n_tiles_j + j0 // BLOCK_N) != 0:
                for jj in range(0, tl.minimum(BLOCK_N, B - j0)):
                    j = tl.full((), j0 + jj, tl.int64)
                    w_j = tl.load(w_ptr + rows.to(tl.int64) * stride_w + j, mask=rows < R, other=0.0)
                    raw_j = tl.load(raw_ptr + j * stride_raw + cols, mask=cols < D, other=0.0)
                    exact += w_j.to(COMPUTE)[:, None] * (raw_i - raw_j.to(COMPUTE)[None, :])
            else:
                for k0 in tl.static_range(0, BLOCK_N, DOT_K):
                    acc, row_sum = _weights_dot(acc, row_sum, w_ptr, stride_w, x_ptr, stride_x, rows,
                                                j0 + k0 + tl.arange(0, DOT_K), cols, R, B, D, DIST, COMPUTE, PRECISION)
    else:
        for j0 in range(0, B, DOT_K):
            acc, row_sum = _weights_dot(acc, row_sum, w_ptr, stride_w, x_ptr, stride_x, rows, j0 + tl.arange(0, DOT_K),
                                        cols, R, B, D, DIST, COMPUTE, PRECISION)
    if EXACT_CLOSE:
        out = row_sum[:, None] * x_i - acc + exact
    elif DIST:
        out = row_sum[:, None] * x_i - acc
    elif HAS_DELTA:
        out = acc + _load_vector(delta_ptr, row0 + rows, row0 + R)[:, None] * x_i
    else:
        out = acc
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    tl.store(out_ptr + (row0 + rows).to(tl.int64)[:, None] * stride_o + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_stat_kernel(x_ptr, raw_ptr, norms_ptr, out_ptr, B, D, stride, stride_raw, LOSS: tl.constexpr,
                     BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
                     DOT_UPCAST: tl.constexpr):
    """Pass 1, per row: SP ``sum_j G_ij^2``; RKD-D ``sum_j d_ij``."""
    rows_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if LOSS == RKD_DISTANCE:
        n_i = _load_vector(norms_ptr, rows_i, B)
    acc = tl.zeros((BLOCK_M,), COMPUTE)
    for j0 in range(0, B, BLOCK_N):
        rows_j = j0 + tl.arange(0, BLOCK_N)
        g = _gram_tile(x_ptr, stride, rows_i, rows_j, B, D, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE, DOT_UPCAST)
        if LOSS == SP:
            v = g * g
        else:
            d2 = _squared_distance(g, n_i, _load_vector(norms_ptr, rows_j, B), raw_ptr, stride_raw, rows_i, rows_j,
                                   B, D,
                                   COMPUTE)
            v, _ = _distance(d2, rows_i, rows_j)
        acc += tl.sum(tl.where((rows_j < B)[None, :], v, 0.0), axis=1)
    tl.store(out_ptr + rows_i, acc, mask=rows_i < B)


@triton.jit
def _relation_terms(gs, gt, rows_i, rows_j, rs_ptr, rt_ptr, stride_rs, stride_rt, Ds, Dt, ns_ptr, nt_ptr, stats_ptr,
                    B, beta, LOSS: tl.constexpr, COMPUTE: tl.constexpr):
    """(loss terms, aux terms) of a tile: SP ``(z^2, z u)``; RKD-D ``(h(z), h'(z) u)``, u the
    student's normalised tile, ``z = u - v``."""
    if LOSS == SP:
        u = gs * _load_vector(stats_ptr, rows_i, B)[:, None]  # stats rows: 1/r_s, 1/r_t, c
        v = gt * _load_vector(stats_ptr + B, rows_i, B)[:, None]
        z = u - v
        return z * z, z * u
    else:
        ds, _ = _pair_distances(gs, rs_ptr, stride_rs, Ds, ns_ptr, rows_i, rows_j, B, COMPUTE)
        dt, _ = _pair_distances(gt, rt_ptr, stride_rt, Dt, nt_ptr, rows_i, rows_j, B, COMPUTE)
        u = ds / tl.load(stats_ptr)  # stats: mu_s, mu_t, kappa
        z = u - dt / tl.load(stats_ptr + 1)
        return _smooth_l1(z, beta), _smooth_l1_grad(z, beta) * u


@triton.jit
def _relation_loss_kernel(xs_ptr, xt_ptr, rs_ptr, rt_ptr, ns_ptr, nt_ptr, stats_ptr, loss_ptr, aux_ptr, B, Ds, Dt,
                          stride_s, stride_t, stride_rs, stride_rt, beta, LOSS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
                          DOT_UPCAST: tl.constexpr):
    """Pass 2, per row: the sums over j of the loss terms and aux terms of :func:`_relation_terms`."""
    rows_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    loss = tl.zeros((BLOCK_M,), COMPUTE)
    aux = tl.zeros((BLOCK_M,), COMPUTE)
    for j0 in range(0, B, BLOCK_N):
        rows_j = j0 + tl.arange(0, BLOCK_N)
        gs = _gram_tile(xs_ptr, stride_s, rows_i, rows_j, B, Ds, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE, DOT_UPCAST)
        gt = _gram_tile(xt_ptr, stride_t, rows_i, rows_j, B, Dt, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE, DOT_UPCAST)
        terms, aux_terms = _relation_terms(gs, gt, rows_i, rows_j, rs_ptr, rt_ptr, stride_rs, stride_rt, Ds, Dt, ns_ptr,
                                           nt_ptr, stats_ptr, B, beta, LOSS, COMPUTE)
        valid = (rows_j < B)[None, :]
        loss += tl.sum(tl.where(valid, terms, 0.0), axis=1)
        aux += tl.sum(tl.where(valid, aux_terms, 0.0), axis=1)
    tl.store(loss_ptr + rows_i, loss, mask=rows_i < B)
    tl.store(aux_ptr + rows_i, aux, mask=rows_i < B)


@triton.jit
def _relation_weights_kernel(xs_ptr, xt_ptr, rs_ptr, rt_ptr, ns_ptr, nt_ptr, stats_ptr, scale_ptr, w_ptr, close_ptr,
                             row0, R, B, Ds, Dt, stride_s, stride_t, stride_rs, stride_rt, stride_w, beta,
                             LOSS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
                             DOT_UPCAST: tl.constexpr):
    """One tile of the pair weights of rows row0 + [0, R), times ``scale`` (the incoming gradient
    times 2/B^2 for SP, 2/P for RKD-D)."""
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_i = row0 + local
    rows_j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    gs = _gram_tile(xs_ptr, stride_s, rows_i, rows_j, B, Ds, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE, DOT_UPCAST)
    gt = _gram_tile(xt_ptr, stride_t, rows_i, rows_j, B, Dt, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE, DOT_UPCAST)
    if LOSS == SP:
        inv_rs_i = _load_vector(stats_ptr, rows_i, B)[:, None]
        inv_rt_i = _load_vector(stats_ptr + B, rows_i, B)[:, None]
        c_i = _load_vector(stats_ptr + 2 * B, rows_i, B)[:, None]
        inv_rs_j = _load_vector(stats_ptr, rows_j, B)[None, :]
        inv_rt_j = _load_vector(stats_ptr + B, rows_j, B)[None, :]
        c_j = _load_vector(stats_ptr + 2 * B, rows_j, B)[None, :]
        # B^2/2 (M_ij + M_ji) with G symmetric, B^2/2 M_ij = (u_ij - v_ij - c_i u_ij) / r_i, and
        # c_i = sum_j (u_ij - v_ij) u_ij here (B^2/2 times the c of the module docstring)
        u_ij = gs * inv_rs_i
        u_ji = gs * inv_rs_j
        w = (u_ij - gt * inv_rt_i - c_i * u_ij) * inv_rs_i + (u_ji - gt * inv_rt_j - c_j * u_ji) * inv_rs_j
    else:
        ds, grad_mask = _pair_distances(gs, rs_ptr, stride_rs, Ds, ns_ptr, rows_i, rows_j, B, COMPUTE)
        dt, _ = _pair_distances(gt, rt_ptr, stride_rt, Dt, nt_ptr, rows_i, rows_j, B, COMPUTE)
        mu_s = tl.load(stats_ptr)
        z = ds / mu_s - dt / tl.load(stats_ptr + 1)
        # P/2 W_ij = (h'(z_ij) - kappa) / (mu_s d_ij)
        w = tl.where(grad_mask,
                     (_smooth_l1_grad(z, beta) - tl.load(stats_ptr + 2)) / (mu_s * tl.where(grad_mask, ds, 1.0)), 0.0)
    mask = (local[:, None] < R) & (rows_j[None, :] < B)
    if LOSS == RKD_DISTANCE:
        _flag_close_pairs(close_ptr, tl.program_id(0), tl.num_programs(1), tl.program_id(1), grad_mask & mask, ds * ds,
                          _load_vector(ns_ptr, rows_i, B), _load_vector(ns_ptr, rows_j, B))
    w = w * tl.load(scale_ptr)
    tl.store(w_ptr + local.to(tl.int64)[:, None] * stride_w + rows_j[None, :], w, mask=mask)


@triton.jit
def _angle_kernel(es_ptr, et_ptr, xs_ptr, xt_ptr, scale_ptr, out_ptr, B, Ds, Dt, stride, stride_xs, stride_xt, beta,
                  GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    """RKD-A over the tile (p, q) and every anchor r, from the exact squared distances E^s, E^t
    (and the rows ``xs``, ``xt`` for the angles :func:`_cosine` forms from differences).
    Forward: the tile's sum of h(cos^s - cos^t). GRAD: the tile of Delta times ``scale``
    (the incoming gradient / B^3)."""
    rows_p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_q = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows_p[:, None] < B) & (rows_q[None, :] < B)
    cs = _load_rows(es_ptr, stride, rows_p, rows_q, B, B).to(COMPUTE)  # E_pq
    ct = _load_rows(et_ptr, stride, rows_p, rows_q, B, B).to(COMPUTE)
    sqrt_cs = tl.sqrt(cs)
    sqrt_ct = tl.sqrt(ct)
    # row offsets of p and q in the features (rows past B read row 0; int64: row x stride passes 2^31)
    p64 = tl.where(rows_p < B, rows_p, 0).to(tl.int64)[:, None]
    q64 = tl.where(rows_q < B, rows_q, 0).to(tl.int64)[None, :]
    ps, qs, pt, qt = p64 * stride_xs, q64 * stride_xs, p64 * stride_xt, q64 * stride_xt
    acc = tl.zeros((BLOCK_M, BLOCK_N), COMPUTE)
    for r in range(0, B):
        # E is symmetric: row r holds E_pr and E_qr (int64: r * stride passes 2^31 for B >= 46341)
        r64 = tl.full((), r, tl.int64)
        es_r = es_ptr + r64 * stride
        et_r = et_ptr + r64 * stride
        rs, rt = tl.full((1, 1), r, tl.int64) * stride_xs, tl.full((1, 1), r, tl.int64) * stride_xt
        s_p = _load_vector(es_r, rows_p, B)[:, None]
        s_q = _load_vector(es_r, rows_q, B)[None, :]
        t_p = _load_vector(et_r, rows_p, B)[:, None]
        t_q = _load_vector(et_r, rows_q, B)[None, :]
        sqrt_s_p, sqrt_s_q, sqrt_t_p, sqrt_t_q = tl.sqrt(s_p), tl.sqrt(s_q), tl.sqrt(t_p), tl.sqrt(t_q)
        # triplet (p, r, q): anchor r, a = E_pr, b = E_qr, c = E_pq
        cos_s, m1, inv1 = _cosine(s_p, sqrt_s_p, s_q, sqrt_s_q, cs, xs_ptr, ps, qs, rs, mask, Ds, COMPUTE)
        cos_t, _, _ = _cosine(t_p, sqrt_t_p, t_q, sqrt_t_q, ct, xt_ptr, pt, qt, rt, mask, Dt, COMPUTE)
        if GRAD:
            g1 = tl.where(m1, _smooth_l1_grad(cos_s - cos_t, beta), 0.0)
            # triplet (p, q, r): anchor q, a = E_pq, b = E_rq, c = E_pr
            cos2_s, m2, inv2 = _cosine(cs, sqrt_cs, s_q, sqrt_s_q, s_p, xs_ptr, ps, rs, qs, mask, Ds, COMPUTE)
            cos2_t, _, _ = _cosine(ct, sqrt_ct, t_q, sqrt_t_q, t_p, xt_ptr, pt, rt, qt, mask, Dt, COMPUTE)
            g2 = tl.where(m2, _smooth_l1_grad(cos2_s - cos2_t, beta), 0.0)
            dcos2_da = 0.5 * inv2 - 0.5 * cos2_s / tl.where(m2, cs, 1.0)
            acc += -0.5 * g1 * inv1 + 2.0 * g2 * dcos2_da
        else:
            acc += _smooth_l1(cos_s - cos_t, beta)
    acc = tl.where(mask, acc, 0.0)
    if GRAD:
        acc = acc * tl.load(scale_ptr)
        tl.store(out_ptr + rows_p.to(tl.int64)[:, None] * stride + rows_q[None, :], acc, mask=mask)
    else:
        tl.store(out_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(acc))


# --------------------------------------------------------------------------- launchers


def _options(x: Tensor) -> dict:
    return dict(COMPUTE=_tl_compute(x.dtype), DOT_UPCAST=_dot_upcast(x.dtype))


def sq_norms(x: Tensor) -> Tensor:
    """``[B]`` squared row norms of ``x [B, D]`` (compute dtype)."""
    B, D = x.shape
    out = _alloc.empty(B, dtype=_alloc.compute_dtype(x.dtype), device=x.device)
    if B:
        _launch(_sq_norms_kernel, (triton.cdiv(B, BLOCK),), x.device, x, out, B, D, x.stride(0), BLOCK_M=BLOCK,
               BLOCK_K=BLOCK_K, COMPUTE=_tl_compute(x.dtype))
    return out


def _centred(x: Tensor) -> Tensor:
    """``x - mean(x)`` over the batch, in the compute dtype: distances do not see the shift, and
    the Gram form of centred rows cancels only for pairs close relative to the batch's spread
    (those :func:`_squared_distance` recomputes from differences)."""
    c = x.to(_alloc.compute_dtype(x.dtype))
    return c - c.mean(0, keepdim=True)


def affinity_forward(x: Tensor, kind: int) -> Tensor:
    """``[B, B]`` affinity (compute dtype) of the rows of ``x [B, D]`` (rows contiguous)."""
    B, D = x.shape
    out = _alloc.empty(B, B, dtype=_alloc.compute_dtype(x.dtype), device=x.device)
    if B == 0:
        return out
    raw = x
    if kind in (EUCLIDEAN, SQUARED_EUCLIDEAN):
        x = _centred(x)
    norms = sq_norms(x) if kind in (COSINE, EUCLIDEAN, SQUARED_EUCLIDEAN) else out
    block, block_k = (EXACT_BLOCK, EXACT_BLOCK_K) if kind == EXACT_SQUARED else (BLOCK, BLOCK_K)
    grid = (triton.cdiv(B, block), triton.cdiv(B, block))
    _launch(_affinity_kernel, grid, x.device, x, raw, norms, out, B, D, x.stride(0), raw.stride(0), out.stride(0),
            KIND=kind,
           BLOCK_M=block, BLOCK_N=block, BLOCK_K=block_k, **_options(x))
    return out


def _close_tiles(rows: int, B: int, device: torch.device) -> Tensor:
    """The ``[tiles of rows, tiles of B]`` flags of :func:`_flag_close_pairs` (every one written)."""
    return torch.empty(triton.cdiv(rows, BLOCK), triton.cdiv(B, BLOCK), dtype=torch.int32, device=device)


def _apply_weights(w: Tensor, delta: Tensor | None, x: Tensor, out: Tensor, row0: int, dist: bool,
                   close: Tensor | None = None, raw: Tensor | None = None) -> None:
    """Rows row0 + [0, len(w)) of ``out``: GRAM ``w @ x + delta * x`` or DIST ``rowsum(w) * x - w @ x``
    (``close``: the tiles of ``w`` whose DIST terms come from differences of ``raw``, the
    uncentred rows of the centred ``x``)."""
    R, (B, D) = w.shape[0], x.shape
    raw = x if raw is None else raw
    # float64 with the close-pair tiles holds four 64-wide float64 tiles per program: 32 columns
    # (a 64-column tile spilled 40 B per thread on sm_100, tools/aot_check.py)
    block_d = BLOCK // 2 if close is not None and x.dtype == torch.float64 else BLOCK
    grid = (triton.cdiv(R, BLOCK), triton.cdiv(D, block_d))
    _launch(_apply_weights_kernel, grid, x.device, w, w if delta is None else delta, x, raw,
           w if close is None else close, out, row0, R, B, D, w.stride(0), x.stride(0), raw.stride(0), out.stride(0),
           DIST=bool(dist), HAS_DELTA=delta is not None,  # bool: a tl.constexpr(True) is another specialisation
           EXACT_CLOSE=close is not None, BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_D=block_d, DOT_K=APPLY_DOT_K,
           COMPUTE=_tl_compute(x.dtype),
           PRECISION="tf32x3" if x.dtype.itemsize == 2 else "ieee")


def affinity_backward(grad: Tensor, x: Tensor, out: Tensor, kind: int) -> Tensor:
    """``dL/dx [B, D]`` (x dtype) from ``grad = dL/dA [B, B]`` (any strides) and ``out = A``
    (EXACT_SQUARED: the squared_euclidean gradient with the close pairs' terms from differences)."""
    B, D = x.shape
    dx = _alloc.empty(B, D, dtype=x.dtype, device=x.device)
    if B == 0:
        return dx
    cdt = _alloc.compute_dtype(x.dtype)
    w = _alloc.empty(B, B, dtype=cdt, device=x.device)
    delta = _alloc.empty(B, dtype=cdt, device=x.device) if kind == COSINE else None
    dist = kind in (EUCLIDEAN, SQUARED_EUCLIDEAN, EXACT_SQUARED)
    raw = x
    if dist:
        x = _centred(x)
    exact_close = kind in (EUCLIDEAN, EXACT_SQUARED)  # squared_euclidean: W = 2 dA, no large weights
    norms = sq_norms(x) if kind == COSINE or exact_close else w
    close = _close_tiles(B, B, x.device) if exact_close else None
    _launch(
        _affinity_weights_kernel, (triton.cdiv(B, BLOCK),), x.device,
        grad, out, norms, w, w if delta is None else delta, w if close is None else close, B, grad.stride(0),
        grad.stride(1), out.stride(0), w.stride(0), KIND=kind, BLOCK_M=BLOCK, BLOCK_N=BLOCK,
        COMPUTE=_tl_compute(x.dtype))
    _apply_weights(w, delta, x, dx, 0, dist=dist, close=close, raw=raw)
    return dx


def _row_stat(x: Tensor, raw: Tensor, norms: Tensor, loss: int) -> Tensor:
    B, D = x.shape
    out = _alloc.empty(B, dtype=_alloc.compute_dtype(x.dtype), device=x.device)
    _launch(_row_stat_kernel, (triton.cdiv(B, BLOCK),), x.device, x, raw, norms, out, B, D, x.stride(0), raw.stride(0),
            LOSS=loss, BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_K=ROW_STAT_BLOCK_K, **_options(x))
    return out


def _centred_pair(student: Tensor, teacher: Tensor, loss: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(student, teacher, raw student, raw teacher): RKD-D works on the centred rows (and the
    raw ones for the differences of close pairs); SP on the rows themselves."""
    if loss == RKD_DISTANCE:
        return _centred(student), _centred(teacher), student, teacher
    return student, teacher, student, teacher


def _norms_for(student: Tensor, teacher: Tensor, loss: int) -> tuple[Tensor, Tensor]:
    if loss == RKD_DISTANCE:
        return sq_norms(student), sq_norms(teacher)
    return student, teacher  # unused by SP


def relation_forward(student: Tensor, teacher: Tensor, loss: int, beta: float) -> tuple[Tensor, Tensor]:
    """(loss, stats) of SP / RKD-D / RKD-A for ``student [B, Ds]``, ``teacher [B, Dt]`` (same
    dtype, contiguous rows). ``stats`` (compute dtype) is what the backward needs: SP
    ``[3, B]`` = (1/r_s, 1/r_t, B^2/2 c); RKD-D ``[3]`` = (mu_s, mu_t, kappa); RKD-A ``[0]``."""
    if loss == RKD_ANGLE:
        return _angle(student, teacher, beta, None), student.new_empty(0, dtype=_alloc.compute_dtype(student.dtype))
    B = student.shape[0]
    student, teacher, raw_s, raw_t = _centred_pair(student, teacher, loss)
    ns, nt = _norms_for(student, teacher, loss)
    row_s, row_t = _row_stat(student, raw_s, ns, loss), _row_stat(teacher, raw_t, nt, loss)
    if loss == SP:
        stats = torch.stack([1.0 / row_s.sqrt().clamp(min=1e-12), 1.0 / row_t.sqrt().clamp(min=1e-12), row_s])
        divisor = B * B
    else:
        divisor = B * (B - 1)
        stats = torch.stack([row_s.sum() / divisor, row_t.sum() / divisor, row_s.new_zeros(())])
    rows = _alloc.empty(B, dtype=stats.dtype, device=student.device)
    aux = _alloc.empty(B, dtype=stats.dtype, device=student.device)
    # 32-row tiles: at 64 the RKD-D tiles (both models' distances, close pairs recomputed) spilled
    # ~300 B per thread in float64 (Triton 3.9) and 36-64 B in float32 / bf16 (Triton 3.6); the row
    # sums do not depend on the tile
    rows_block = BLOCK // 2
    _launch(
        _relation_loss_kernel, (triton.cdiv(B, rows_block),), student.device,
        student, teacher, raw_s, raw_t, ns, nt, stats, rows, aux, B, student.shape[1], teacher.shape[1],
        student.stride(0), teacher.stride(0), raw_s.stride(0), raw_t.stride(0), beta, LOSS=loss, BLOCK_M=rows_block,
        BLOCK_N=rows_block, BLOCK_K=BLOCK_K, **_options(student))
    if loss == SP:  # c_i = sum_j z_ij u_ij where r_s,i is not clamped (stats[2] held sum_j G_ij^2)
        stats[2] = torch.where(stats[2] > 1e-24, aux, 0.0)
    else:
        stats[2] = aux.sum() / divisor
    return rows.sum() / divisor, stats


def _chunk_rows(B: int, D: int) -> int:
    """Rows per chunk of the backward's pair weights: at most max(B * D, _CHUNK_ELEMENTS) elements."""
    rows = max(B * D, _CHUNK_ELEMENTS) // B // BLOCK * BLOCK
    return min(B, max(BLOCK, rows))


def relation_backward(grad: Tensor, student: Tensor, teacher: Tensor, stats: Tensor, loss: int,
                      beta: float) -> Tensor:
    """``dL/dstudent [B, Ds]`` (student dtype) from the 0-d ``grad`` and ``stats`` of
    :func:`relation_forward`."""
    if loss == RKD_ANGLE:
        return _angle(student, teacher, beta, grad)
    B, Ds = student.shape
    dx = _alloc.empty(B, Ds, dtype=student.dtype, device=student.device)
    student, teacher, raw_s, raw_t = _centred_pair(student, teacher, loss)
    ns, nt = _norms_for(student, teacher, loss)
    chunk = _chunk_rows(B, max(Ds, teacher.shape[1]))
    w = _alloc.empty(chunk, B, dtype=stats.dtype, device=student.device)
    close = _close_tiles(chunk, B, student.device) if loss == RKD_DISTANCE else None
    scale = grad.to(stats.dtype) * (2.0 / (B * B if loss == SP else B * (B - 1)))
    for row0 in range(0, B, chunk):
        R = min(chunk, B - row0)
        _launch(
            _relation_weights_kernel, (triton.cdiv(R, BLOCK), triton.cdiv(B, BLOCK)), student.device,
            student, teacher, raw_s, raw_t, ns, nt, stats, scale, w, w if close is None else close, row0, R, B, Ds,
            teacher.shape[1], student.stride(0), teacher.stride(0), raw_s.stride(0), raw_t.stride(0), w.stride(0), beta,
            LOSS=loss, BLOCK_M=BLOCK,
            BLOCK_N=BLOCK, BLOCK_K=BLOCK_K, **_options(student))
        _apply_weights(w[:R], None, student, dx, row0, dist=loss == RKD_DISTANCE, close=close, raw=raw_s)
    return dx


def _angle(student: Tensor, teacher: Tensor, beta: float, grad: Tensor | None) -> Tensor:
    """RKD-A: the loss (``grad`` None), else ``dL/dstudent`` for the incoming 0-d ``grad``."""
    B = student.shape[0]
    es, et = affinity_forward(student, EXACT_SQUARED), affinity_forward(teacher, EXACT_SQUARED)
    grid = (triton.cdiv(B, ANGLE_BLOCK), triton.cdiv(B, ANGLE_BLOCK))
    if grad is None:  # per-tile partial sums
        out, scale = _alloc.empty(grid[0] * grid[1], dtype=es.dtype, device=es.device), es
    else:  # Delta = dL/dE^s
        out, scale = _alloc.empty(B, B, dtype=es.dtype, device=es.device), grad.to(es.dtype) / B**3
    _launch(_angle_kernel, grid, es.device, es, et, student, teacher, scale, out, B, student.shape[1],
            teacher.shape[1], es.stride(0), student.stride(0), teacher.stride(0), beta, GRAD=grad is not None,
            BLOCK_M=ANGLE_BLOCK, BLOCK_N=ANGLE_BLOCK, COMPUTE=_tl_compute(student.dtype))
    if grad is None:
        return out.sum() / B**3
    del et
    return affinity_backward(out, student, es, EXACT_SQUARED)
