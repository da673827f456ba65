// The interface of the attention-relation kernels (MiniLM / MiniLMv2 relation distillation) on the
// CPU and the GPU, and the per-pair math both share. The math is that of
// kdops/ops/attention_relation.py: per (sample, head, query row i), with s_ij = a_i . b_j c_s and
// t_ij the teacher's (c = 1 / (sqrt(d) T)), the row loss D(softmax(t_i), softmax(s_i)) over the
// allowed keys, the row statistics (lse_s, lse_t, S = sum_j q_ij) and, in backward,
// W_ij = g_i (q_ij - p_ij S_i) c_s, da_i = sum_j W_ij b_j, db_j = sum_i W_ij a_i. Score tiles are
// recomputed, never stored as L x L.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/codes.h"
#include "common/divergence.h"
#include "common/macros.h"

namespace kdops {

// Inputs [B, H, L, d] (dtype; strides in elements for b, h, l; unit stride on d). "acc" is the
// accumulation type: double for kFloat64, float otherwise. Pointers are device pointers on the GPU.
struct AttentionRelationParams {
  const void* student_a;
  const void* student_b;
  const void* teacher_a;   // a constant
  const void* teacher_b;
  int64_t batch, heads, length, student_dim, teacher_dim;
  int64_t sa_stride[3], sb_stride[3], ta_stride[3], tb_stride[3];
  const uint8_t* counted;  // [B, L] contiguous, nonzero = a real token; null: every position
  bool causal;
  int dtype;               // DType
  int divergence;          // Divergence
  double temperature, beta;
  void* rows;              // forward: [B, H, L] row losses, acc
  void* stats;             // [3, B, H, L] acc: lse_s, lse_t, S (forward writes, backward reads)
  const void* grad_rows;   // backward: [B, H, L] dL/d rows, acc
  void* da;                // backward: [B, H, L, ds] dL/d student_a, dtype, contiguous
  void* db;                // backward: [B, H, L, ds] dL/d student_b, dtype, contiguous
};

void attention_relation_forward_cpu(const AttentionRelationParams& p);
void attention_relation_backward_cpu(const AttentionRelationParams& p);

#ifdef KDOPS_WITH_CUDA
// The same on the GPU, asynchronous on `stream` (a cudaStream_t as an integer).
void attention_relation_forward_cuda(const AttentionRelationParams& p, uintptr_t stream);
void attention_relation_backward_cuda(const AttentionRelationParams& p, uintptr_t stream);
#endif

// Whether key j enters query i's softmax: inside the mask (or the query does not count: it then
// gets every key, a finite row its callers zero) and, with causal, j <= i.
KD_HD bool relation_key_allowed(bool query_counted, bool key_counted, bool causal, int64_t i, int64_t j) {
  return (key_counted || !query_counted) && (!causal || j <= i);
}

// Row statistics of a query row, and the pair weight W_ij / (g_i c_s) = q_ij - p_ij S_i.
template <typename acc_t>
struct RelationRowStats {
  acc_t lse_s, lse_t, q_sum;
};

template <int DIV, typename acc_t>
KD_HD acc_t relation_pair_weight(acc_t s, acc_t t, const RelationRowStats<acc_t>& r, acc_t beta,
                                 const MixWeights<acc_t>& w) {
  const acc_t ls = s - r.lse_s;
  const Term<acc_t> term = divergence_term<DIV>(ls, t - r.lse_t, beta, w);
  using std::exp;
  return term.q - exp(ls) * r.q_sum;
}

}  // namespace kdops
