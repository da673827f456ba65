// The relation-based kernels on the GPU (see common/affinity.h; the math and the pass structure
// are those of kdops/backends/triton/affinity.py). Correctness first: 64 x 64 output tiles per block of
// 256 threads (4 x 4 per thread) from 16-wide k steps staged in shared memory, float
// accumulation; per-row and global sums by atomics.
//
//   affinity      one tile per block (Gram, or exact squared differences for RKD-A)
//   SP / RKD-D    pass 1 (per-row sum_j G_ij^2 / the sum of the distances) and pass 2 (loss and
//                 c / kappa) recompute the Gram tiles of student and teacher: nothing [B, B]
//   backward      pair weights W for a chunk of rows (chunk x B, at most max(B * D, 2^22)
//                 elements), then dx_i = sum_j W_ij x_j + delta_i x_i (DIST form: W -> -W, delta
//                 the row sums of W)
//   RKD-A         exact squared distances E [B, B], one thread per (p, q) looping over anchors r
//                 (the cosines of triplets where the law of cosines cancels from the differences)
// Distances (euclidean / squared-euclidean affinities, RKD-D, RKD-A's gradient) use float copies of
// the rows centred by the batch mean (distances do not see it, and the Gram form n_i + n_j - 2 g
// cancels less) and recompute close pairs (common/affinity.h close_pair) from the differences of
// the uncentred rows, forward and backward: a close pair's gradient term W_ij (x_i - x_j) is added
// from the differences (into a [B, D] buffer) instead of through the tile product.
// Scratch memory is stream-ordered (cudaMallocAsync / cudaFreeAsync).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/affinity.h"
#include "common/codes.h"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "cuda/block_reduce.cuh"

namespace kdops {
namespace {

constexpr int kT = 64;         // tile rows / columns
constexpr int kK = 16;         // k step staged in shared memory
constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int64_t kChunkElements = int64_t(1) << 22;
constexpr int EXACT_SQUARED = 4;  // internal affinity kind (RKD-A)

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("kdops CUDA ") + what + ": " + cudaGetErrorString(err));
}

int64_t blocks_of(int64_t n, int64_t b) { return (n + b - 1) / b; }

// Stream-ordered scratch of n floats.
struct Scratch {
  float* ptr = nullptr;
  cudaStream_t stream;
  Scratch(size_t n, cudaStream_t s) : stream(s) {
    check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&ptr), std::max<size_t>(n, 1) * sizeof(float), s),
               "scratch allocation");
    check_cuda(cudaMemsetAsync(ptr, 0, std::max<size_t>(n, 1) * sizeof(float), s), "scratch zeroing");
  }
  ~Scratch() { cudaFreeAsync(ptr, stream); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// ---- tiles ----

// acc[r][c] += sum_k op(a(ty + 16 r, k), b(tx + 16 c, k)) for k < K, op = product (Gram) or
// squared difference (DIFF); a(m, k) / b(n, k) return 0 outside the operands.
template <bool DIFF, typename LA, typename LB>
__device__ __forceinline__ void tile_accumulate(int64_t K, LA a, LB b, float (&acc)[4][4]) {
  __shared__ float sa[kK][kT + 1];
  __shared__ float sb[kK][kT + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  for (int64_t k0 = 0; k0 < K; k0 += kK) {
    for (int e = tid; e < kT * kK; e += kThreads) {
      const int m = e / kK, k = e % kK;
      sa[k][m] = a(m, k0 + k);
      sb[k][m] = b(m, k0 + k);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kK; ++k) {
      float av[4], bv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        av[r] = sa[k][ty + 16 * r];
        bv[r] = sb[k][tx + 16 * r];
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (DIFF) {
            const float d = av[r] - bv[c];
            acc[r][c] = fmaf(d, d, acc[r][c]);
          } else {
            acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
          }
        }
      }
    }
    __syncthreads();
  }
}

// A loader of rows [row0, row0 + kT) of x [B, D] (row stride `stride`).
template <typename T>
struct Rows {
  const T* x;
  int64_t batch, dim, stride, row0;
  __device__ __forceinline__ float operator()(int m, int64_t k) const {
    const int64_t i = row0 + m;
    return i < batch && k < dim ? to_acc(x[i * stride + k]) : 0.f;
  }
};

// The Gram (or, with DIFF, exact squared distance) tile of rows i0 x rows j0.
template <bool DIFF, typename T>
__device__ __forceinline__ void gram(const T* x, int64_t B, int64_t D, int64_t stride, int64_t i0, int64_t j0,
                                     float (&g)[4][4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
#pragma unroll
    for (int c = 0; c < 4; ++c) g[r][c] = 0.f;
  }
  tile_accumulate<DIFF>(D, Rows<T>{x, B, D, stride, i0}, Rows<T>{x, B, D, stride, j0}, g);
}

__device__ __forceinline__ float inv_norm(float sq) { return 1.f / fmaxf(sqrtf(sq), float(kNormEps)); }

// sum_k (x_ik - x_jk)^2 of rows i, j of x (row stride `stride`): exact for close rows.
template <typename T>
__device__ float squared_difference(const T* x, int64_t stride, int64_t D, int64_t i, int64_t j) {
  float acc = 0.f;
  for (int64_t k = 0; k < D; ++k) {
    const float d = float(to_acc(x[i * stride + k])) - float(to_acc(x[j * stride + k]));
    acc = fmaf(d, d, acc);
  }
  return acc;
}

// The squared distance of rows i, j from the Gram entry g of the centred rows and their squared
// norms: max(n_i + n_j - 2 g, 0), except close pairs (i != j; *close set), recomputed from the
// uncentred float rows `raw` (row stride D).
__device__ __forceinline__ float squared_distance(float g, float n_i, float n_j, const float* raw, int64_t D,
                                                  int64_t i, int64_t j, bool* close = nullptr) {
  const float d2 = fmaxf(n_i + n_j - 2.f * g, 0.f);
  const bool recompute = i != j && close_pair(d2, n_i, n_j);
  if (close != nullptr) *close = recompute;
  return recompute ? squared_difference(raw, D, D, i, j) : d2;
}

// d_ij = sqrt(max(d2, 1e-12)), 0 on the diagonal; live: the gradient flows (i != j and d2 > 1e-12).
__device__ __forceinline__ float distance_of(float d2, bool same, bool* live = nullptr) {
  if (live != nullptr) *live = !same && d2 > float(kDistEps2);
  return same ? 0.f : sqrtf(fmaxf(d2, float(kDistEps2)));
}

// extra[i] += w (raw_i - raw_j): a close pair's DIST term, from the differences of the rows.
__device__ __forceinline__ void add_pair_term(float* extra, const float* raw, int64_t D, int64_t i, int64_t j,
                                              float w) {
  for (int64_t k = 0; k < D; ++k) atomicAdd(extra + i * D + k, w * (raw[i * D + k] - raw[j * D + k]));
}

// The cosine at anchor w between x_u - x_w and x_v - x_w (squared lengths a, b; c = ||x_u - x_v||^2;
// inv_ab = 1 / sqrt(a b), 0 when masked): the law of cosines, or where it cancels (skewed) the
// normalised dot of the differences of the rows of x (row stride `stride`).
template <typename T>
__device__ float cosine(float a, float b, float c, float inv_ab, const T* x, int64_t stride, int64_t D, int64_t u,
                        int64_t v, int64_t w) {
  if (!skewed(a, b, inv_ab)) return law_of_cosines(a, b, c, inv_ab);
  float dot = 0.f;
  for (int64_t k = 0; k < D; ++k) {
    const float xw = to_acc(x[w * stride + k]);
    dot = fmaf(float(to_acc(x[u * stride + k])) - xw, float(to_acc(x[v * stride + k])) - xw, dot);
  }
  return dot * inv_ab;
}

// ---- kernels ----

template <typename T>
__global__ void sq_norms_kernel(const T* x, int64_t B, int64_t D, int64_t stride, float* out) {
  const int64_t i = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (i >= B) return;
  float acc = 0.f;
  for (int64_t k = threadIdx.x % 32; k < D; k += 32) {
    const float v = to_acc(x[i * stride + k]);
    acc = fmaf(v, v, acc);
  }
  for (int m = 16; m > 0; m /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, m);
  if (threadIdx.x % 32 == 0) out[i] = acc;
}

// out[i][k] = x_ik as float (out [B, D], row stride D).
template <typename T>
__global__ void to_float_kernel(const T* x, int64_t B, int64_t D, int64_t stride, float* out) {
  const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e < B * D) out[e] = to_acc(x[(e / D) * stride + e % D]);
}

// mean[k] = the mean of column k of x [B, D] (row stride D).
__global__ void column_means_kernel(const float* x, int64_t B, int64_t D, float* mean) {
  const int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= D) return;
  float acc = 0.f;
  for (int64_t i = 0; i < B; ++i) acc += x[i * D + k];
  mean[k] = acc / float(B);
}

// out[i][k] = x_ik - mean[k] (x, out [B, D], row stride D).
__global__ void centre_kernel(const float* x, int64_t B, int64_t D, const float* mean, float* out) {
  const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e < B * D) out[e] = x[e] - mean[e % D];
}

// One tile of the affinity; DIST kinds take x = the centred float rows (norms theirs) and `raw`
// (the uncentred ones, row stride D) for the close pairs.
template <typename T>
__global__ void affinity_kernel(const T* x, const float* raw, const float* norms, float* out, int64_t B, int64_t D,
                                int64_t stride, int64_t so, int kind) {
  const int64_t i0 = int64_t(blockIdx.y) * kT, j0 = int64_t(blockIdx.x) * kT;
  float g[4][4];
  if (kind == EXACT_SQUARED) {
    gram<true>(x, B, D, stride, i0, j0, g);
  } else {
    gram<false>(x, B, D, stride, i0, j0, g);
  }
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int r = 0; r < 4; ++r) {
    const int64_t i = i0 + ty + 16 * r;
    if (i >= B) continue;
    for (int c = 0; c < 4; ++c) {
      const int64_t j = j0 + tx + 16 * c;
      if (j >= B) continue;
      float a = g[r][c];
      if (kind == kCosine) {
        a *= inv_norm(norms[i]) * inv_norm(norms[j]);
      } else if (kind == kEuclidean) {
        a = distance_of(squared_distance(a, norms[i], norms[j], raw, D, i, j), i == j);
      } else if (kind == kSquaredEuclidean) {
        a = i == j ? 0.f : squared_distance(a, norms[i], norms[j], raw, D, i, j);
      }
      out[i * so + j] = a;
    }
  }
}

// Pair weights of the affinity gradient: w [B, B] (GRAM form: DIST kinds store -W and add the row
// sums of W to delta, except close pairs, whose W_ij (x_i - x_j) goes to extra from the rows `raw`
// [B, D] (norms: of the centred rows); cosine adds -sum_j S_ij A_ij / r_i^2 to delta).
__global__ void affinity_weights_kernel(const float* grad, int64_t sg0, int64_t sg1, const float* aff, int64_t sa,
                                        const float* norms, const float* raw, int64_t D, int64_t B, int kind,
                                        float* w, float* delta, float* extra) {
  const int64_t j = int64_t(blockIdx.x) * 16 + threadIdx.x % 16;
  const int64_t i = int64_t(blockIdx.y) * 16 + threadIdx.x / 16;
  if (i >= B || j >= B) return;
  const float s = grad[i * sg0 + j * sg1] + grad[j * sg0 + i * sg1];
  float wij = s;
  if (kind == kCosine) {
    wij = s * inv_norm(norms[i]) * inv_norm(norms[j]);
    if (norms[i] > float(kNormEps2)) atomicAdd(delta + i, -s * aff[i * sa + j] / norms[i]);
  } else if (kind == kSquaredEuclidean || kind == kEuclidean) {
    const float a = aff[i * sa + j];
    const float v = i == j ? 0.f : kind == kSquaredEuclidean ? 2.f * s : (a * a > float(kDistEps2) ? s / a : 0.f);
    if (v != 0.f && close_pair(kind == kEuclidean ? a * a : a, norms[i], norms[j])) {
      add_pair_term(extra, raw, D, i, j, v);
      wij = 0.f;
    } else {
      atomicAdd(delta + i, v);
      wij = -v;
    }
  }
  w[i * B + j] = wij;
}

// dx rows row0 + [0, R): sum_j w[r][j] x_j (+ delta * x) (+ extra), w [R, B] (row stride B), extra
// [B, D] (the close pairs' terms).
template <typename X, typename T>
__global__ void apply_kernel(const float* w, int64_t R, int64_t row0, const X* x, int64_t B, int64_t D,
                             int64_t stride, const float* delta, const float* extra, T* dx) {
  const int64_t r0 = int64_t(blockIdx.y) * kT, d0 = int64_t(blockIdx.x) * kT;
  float acc[4][4] = {};
  const auto load_w = [=](int m, int64_t k) {
    const int64_t r = r0 + m;
    return r < R && k < B ? w[r * B + k] : 0.f;
  };
  const auto load_x = [=](int n, int64_t k) {
    const int64_t d = d0 + n;
    return k < B && d < D ? float(to_acc(x[k * stride + d])) : 0.f;
  };
  tile_accumulate<false>(B, load_w, load_x, acc);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int r = 0; r < 4; ++r) {
    const int64_t row = r0 + ty + 16 * r;
    if (row >= R) continue;
    const int64_t i = row0 + row;
    for (int c = 0; c < 4; ++c) {
      const int64_t d = d0 + tx + 16 * c;
      if (d >= D) continue;
      float v = acc[r][c];
      if (delta != nullptr) v = fmaf(delta[i], float(to_acc(x[i * stride + d])), v);
      if (extra != nullptr) v += extra[i * D + d];
      dx[i * D + d] = from_acc<T>(v);
    }
  }
}

// Pass 1 of one model: SP row_sums[i] += sum_j G_ij^2; RKD-D total += sum_j d_ij (x: the centred
// float rows, raw: the uncentred ones).
template <typename T>
__global__ void row_stat_kernel(const T* x, const float* raw, const float* norms, int64_t B, int64_t D,
                                int64_t stride, int loss, float* row_sums, float* total) {
  const int64_t i0 = int64_t(blockIdx.y) * kT, j0 = int64_t(blockIdx.x) * kT;
  float g[4][4];
  gram<false>(x, B, D, stride, i0, j0, g);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float block_part = 0.f;
  for (int r = 0; r < 4; ++r) {
    const int64_t i = i0 + ty + 16 * r;
    float row = 0.f;
    for (int c = 0; c < 4; ++c) {
      const int64_t j = j0 + tx + 16 * c;
      if (i >= B || j >= B) continue;
      row += loss == kSP ? g[r][c] * g[r][c]
                         : distance_of(squared_distance(g[r][c], norms[i], norms[j], raw, D, i, j), i == j);
    }
    if (loss == kSP && i < B) atomicAdd(row_sums + i, row);
    block_part += row;
  }
  if (loss == kRKDDistance) {
    block_part = block_sum(block_part);
    if (threadIdx.x == 0) atomicAdd(total, block_part);
  }
}

// Pass 2: SP loss total += sum z^2, aux[i] += sum_j z_ij u_ij; RKD-D loss total += sum h(z),
// aux[0] += sum h'(z) u. stats: SP (1/r_s, 1/r_t); RKD-D sums: (sum d^s, sum d^t).
template <typename T>
__global__ void relation_loss_kernel(const T* xs, const T* xt, const float* raw_s, const float* raw_t,
                                     const float* ns, const float* nt, int64_t B, int64_t Ds, int64_t Dt, int64_t ss,
                                     int64_t st, int loss, float beta, const float* stats, float* total, float* aux) {
  const int64_t i0 = int64_t(blockIdx.y) * kT, j0 = int64_t(blockIdx.x) * kT;
  float gs[4][4], gt[4][4];
  gram<false>(xs, B, Ds, ss, i0, j0, gs);
  gram<false>(xt, B, Dt, st, i0, j0, gt);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const float pairs = float(B) * float(B - 1);
  float part = 0.f, aux_part = 0.f;
  for (int r = 0; r < 4; ++r) {
    const int64_t i = i0 + ty + 16 * r;
    float row_aux = 0.f;
    for (int c = 0; c < 4; ++c) {
      const int64_t j = j0 + tx + 16 * c;
      if (i >= B || j >= B) continue;
      if (loss == kSP) {
        const float u = gs[r][c] * stats[i], z = u - gt[r][c] * stats[B + i];
        part += z * z;
        row_aux += z * u;
      } else {
        const float u = distance_of(squared_distance(gs[r][c], ns[i], ns[j], raw_s, Ds, i, j), i == j) /
                        (stats[0] / pairs);
        const float z =
            u - distance_of(squared_distance(gt[r][c], nt[i], nt[j], raw_t, Dt, i, j), i == j) / (stats[1] / pairs);
        part += smooth_l1(z, beta);
        row_aux += smooth_l1_grad(z, beta) * u;
      }
    }
    if (loss == kSP && i < B) atomicAdd(aux + i, row_aux);
    aux_part += row_aux;
  }
  part = block_sum(part);
  if (threadIdx.x == 0) atomicAdd(total, part);
  if (loss == kRKDDistance) {
    aux_part = block_sum(aux_part);
    if (threadIdx.x == 0) atomicAdd(aux, aux_part);
  }
}

// SP after pass 1: stats rows 0, 1 = 1 / max(r, eps).
__global__ void sp_inverse_norms_kernel(const float* rs, const float* rt, int64_t B, float* stats) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= B) return;
  stats[i] = inv_norm(rs[i]);
  stats[B + i] = inv_norm(rt[i]);
}

// The loss and the stats for the backward (see RelationParams).
__global__ void relation_finalize_kernel(int loss, int64_t B, const float* rs, const float* sums, const float* total,
                                         const float* aux, float* stats, float* loss_out) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (loss == kSP) {
    if (i < B) stats[2 * B + i] = rs[i] > float(kNormEps2) ? aux[i] : 0.f;
    if (i == 0) *loss_out = *total / (float(B) * float(B));
  } else if (i == 0) {
    const float pairs = float(B) * float(B - 1);
    stats[0] = sums[0] / pairs;
    stats[1] = sums[1] / pairs;
    stats[2] = aux[0] / pairs;
    *loss_out = *total / pairs;
  }
}

// Pair weights of rows row0 + [0, R) of SP / RKD-D, times scale = grad * 2 / (B^2 or P), into
// w [R, B]; RKD-D in GRAM form (-W, row sums of W added to delta), close pairs' W_ij (x_i - x_j)
// into extra [B, Ds] from the uncentred rows raw_s.
template <typename T>
__global__ void relation_weights_kernel(const T* xs, const T* xt, const float* raw_s, const float* raw_t,
                                        const float* ns, const float* nt, int64_t B, int64_t Ds, int64_t Dt,
                                        int64_t ss, int64_t st, int loss, float beta, const float* stats,
                                        const float* grad, int64_t row0, int64_t R, float* w, float* delta,
                                        float* extra) {
  const int64_t i0 = row0 + int64_t(blockIdx.y) * kT, j0 = int64_t(blockIdx.x) * kT;
  float gs[4][4], gt[4][4];
  gram<false>(xs, B, Ds, ss, i0, j0, gs);
  gram<false>(xt, B, Dt, st, i0, j0, gt);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const float scale = *grad * 2.f / (loss == kSP ? float(B) * float(B) : float(B) * float(B - 1));
  for (int r = 0; r < 4; ++r) {
    const int64_t i = i0 + ty + 16 * r;
    if (i >= row0 + R || i >= B) continue;
    float row = 0.f;
    for (int c = 0; c < 4; ++c) {
      const int64_t j = j0 + tx + 16 * c;
      if (j >= B) continue;
      const float g = gs[r][c], h = gt[r][c];
      float v;
      if (loss == kSP) {
        const float *inv_rs = stats, *inv_rt = stats + B, *cc = stats + 2 * B;
        const float u_ij = g * inv_rs[i], u_ji = g * inv_rs[j];
        v = scale * ((u_ij - h * inv_rt[i] - cc[i] * u_ij) * inv_rs[i] + (u_ji - h * inv_rt[j] - cc[j] * u_ji) * inv_rs[j]);
      } else {
        bool live, close;
        const float ds = distance_of(squared_distance(g, ns[i], ns[j], raw_s, Ds, i, j, &close), i == j, &live);
        const float dt = distance_of(squared_distance(h, nt[i], nt[j], raw_t, Dt, i, j), i == j);
        const float z = ds / stats[0] - dt / stats[1];
        const float wij = live ? scale * (smooth_l1_grad(z, beta) - stats[2]) / (stats[0] * ds) : 0.f;
        if (close && wij != 0.f) {
          add_pair_term(extra, raw_s, Ds, i, j, wij);
          v = 0.f;
        } else {
          row += wij;
          v = -wij;
        }
      }
      w[(i - row0) * B + j] = v;
    }
    if (loss == kRKDDistance) atomicAdd(delta + i, row);
  }
}

// RKD-A over (p, q) = one thread each and every anchor r, from the exact squared distances (and
// the rows xs, xt for the cosines that cancel: cosine()).
// Forward: total += sum h(cos^s_prq - cos^t_prq). GRAD: delta_out[p][q] = grad / B^3 *
// sum_r angle_delta_term (common/affinity.h).
template <bool GRAD, typename T>
__global__ void angle_kernel(const float* es, const float* et, const T* xs, const T* xt, int64_t B, int64_t Ds,
                             int64_t Dt, int64_t ss, int64_t st, float beta, const float* grad, float* out) {
  const int64_t q = int64_t(blockIdx.x) * 16 + threadIdx.x % 16;
  const int64_t p = int64_t(blockIdx.y) * 16 + threadIdx.x / 16;
  float acc = 0.f;
  if (p < B && q < B) {
    const auto inv_sqrt = [](float e) { return e > float(kNormEps2) ? rsqrtf(e) : 0.f; };
    const float cs = es[p * B + q], ct = et[p * B + q];
    const float ics = inv_sqrt(cs), ict = inv_sqrt(ct);
    for (int64_t r = 0; r < B; ++r) {
      const float as = es[p * B + r], at = et[p * B + r];  // E_pr
      const float bs = es[r * B + q], bt = et[r * B + q];  // E_qr
      const float ias = inv_sqrt(as), iat = inv_sqrt(at), ibs = inv_sqrt(bs), ibt = inv_sqrt(bt);
      // triplet (p, r, q): anchor r, a = E_pr, b = E_qr, c = E_pq
      const float inv1 = ias * ibs;
      const float cos1_s = cosine(as, bs, cs, inv1, xs, ss, Ds, p, q, r);
      const float cos1_t = cosine(at, bt, ct, iat * ibt, xt, st, Dt, p, q, r);
      if (!GRAD) {
        acc += smooth_l1(cos1_s - cos1_t, beta);
      } else {
        // triplet (p, q, r): anchor q, a = E_pq, b = E_rq, c = E_pr
        const float inv2 = ics * ibs;
        const float cos2_s = cosine(cs, bs, as, inv2, xs, ss, Ds, p, r, q);
        const float cos2_t = cosine(ct, bt, at, ict * ibt, xt, st, Dt, p, r, q);
        acc += angle_delta_term(inv1, cos1_s, cos1_t, inv2, ics, cos2_s, cos2_t, beta);
      }
    }
  }
  const float cube = float(B) * float(B) * float(B);
  if (GRAD) {
    if (p < B && q < B) out[p * B + q] = acc * (*grad / cube);
  } else {
    acc = block_sum(acc);
    if (threadIdx.x == 0) atomicAdd(out, acc / cube);
  }
}

__global__ void copy_scalar_kernel(const float* from, float* to) { *to = *from; }

// ---- launchers ----

template <typename T>
void sq_norms(const T* x, int64_t B, int64_t D, int64_t stride, float* out, cudaStream_t s) {
  sq_norms_kernel<T><<<unsigned(blocks_of(B, kThreads / 32)), kThreads, 0, s>>>(x, B, D, stride, out);
}

dim3 tiles(int64_t rows, int64_t cols) { return dim3(unsigned(blocks_of(cols, kT)), unsigned(blocks_of(rows, kT))); }

// The rows of x [B, D] as distances use them, in stream-ordered scratch: raw (float, row stride
// D), centred (raw minus the batch mean) and the centred rows' squared norms.
struct DistanceRows {
  Scratch data;
  float *raw, *centred, *norms;
  template <typename T>
  DistanceRows(const T* x, int64_t B, int64_t D, int64_t stride, cudaStream_t s)
      : data(2 * size_t(B) * size_t(D) + size_t(D) + size_t(B), s) {
    raw = data.ptr;
    centred = raw + B * D;
    float* mean = centred + B * D;
    norms = mean + D;
    to_float_kernel<T><<<unsigned(blocks_of(B * D, kThreads)), kThreads, 0, s>>>(x, B, D, stride, raw);
    column_means_kernel<<<unsigned(blocks_of(D, kThreads)), kThreads, 0, s>>>(raw, B, D, mean);
    centre_kernel<<<unsigned(blocks_of(B * D, kThreads)), kThreads, 0, s>>>(raw, B, D, mean, centred);
    sq_norms(static_cast<const float*>(centred), B, D, D, norms, s);
  }
};

bool is_distance(int kind) { return kind == kEuclidean || kind == kSquaredEuclidean; }

template <typename T>
void affinity_into(const T* x, int64_t B, int64_t D, int64_t stride, int kind, float* out, int64_t so,
                   cudaStream_t s) {
  if (is_distance(kind)) {
    const DistanceRows rows(x, B, D, stride, s);
    affinity_kernel<float><<<tiles(B, B), kThreads, 0, s>>>(rows.centred, rows.raw, rows.norms, out, B, D, D, so,
                                                            kind);
    return;
  }
  Scratch norms(B, s);
  if (kind == kCosine) sq_norms(x, B, D, stride, norms.ptr, s);
  affinity_kernel<T><<<tiles(B, B), kThreads, 0, s>>>(x, nullptr, norms.ptr, out, B, D, stride, so, kind);
}

template <typename T>
void affinity_gradient(const float* grad, int64_t sg0, int64_t sg1, const T* x, const float* aff, int64_t sa,
                       T* dx, int64_t B, int64_t D, int64_t stride, int kind, cudaStream_t s) {
  Scratch delta(B, s), w(size_t(B) * size_t(B), s);
  const dim3 grid(unsigned(blocks_of(B, 16)), unsigned(blocks_of(B, 16)));
  if (is_distance(kind)) {  // DIST form on the centred rows, close pairs from the raw ones
    const DistanceRows rows(x, B, D, stride, s);
    Scratch extra(size_t(B) * size_t(D), s);
    affinity_weights_kernel<<<grid, kThreads, 0, s>>>(grad, sg0, sg1, aff, sa, rows.norms, rows.raw, D, B, kind,
                                                      w.ptr, delta.ptr, extra.ptr);
    apply_kernel<float, T><<<tiles(B, D), kThreads, 0, s>>>(w.ptr, B, 0, rows.centred, B, D, D, delta.ptr,
                                                            extra.ptr, dx);
    return;
  }
  Scratch norms(B, s);
  if (kind == kCosine) sq_norms(x, B, D, stride, norms.ptr, s);
  affinity_weights_kernel<<<grid, kThreads, 0, s>>>(grad, sg0, sg1, aff, sa, norms.ptr, nullptr, D, B, kind, w.ptr,
                                                    delta.ptr, nullptr);
  apply_kernel<T, T><<<tiles(B, D), kThreads, 0, s>>>(w.ptr, B, 0, x, B, D, stride,
                                                      kind == kCosine ? delta.ptr : nullptr, nullptr, dx);
}

// RKD-A: the loss (grad == nullptr) into loss_out, else dL/dstudent into dx.
template <typename T>
void rkd_angle(const RelationParams& p, const float* grad, cudaStream_t s) {
  const int64_t B = p.batch, Ds = p.student_dim, Dt = p.teacher_dim;
  const T* xs = static_cast<const T*>(p.student);
  const T* xt = static_cast<const T*>(p.teacher);
  Scratch es(size_t(B) * size_t(B), s), out(grad == nullptr ? 1 : size_t(B) * size_t(B), s);
  {
    Scratch et(size_t(B) * size_t(B), s);
    affinity_into(xs, B, Ds, p.student_stride, EXACT_SQUARED, es.ptr, B, s);
    affinity_into(xt, B, Dt, p.teacher_stride, EXACT_SQUARED, et.ptr, B, s);
    const dim3 grid(unsigned(blocks_of(B, 16)), unsigned(blocks_of(B, 16)));
    if (grad == nullptr) {
      angle_kernel<false, T><<<grid, kThreads, 0, s>>>(es.ptr, et.ptr, xs, xt, B, Ds, Dt, p.student_stride,
                                                       p.teacher_stride, float(p.beta), nullptr, out.ptr);
    } else {
      angle_kernel<true, T><<<grid, kThreads, 0, s>>>(es.ptr, et.ptr, xs, xt, B, Ds, Dt, p.student_stride,
                                                      p.teacher_stride, float(p.beta), grad, out.ptr);
    }
  }
  if (grad == nullptr) {
    copy_scalar_kernel<<<1, 1, 0, s>>>(out.ptr, static_cast<float*>(p.loss_out));
  } else {  // Delta = dL/dE^s: the squared-euclidean gradient (its close pairs from differences)
    affinity_gradient(out.ptr, B, 1, xs, es.ptr, B, static_cast<T*>(p.dx), B, Ds, p.student_stride,
                      kSquaredEuclidean, s);
  }
}

// SP (G = xs / xt themselves, raw unused) and RKD-D (G = the centred float rows, raw the
// uncentred ones): passes 1 and 2 and the finalisation.
template <typename G>
void relation_passes(const RelationParams& p, const G* xs, const G* xt, int64_t ss, int64_t st, const float* raw_s,
                     const float* raw_t, const float* ns, const float* nt, cudaStream_t s) {
  const int64_t B = p.batch, Ds = p.student_dim, Dt = p.teacher_dim;
  float* stats = static_cast<float*>(p.stats);
  // scratch: rs, rt, aux [B each]; sums [2]; total [1]
  Scratch scratch(3 * size_t(B) + 3, s);
  float *rs = scratch.ptr, *rt = rs + B, *aux = rt + B, *sums = aux + B, *total = sums + 2;
  const bool sp = p.loss == kSP;
  row_stat_kernel<G><<<tiles(B, B), kThreads, 0, s>>>(xs, raw_s, ns, B, Ds, ss, p.loss, rs, sums);
  row_stat_kernel<G><<<tiles(B, B), kThreads, 0, s>>>(xt, raw_t, nt, B, Dt, st, p.loss, rt, sums + 1);
  if (sp) sp_inverse_norms_kernel<<<unsigned(blocks_of(B, kThreads)), kThreads, 0, s>>>(rs, rt, B, stats);
  relation_loss_kernel<G><<<tiles(B, B), kThreads, 0, s>>>(xs, xt, raw_s, raw_t, ns, nt, B, Ds, Dt, ss, st, p.loss,
                                                           float(p.beta), sp ? stats : sums, total, aux);
  relation_finalize_kernel<<<unsigned(blocks_of(B, kThreads)), kThreads, 0, s>>>(
      p.loss, B, rs, sums, total, aux, stats, static_cast<float*>(p.loss_out));
}

template <typename T>
void relation_forward(const RelationParams& p, cudaStream_t s) {
  const T* xs = static_cast<const T*>(p.student);
  const T* xt = static_cast<const T*>(p.teacher);
  if (p.loss == kRKDAngle) return rkd_angle<T>(p, nullptr, s);
  if (p.loss == kSP) return relation_passes(p, xs, xt, p.student_stride, p.teacher_stride, nullptr, nullptr,
                                            nullptr, nullptr, s);
  const DistanceRows rs(xs, p.batch, p.student_dim, p.student_stride, s);
  const DistanceRows rt(xt, p.batch, p.teacher_dim, p.teacher_stride, s);
  relation_passes<float>(p, rs.centred, rt.centred, p.student_dim, p.teacher_dim, rs.raw, rt.raw, rs.norms, rt.norms,
                         s);
}

// The chunked backward of SP / RKD-D (G, raw: as relation_passes; x: the student for the apply,
// the centred rows for RKD-D's DIST form; extra [B, Ds] the close pairs' terms of RKD-D).
template <typename G, typename T>
void relation_weights_and_apply(const RelationParams& p, const G* xs, const G* xt, int64_t ss, int64_t st,
                                const float* raw_s, const float* raw_t, const float* ns, const float* nt,
                                float* extra, cudaStream_t s) {
  const int64_t B = p.batch, Ds = p.student_dim, Dt = p.teacher_dim;
  const bool sp = p.loss == kSP;
  const int64_t chunk = std::min(B, std::max<int64_t>(kT, std::max(B * std::max(Ds, Dt), kChunkElements) / B / kT * kT));
  Scratch delta(size_t(B), s), w(size_t(chunk) * size_t(B), s);
  const float* stats = static_cast<const float*>(p.stats);
  const float* grad = static_cast<const float*>(p.grad);
  for (int64_t row0 = 0; row0 < B; row0 += chunk) {
    const int64_t R = std::min(chunk, B - row0);
    relation_weights_kernel<G><<<tiles(R, B), kThreads, 0, s>>>(xs, xt, raw_s, raw_t, ns, nt, B, Ds, Dt, ss, st,
                                                                p.loss, float(p.beta), stats, grad, row0, R, w.ptr,
                                                                delta.ptr, extra);
    apply_kernel<G, T><<<tiles(R, Ds), kThreads, 0, s>>>(w.ptr, R, row0, xs, B, Ds, ss, sp ? nullptr : delta.ptr,
                                                         extra, static_cast<T*>(p.dx));
  }
}

template <typename T>
void relation_backward(const RelationParams& p, cudaStream_t s) {
  const T* xs = static_cast<const T*>(p.student);
  const T* xt = static_cast<const T*>(p.teacher);
  if (p.loss == kRKDAngle) return rkd_angle<T>(p, static_cast<const float*>(p.grad), s);
  if (p.loss == kSP) {
    return relation_weights_and_apply<T, T>(p, xs, xt, p.student_stride, p.teacher_stride, nullptr, nullptr, nullptr,
                                            nullptr, nullptr, s);
  }
  const DistanceRows rs(xs, p.batch, p.student_dim, p.student_stride, s);
  const DistanceRows rt(xt, p.batch, p.teacher_dim, p.teacher_stride, s);
  Scratch extra(size_t(p.batch) * size_t(p.student_dim), s);
  relation_weights_and_apply<float, T>(p, rs.centred, rt.centred, p.student_dim, p.teacher_dim, rs.raw, rt.raw,
                                       rs.norms, rt.norms, extra.ptr, s);
}

// Runs f(Type<T>{}) for the dtype code (float32, float16, bfloat16), then checks the launches.
template <typename F>
void launch_checked(int dtype, const char* fn, F&& f) {
  with_dtype<false>(dtype, f);
  check_cuda(cudaGetLastError(), fn);
}

}  // namespace

void affinity_forward_cuda(const AffinityParams& p, uintptr_t stream) {
  if (p.batch == 0) return;
  launch_checked(p.dtype, "affinity_forward_cuda", [&](auto type) {
    using T = typename decltype(type)::type;
    affinity_into(static_cast<const T*>(p.x), p.batch, p.dim, p.x_stride, p.kind, static_cast<float*>(p.out),
                  p.out_stride, reinterpret_cast<cudaStream_t>(stream));
  });
}

void affinity_backward_cuda(const AffinityParams& p, uintptr_t stream) {
  if (p.batch == 0) return;
  launch_checked(p.dtype, "affinity_backward_cuda", [&](auto type) {
    using T = typename decltype(type)::type;
    affinity_gradient(static_cast<const float*>(p.grad), p.grad_stride0, p.grad_stride1, static_cast<const T*>(p.x),
                      static_cast<const float*>(p.affinity), p.out_stride, static_cast<T*>(p.dx), p.batch, p.dim,
                      p.x_stride, p.kind, reinterpret_cast<cudaStream_t>(stream));
  });
}

void relation_forward_cuda(const RelationParams& p, uintptr_t stream) {
  launch_checked(p.dtype, "relation_forward_cuda", [&](auto type) {
    relation_forward<typename decltype(type)::type>(p, reinterpret_cast<cudaStream_t>(stream));
  });
}

void relation_backward_cuda(const RelationParams& p, uintptr_t stream) {
  launch_checked(p.dtype, "relation_backward_cuda", [&](auto type) {
    relation_backward<typename decltype(type)::type>(p, reinterpret_cast<cudaStream_t>(stream));
  });
}

}  // namespace kdops
