// The parameters of the fused temperature-softmax KD kernels (CPU and CUDA) and their entry
// points, bound by bindings/kd.h.
#pragma once

#include <cstdint>

#include "common/codes.h"

namespace kdops {

// Everything a forward call needs; pointers are device pointers for the CUDA kernels.
// Logit rows are strided (row stride in elements), their elements contiguous. Offsets are int64
// (r * stride and k * teacher_k_stride pass 2^31 at LLM sizes).

struct KDParams {
  const void* student;    // [n_rows, vocab] logits, dtype
  const void* teacher;    // [n_rows, vocab] logits, dtype (teacher 0 of n_teachers)
  const int64_t* labels;  // [n_rows] or nullptr: no masking and no hard-label term
  void* loss;             // [n_rows] row losses: double for kFloat64, else float
  void* grad;             // [n_rows, vocab] d(row loss)/d(student), dtype; nullptr: not computed
  int64_t n_rows, vocab;
  int64_t student_stride, teacher_stride, grad_stride;
  int dtype;              // DType (common/codes.h)
  int divergence;         // Divergence
  double temperature;     // > 0
  double beta;
  double hard_weight;     // a: row = a * CE(student at T=1, label) + soft_weight * D
  double soft_weight;     // (1 - a) * (T^2 or 1)
  int64_t ignore_index;
  // K teachers, mixed as p_t = sum_k w_k softmax(t_k / T): teacher k's rows start at
  // teacher + k * teacher_k_stride (elements); teacher_log_weights [n_teachers] = log w_k in the
  // loss type (double for kFloat64, else float). n_teachers == 1: one teacher, weights unused.
  int64_t n_teachers = 1;
  int64_t teacher_k_stride = 0;
  const void* teacher_log_weights = nullptr;
  // The models' final-logit transforms (common/logit_transform.h), applied to the logits read:
  // z' = scale * z, or with softcap c > 0 (0: none) z' = c * tanh(scale * z / c); the gradient
  // is to the raw student logits (times dz'/dz).
  double student_scale = 1, student_softcap = 0;
  double teacher_scale = 1, teacher_softcap = 0;
  // The reduction's divisor (1 / count of a mean, 1 / normalizer) as a 0-dim tensor of the loss
  // type: the gradient is divided by it before its rounding to dtype. nullptr: not divided.
  const void* grad_divisor = nullptr;

  bool has_transform() const {
    return student_scale != 1 || student_softcap != 0 || teacher_scale != 1 || teacher_softcap != 0;
  }
};

// Row losses (and gradients when p.grad != nullptr) on the CPU, rows in parallel (OpenMP).
void kd_forward_cpu(const KDParams& p);

#ifdef KDOPS_WITH_CUDA
// The same on the GPU, launched asynchronously on `stream` (a cudaStream_t as an integer).
void kd_forward_cuda(const KDParams& p, uintptr_t stream);
#endif

}  // namespace kdops
