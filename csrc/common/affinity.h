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

}  // namespace kdops
