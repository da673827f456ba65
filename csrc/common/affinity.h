// The interface of the relation-based kernels (affinities, SP, RKD distance, RKD angle) on the
// CPU and the GPU, used by the bindings. The math is that of kdops/backends/triton/affinity.py (module
// docstring): Gram tiles G = X X^T recomputed instead of stored, pair weights W applied as
// dx_i = sum_j W_ij x_j + delta_i x_i.
#pragma once

#include <cstdint>

#include "common/codes.h"
#include "common/macros.h"

namespace kdops {

// Features x [B, D] (dtype, rows strided, elements contiguous); "acc" is the accumulation type:
// double for kFloat64 inputs, float otherwise. Pointers are device pointers for the CUDA kernels.
struct AffinityParams {
  const void* x;           // [B, D] features, dtype
  int64_t batch, dim, x_stride;
  int dtype;               // DType (common/codes.h)
  int kind;                // AffinityKind
  void* out;               // forward: [B, B] affinity, acc, row stride out_stride
  int64_t out_stride;
  const void* grad;        // backward: dL/dA [B, B], acc, strides grad_stride0 / 1 (may be 0)
  int64_t grad_stride0, grad_stride1;
  const void* affinity;    // backward: the forward's A (row stride out_stride)
  void* dx;                // backward: [B, D] dL/dx, dtype, contiguous
};

struct RelationParams {
  const void* student;     // [B, Ds], dtype
  const void* teacher;     // [B, Dt], dtype (a constant)
  int64_t batch, student_dim, teacher_dim, student_stride, teacher_stride;
  int dtype;
  int loss;                // RelationLoss
  double beta;             // smooth-L1 parameter (RKD)
  void* loss_out;          // forward: the 0-d loss, acc
  void* stats;             // acc; SP [3, B] (1/r_s, 1/r_t, c); RKD-D [3] (mu_s, mu_t, kappa); RKD-A none
  const void* grad;        // backward: the incoming 0-d gradient, acc
  void* dx;                // backward: [B, Ds] dL/dstudent, dtype, contiguous
};

void affinity_forward_cpu(const AffinityParams& p);
void affinity_backward_cpu(const AffinityParams& p);
void relation_forward_cpu(const RelationParams& p);
void relation_backward_cpu(const RelationParams& p);

#ifdef KDOPS_WITH_CUDA
// The same on the GPU, asynchronous on `stream` (a cudaStream_t as an integer); scratch memory is
// allocated stream-ordered (cudaMallocAsync).
void affinity_forward_cuda(const AffinityParams& p, uintptr_t stream);
void affinity_backward_cuda(const AffinityParams& p, uintptr_t stream);
void relation_forward_cuda(const RelationParams& p, uintptr_t stream);
void relation_backward_cuda(const RelationParams& p, uintptr_t stream);
#endif

// Per-element math shared by both backends (T: float or double).
template <typename T>
KD_HD T smooth_l1(T z, T beta) {
  const T az = z < 0 ? -z : z;
  return az < beta ? T(0.5) * z * z / beta : az - T(0.5) * beta;
}

template <typename T>
KD_HD T smooth_l1_grad(T z, T beta) {
  const T az = z < 0 ? -z : z;
  return az < beta ? z / beta : (z > 0 ? T(1) : (z < 0 ? T(-1) : T(0)));
}

// Whether the Gram form n_i + n_j - 2 x_i.x_j of a squared distance d2 cancels (the pair is then
// recomputed from the difference x_i - x_j; n: squared norms of the centred rows).
template <typename T>
KD_HD bool close_pair(T d2, T n_i, T n_j) {
  return d2 < T(kClosePairRatio) * (n_i + n_j);
}

// ---- RKD-A (the law of cosines and where it cancels; see kdops/backends/triton/affinity.py) ----

// The cosine of the angle at anchor w between x_u - x_w and x_v - x_w by the law of cosines
// (a + b - c) / (2 sqrt(a) sqrt(b)) from the squared distances a = E_uw, b = E_vw, c = E_uv and
// inv_ab = 1 / sqrt(a b) (0 where a or b <= 1e-24: the cosine is then 0).
template <typename T>
KD_HD T law_of_cosines(T a, T b, T c, T inv_ab) {
  return (a + b - c) * T(0.5) * inv_ab;
}

// Whether the law of cosines cancels for the squared lengths a, b (inv_ab = 1 / sqrt(a b), 0 when
// masked): b - c cancels where a and b differ by more than a factor 1 / kClosePairRatio (within
// it, the error is ~ eps (a + b) / sqrt(a b) < 33 eps).
template <typename T>
KD_HD bool skewed(T a, T b, T inv_ab) {
  return inv_ab != T(0) && (a < T(kClosePairRatio) * b || b < T(kClosePairRatio) * a);
}

// The term of triplets (p, r, q) (anchor r: inv1 = 1 / sqrt(E_pr E_qr), cosines cos1) and
// (p, q, r) (anchor q: inv2 = 1 / sqrt(E_pq E_rq), cosines cos2, inv_pq = 1 / sqrt(E_pq)) in
// Delta_pq: g_prq dcos_prq/dc + 2 g_pqr dcos_pqr/da, dcos/dc = -1/(2 sqrt(ab)),
// dcos/da = 1/(2 sqrt(ab)) - cos/(2a) (see kdops/backends/triton/affinity.py).
template <typename T>
KD_HD T angle_delta_term(T inv1, T cos1_s, T cos1_t, T inv2, T inv_pq, T cos2_s, T cos2_t, T beta) {
  const T g1 = inv1 != T(0) ? smooth_l1_grad(cos1_s - cos1_t, beta) : T(0);
  const T g2 = inv2 != T(0) ? smooth_l1_grad(cos2_s - cos2_t, beta) : T(0);
  const T dcos2_da = T(0.5) * inv2 - T(0.5) * cos2_s * inv_pq * inv_pq;
  return T(-0.5) * g1 * inv1 + T(2) * g2 * dcos2_da;
}

}  // namespace kdops
