// The interface of the sparse (top-k teacher) KD kernels (CPU and CUDA), and the per-row math
// they share.
//
// A row has student logits s [vocab] and the teacher's top-k log-probabilities lt [k] (at the
// temperature T, float; double for float64 students) at distinct indices idx [k]. With
// ls = log_softmax(s / T) over the full vocabulary, the loss compares K + 1 buckets (the top-k
// entries and, when k < vocab, the rest of the vocabulary) with any divergence of divergence.h:
//   student  ls[idx_k],                 rest r_s = 1 - sum_k exp(ls[idx_k])
//   teacher  bucket: lt_k,              rest r_t = max(1 - sum_k exp(lt_k), 0)
//            ignore: lt_k - log P_t,    rest 0          (P_t = sum_k exp(lt_k))
// Passes: 1. online logsumexp of s / T (and of s for the hard-label term); 2. over the top-k:
// P_s, P_t, then the terms (d_k, q_k) and the rest's (d_r, q_r): D = sum d, S = sum q;
// 3. the gradient dD/ds_i = (1/T) * (q_k - p_i S) at i = idx_k and (1/T) * p_i (q_r / r_s - S)
// elsewhere: a softmax-times-coefficient sweep over the vocabulary, then a scatter of the top-k.
// The student's logits s are its model's transformed logits (common/logit_transform.h) of the
// raw logits read, and the gradient is to the raw logits (times ds/dz), divided by the 0-dim
// grad_divisor (a mean's count or normalizer) before its one rounding to the student's dtype.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/codes.h"
#include "common/divergence.h"
#include "common/logit_transform.h"
#include "common/macros.h"

namespace kdops {

struct SparseKDParams {
  const void* student;          // [n_rows, vocab] logits, dtype (row stride student_stride)
  const void* topk_logprobs;    // [n_rows, k] contiguous: double for kFloat64, else float
  const int32_t* topk_indices;  // [n_rows, k] contiguous, distinct per row, in [0, vocab)
  const int64_t* labels;        // [n_rows] or nullptr: no masking and no hard-label term
  void* loss;                   // [n_rows] row losses: double for kFloat64, else float
  void* grad;                   // [n_rows, vocab] d(row loss)/d(student), dtype; nullptr: none
  int64_t n_rows, vocab, k;
  int64_t student_stride, grad_stride;
  int dtype;                    // DType (common/codes.h)
  int divergence;               // Divergence
  double temperature;           // > 0
  double beta;
  double hard_weight;           // row = hard_weight * CE(s, label) + soft_weight * D
  double soft_weight;
  int64_t ignore_index;
  bool bucket;                  // rest_mass="bucket" (else "ignore")
  // The student's final-logit transform (common/logit_transform.h; softcap 0: none).
  double student_scale = 1, student_softcap = 0;
  // 0-dim divisor of the gradient (double for kFloat64, else float); nullptr: not divided.
  const void* grad_divisor = nullptr;
};

// Row losses (and gradients when p.grad != nullptr) on the CPU, rows in parallel (OpenMP).
void sparse_kd_forward_cpu(const SparseKDParams& p);

#ifdef KDOPS_WITH_CUDA
// The same on the GPU, launched asynchronously on `stream` (a cudaStream_t as an integer).
void sparse_kd_forward_cuda(const SparseKDParams& p, uintptr_t stream);
#endif

// The rest bucket and the teacher's shift, from the top-k sums P_s = sum exp(ls_k) and
// P_t = sum exp(lt_k) (lt as given).
template <typename acc_t>
struct SparseRest {
  acc_t teacher_shift;  // the teacher's top-k log-probabilities are lt_k - teacher_shift
  acc_t rs;             // student rest mass r_s (0 when there is no rest bucket)
  acc_t ls, lt;         // log r_s, log r_t
  bool present;         // k < vocab
};

template <typename acc_t>
KD_HD SparseRest<acc_t> sparse_rest(acc_t ps_top, acc_t pt_top, bool present, bool bucket) {
  SparseRest<acc_t> r;
  r.present = present;
  r.teacher_shift = bucket ? acc_t(0) : std::log(pt_top);
  const acc_t rs = acc_t(1) - ps_top, rt = acc_t(1) - pt_top;
  r.rs = present && rs > acc_t(0) ? rs : acc_t(0);
  r.ls = std::log(r.rs);
  r.lt = bucket && rt > acc_t(0) ? std::log(rt) : acc_t(-INFINITY);
  return r;
}

// q_r / r_s: the gradient coefficient (times p_i / T, before "- S") of the elements outside the
// top-k; 0 when the rest is empty or its mass underflowed.
template <typename acc_t>
KD_HD acc_t sparse_rest_ratio(const SparseRest<acc_t>& r, acc_t q_rest) {
  return r.rs > acc_t(0) ? q_rest / r.rs : acc_t(0);
}

}  // namespace kdops
