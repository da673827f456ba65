// The sparse (top-k teacher) KD loss on the CPU: one row per OpenMP iteration, the passes of
// common/sparse_kd.h; the vocabulary sweeps vectorized with `omp simd` and the inline float exp
// of common/fast_math.h, the top-k loops scalar (k is small). With a student logit transform
// the logsumexp sweep reads each chunk's transformed logits from a stack buffer.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dispatch.h"
#include "common/divergence.h"
#include "common/dtype.h"
#include "common/fast_math.h"
#include "common/macros.h"
#include "common/online_lse.h"
#include "common/sparse_kd.h"
#include "cpu/row_loss.h"

namespace kdops {
namespace {

template <typename T, int DIV, bool HARD, bool GRAD>
void sparse_row(const SparseKDParams& p, int64_t r) {
  using acc_t = acc_type<T>;
  const int64_t V = p.vocab, K = p.k;
  const T* s = static_cast<const T*>(p.student) + r * p.student_stride;
  const acc_t* lt = static_cast<const acc_t*>(p.topk_logprobs) + r * K;
  const int32_t* idx = p.topk_indices + r * K;
  T* g = GRAD ? static_cast<T*>(p.grad) + r * p.grad_stride : nullptr;
  acc_t& loss = static_cast<acc_t*>(p.loss)[r];
  const int64_t label = p.labels ? p.labels[r] : -1;
  const LogitTransform<acc_t> tf{acc_t(p.student_scale), acc_t(p.student_softcap)};
  const auto z = [=](int64_t i) KD_INLINE { return tf.apply(to_acc(s[i])); };  // transformed logit i

  if (label_decides_row<T, HARD, GRAD>(p.labels != nullptr, label, p.ignore_index, V, loss, g)) return;

  // Pass 1: logsumexp of s / T and (hard term) of s.
  const acc_t inv_t = acc_t(1) / acc_t(p.temperature);
  OnlineLSE<acc_t> lse_s, lse_1;
  const auto add_chunk = [&](const auto* x, int64_t n) {
    const acc_t cs = chunk_max<acc_t>(x, n);
    lse_s.add(x, n, cs, inv_t);
    if constexpr (HARD) lse_1.add(x, n, cs, acc_t(1));
  };
  acc_t chunk[kLSEChunk];  // a chunk's transformed logits (unused without a transform)
  for (int64_t b = 0; b < V; b += kLSEChunk) {
    const int64_t n = std::min(kLSEChunk, V - b);
    if (tf.identity()) {
      add_chunk(s + b, n);
      continue;
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) chunk[i] = z(b + i);
    add_chunk(static_cast<const acc_t*>(chunk), n);
  }
  const acc_t ms = lse_s.m, log_zs = std::log(lse_s.z), log_z1 = std::log(lse_1.z);
  const auto log_ps = [=](int64_t i) KD_INLINE { return (z(i) - ms) * inv_t - log_zs; };

  // Pass 2: top-k masses, then the bucket terms.
  acc_t ps_top = 0, pt_top = 0;
  bool indices_ok = true;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t i = idx[k];
    if (i < 0 || i >= V) {
      indices_ok = false;
      continue;
    }
    ps_top += std::exp(log_ps(i));
    pt_top += std::exp(lt[k]);
  }
  const SparseRest<acc_t> rest = sparse_rest(ps_top, pt_top, K < V, p.bucket);
  const acc_t beta = acc_t(p.beta);
  const MixWeights<acc_t> w(beta);
  const auto top_term = [&](int64_t k) {
    return divergence_term<DIV, acc_t>(log_ps(idx[k]), lt[k] - rest.teacher_shift, beta, w);
  };
  acc_t D = 0, S = 0, ratio = 0;
  for (int64_t k = 0; k < K && indices_ok; ++k) {
    const Term<acc_t> e = top_term(k);
    D += e.d;
    S += e.q;
  }
  if (rest.present) {
    const Term<acc_t> e = divergence_term<DIV, acc_t>(rest.ls, rest.lt, beta, w);
    D += e.d;
    S += e.q;
    ratio = sparse_rest_ratio(rest, e.q);
  }
  if (!indices_ok) S = acc_t(NAN);  // an index outside [0, V): a NaN loss and a NaN gradient row

  const acc_t soft = acc_t(p.soft_weight), hard = acc_t(p.hard_weight);
  loss = indices_ok ? soft * D : acc_t(NAN);
  if constexpr (HARD) loss += hard * (log_z1 - (z(label) - ms));
  if constexpr (!GRAD) return;

  // Pass 3: softmax * coefficient over the vocabulary, then the top-k entries (and the label);
  // each element times ds/dz / divisor (`out`) before its one rounding.
  const acc_t rest_coef = soft * inv_t * (ratio - S);
  const acc_t inv_div = p.grad_divisor ? acc_t(1) / *static_cast<const acc_t*>(p.grad_divisor) : acc_t(1);
  const auto p1 = [=](int64_t i) KD_INLINE {
    return HARD ? hard * FastMath::exp(z(i) - ms - log_z1) : acc_t(0);
  };
  const auto out = [=](int64_t i, acc_t gi) KD_INLINE { return from_acc<T>(gi * tf.slope(z(i)) * inv_div); };
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) g[i] = out(i, FastMath::exp(log_ps(i)) * rest_coef + p1(i));
  if (!indices_ok) return;
  acc_t g_label = HARD ? FastMath::exp(log_ps(label)) * rest_coef + p1(label) : acc_t(0);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t i = idx[k];
    const acc_t gi = soft * inv_t * (top_term(k).q - std::exp(log_ps(i)) * S) + p1(i);
    g[i] = out(i, gi);
    if (i == label) g_label = gi;
  }
  if (HARD) g[label] = out(label, g_label - hard);
}

template <typename T, int DIV, bool HARD, bool GRAD>
void sparse_rows(const SparseKDParams& p) {
  const int64_t rows_per_task = std::max<int64_t>(1, 65536 / std::max<int64_t>(p.vocab, 1));
#pragma omp parallel for schedule(dynamic, rows_per_task)
  for (int64_t r = 0; r < p.n_rows; ++r) sparse_row<T, DIV, HARD, GRAD>(p, r);
}

}  // namespace

void sparse_kd_forward_cpu(const SparseKDParams& p) {
  with_dtype(p.dtype, [&](auto type) {
    with_divergence(p.divergence, [&](auto div) {
      with_bool(p.hard_weight > 0 && p.labels != nullptr, [&](auto hard) {
        with_bool(p.grad != nullptr, [&](auto grad) {
          using T = typename decltype(type)::type;
          sparse_rows<T, decltype(div)::value, decltype(hard)::value, decltype(grad)::value>(p);
        });
      });
    });
  });
}

}  // namespace kdops
