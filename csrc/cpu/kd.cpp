// The fused KD loss on the CPU: one row per OpenMP iteration, three passes over the row as
// described in common/divergence.h, the element loops vectorized with `omp simd` and the inline
// float exp / log1p of common/fast_math.h. With K > 1 teachers (MULTI), pass 1 also gives each
// teacher's logsumexp, then the row's mixture log-probabilities
// lt = logsumexp_k(log w_k + (t_k - m_k) / T - log z_k) are formed in a per-thread row buffer
// (vectorized loops over the teachers' rows), which passes 2 and 3 read.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "common/divergence.h"
#include "common/dtype.h"
#include "common/fast_math.h"
#include "common/kd.h"
#include "common/macros.h"
#include "common/online_lse.h"

namespace kdops {
namespace {

KD_HD float log_acc(float x) { return fast_log(x); }
KD_HD double log_acc(double x) { return std::log(x); }

// The mixture's log-probabilities of a row into lt[0:V] (hi[0:V] is scratch): with
// a_k = (t_k - m_k) / T + log w_k - log z_k, lt = hi + log(sum_k exp(a_k - hi)), hi = max_k a_k
// (replaced by 0 where it is -inf: lt is then -inf).
template <typename T, typename acc_t>
void mixture_log_probs(const T* t, int64_t k_stride, int64_t K, const OnlineLSE<acc_t>* lse,
                       const acc_t* log_w, acc_t inv_t, int64_t V, acc_t* lt, acc_t* hi) {
  std::fill(hi, hi + V, acc_t(-INFINITY));
  for (int64_t k = 0; k < K; ++k) {
    const T* tk = t + k * k_stride;
    const acc_t mk = lse[k].m, off = log_w[k] - std::log(lse[k].z);
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) hi[i] = std::max(hi[i], (to_acc(tk[i]) - mk) * inv_t + off);
  }
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) {
    hi[i] = hi[i] == acc_t(-INFINITY) ? acc_t(0) : hi[i];
    lt[i] = 0;
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* tk = t + k * k_stride;
    const acc_t mk = lse[k].m, off = log_w[k] - std::log(lse[k].z);
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) lt[i] += FastMath::exp((to_acc(tk[i]) - mk) * inv_t + off - hi[i]);
  }
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) lt[i] = hi[i] + log_acc(lt[i]);
}

// Per-thread scratch of the MULTI rows: K logsumexps, and two row buffers.
template <typename acc_t>
struct MixtureScratch {
  std::vector<OnlineLSE<acc_t>> lse;
  std::vector<acc_t> lt, hi;
  MixtureScratch(int64_t K, int64_t V) : lse(K), lt(V), hi(V) {}
};

template <typename T, int DIV, bool HARD, bool GRAD, bool MULTI>
void kd_row(const KDParams& p, int64_t r, MixtureScratch<acc_type<T>>* scratch) {
  using acc_t = acc_type<T>;
  const int64_t V = p.vocab;
  const T* s = static_cast<const T*>(p.student) + r * p.student_stride;
  const T* t = static_cast<const T*>(p.teacher) + r * p.teacher_stride;
  T* g = GRAD ? static_cast<T*>(p.grad) + r * p.grad_stride : nullptr;
  acc_t& loss = static_cast<acc_t*>(p.loss)[r];
  const int64_t label = p.labels ? p.labels[r] : -1;

  if (p.labels && label == p.ignore_index) {
    loss = 0;
    if constexpr (GRAD) std::fill(g, g + V, from_acc<T>(0));
    return;
  }
  if (HARD && (label < 0 || label >= V)) {  // an out-of-range label: a NaN row (never read)
    loss = acc_t(NAN);
    if constexpr (GRAD) std::fill(g, g + V, from_acc<T>(acc_t(NAN)));
    return;
  }

  // Pass 1: logsumexp of s / T, t / T and (for the hard term) s.
  const acc_t inv_t = acc_t(1) / acc_t(p.temperature);
  OnlineLSE<acc_t> lse_s, lse_t, lse_1;
  for (int64_t b = 0; b < V; b += kLSEChunk) {
    const int64_t n = std::min(kLSEChunk, V - b);
    acc_t cs = -INFINITY, ct = -INFINITY;
#pragma omp simd reduction(max : cs, ct)
    for (int64_t i = b; i < b + n; ++i) {
      cs = std::max(cs, to_acc(s[i]));
      ct = std::max(ct, to_acc(t[i]));
    }
    lse_s.add(s + b, n, cs, inv_t);
    lse_t.add(t + b, n, ct, inv_t);
    if constexpr (HARD) lse_1.add(s + b, n, cs, acc_t(1));
  }
  const acc_t* mixed = nullptr;  // MULTI: the row's mixture log-probabilities
  if constexpr (MULTI) {
    OnlineLSE<acc_t>* lse = scratch->lse.data();
    lse[0] = lse_t;
    for (int64_t k = 1; k < p.n_teachers; ++k) lse[k] = row_lse(t + k * p.teacher_k_stride, V, inv_t);
    mixture_log_probs(t, p.teacher_k_stride, p.n_teachers, lse, static_cast<const acc_t*>(p.teacher_log_weights),
                      inv_t, V, scratch->lt.data(), scratch->hi.data());
    mixed = scratch->lt.data();
  }
  // Log-probabilities relative to the row max, which keeps them accurate for large logits.
  const acc_t ms = lse_s.m, log_zs = std::log(lse_s.z);
  const acc_t mt = lse_t.m, log_zt = std::log(lse_t.z);
  const acc_t log_z1 = std::log(lse_1.z);  // lse_1 = ms + log_z1
  const acc_t beta = acc_t(p.beta);
  const MixWeights<acc_t> w(beta);
  const auto term = [=](int64_t i) KD_INLINE {
    const acc_t ls = (to_acc(s[i]) - ms) * inv_t - log_zs;
    const acc_t lt = MULTI ? mixed[i] : (to_acc(t[i]) - mt) * inv_t - log_zt;
    return divergence_term<DIV, acc_t, FastMath>(ls, lt, beta, w);
  };

  // Pass 2: D and S = sum q (forward KL: S = -1, D is summed in pass 3).
  acc_t D = 0, S = -1;
  if constexpr (needs_sum_pass(DIV)) {
    S = 0;
#pragma omp simd reduction(+ : D, S)
    for (int64_t i = 0; i < V; ++i) {
      const Term<acc_t> e = term(i);
      D += e.d;
      S += e.q;
    }
  }

  // Pass 3: the gradient soft_weight / T * (q - p_s S) + hard_weight * (softmax(s) - onehot).
  const acc_t soft = acc_t(p.soft_weight), hard = acc_t(p.hard_weight);
  const auto grad = [=](int64_t i, acc_t q) KD_INLINE {
    const acc_t ps = FastMath::exp((to_acc(s[i]) - ms) * inv_t - log_zs);
    acc_t gi = soft * inv_t * (q - ps * S);
    if constexpr (HARD) gi += hard * FastMath::exp(to_acc(s[i]) - ms - log_z1);
    return gi;
  };
  if constexpr (DIV == kForwardKL || GRAD) {
#pragma omp simd reduction(+ : D)
    for (int64_t i = 0; i < V; ++i) {
      const Term<acc_t> e = term(i);
      if constexpr (DIV == kForwardKL) D += e.d;
      if constexpr (GRAD) g[i] = from_acc<T>(grad(i, e.q));
    }
  }

  loss = soft * D;
  if constexpr (HARD) {
    // Cross entropy at T = 1.
    loss += hard * (log_z1 - (to_acc(s[label]) - ms));
    if constexpr (GRAD) g[label] = from_acc<T>(grad(label, term(label).q) - hard);
  }
}

template <typename T, int DIV, bool HARD, bool GRAD, bool MULTI>
void kd_rows(const KDParams& p) {
  // Rows of uneven cost (ignored rows are cheap): hand out about 64K elements at a time.
  const int64_t rows_per_task = std::max<int64_t>(1, 65536 / std::max<int64_t>(p.vocab * p.n_teachers, 1));
#pragma omp parallel
  {
    MixtureScratch<acc_type<T>> scratch(MULTI ? p.n_teachers : 0, MULTI ? p.vocab : 0);
#pragma omp for schedule(dynamic, rows_per_task)
    for (int64_t r = 0; r < p.n_rows; ++r) kd_row<T, DIV, HARD, GRAD, MULTI>(p, r, &scratch);
  }
}

}  // namespace

void kd_forward_cpu(const KDParams& p) {
  with_dtype(p.dtype, [&](auto type) {
    with_divergence(p.divergence, [&](auto div) {
      with_bool(p.hard_weight > 0 && p.labels != nullptr, [&](auto hard) {
        with_bool(p.grad != nullptr, [&](auto grad) {
          with_bool(p.n_teachers > 1, [&](auto multi) {
            using T = typename decltype(type)::type;
            kd_rows<T, decltype(div)::value, decltype(hard)::value, decltype(grad)::value,
                    decltype(multi)::value>(p);
          });
        });
      });
    });
  });
}

}  // namespace kdops
