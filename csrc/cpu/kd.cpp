// The fused KD loss on the CPU: one row per OpenMP iteration, three passes over the row as
// described in common/divergence.h, the element loops vectorized with `omp simd` and the inline
// float exp / log1p of common/fast_math.h. With K > 1 teachers (MULTI), pass 1 also gives each
// teacher's logsumexp, then the row's mixture log-probabilities
// lt = logsumexp_k(log w_k + (t_k - m_k) / T - log z_k) are formed in a per-thread row buffer
// (vectorized loops over the teachers' rows), which passes 2 and 3 read. With the models' logit
// transforms (TRANSFORM, common/logit_transform.h) every logit is transformed where it is read
// (pass 1 transforms each chunk into a per-thread buffer for its logsumexp), the gradient is
// multiplied by the student transform's slope; a divisor (grad_divisor) divides it last.
// The hard target (kHard, DeiT): pass 1 keeps the teacher's argmax instead of its logsumexp (with
// MULTI, the argmax of the mixture's row buffer), pass 2 is skipped (S = -1) and pass 3 writes
// the gradient with q = -onehot(argmax).
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
#include "common/logit_transform.h"
#include "common/macros.h"
#include "common/online_lse.h"
#include "cpu/row_loss.h"

namespace kdops {
namespace {

KD_HD float log_acc(float x) { return fast_log(x); }
KD_HD double log_acc(double x) { return std::log(x); }

// A row of logits as the kernel reads them: x[i] in the accumulation type, transformed (TR).
template <typename T, bool TR>
struct Logits {
  using acc_t = acc_type<T>;
  const T* x;
  LogitTransform<acc_t> tr;
  KD_HD acc_t operator[](int64_t i) const {
    if constexpr (TR) {
      return tr.apply(to_acc(x[i]));
    } else {
      return to_acc(x[i]);
    }
  }
  Logits shifted(int64_t offset) const { return {x + offset, tr}; }
};

// Adds x[b : b + n] (n <= kLSEChunk) to the logsumexp `lse` of x / T and (ONE) `lse1` of x.
// With TR the chunk is transformed into buf[0:n] first.
template <typename T, bool TR, bool ONE, typename acc_t>
void add_chunk(const Logits<T, TR>& x, int64_t b, int64_t n, acc_t inv_t, OnlineLSE<acc_t>& lse,
               OnlineLSE<acc_t>& lse1, acc_t* buf) {
  acc_t m = -INFINITY;
  if constexpr (TR) {
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; ++i) {
      buf[i] = x[b + i];
      m = std::max(m, buf[i]);
    }
    lse.add(buf, n, m, inv_t);
    if constexpr (ONE) lse1.add(buf, n, m, acc_t(1));
  } else {
    m = chunk_max<acc_t>(x.x + b, n);
    lse.add(x.x + b, n, m, inv_t);
    if constexpr (ONE) lse1.add(x.x + b, n, m, acc_t(1));
  }
}

// The online logsumexp of x[0:V] / T (and with ONE of x[0:V] into lse1).
template <bool ONE, typename T, bool TR, typename acc_t>
OnlineLSE<acc_t> logits_lse(const Logits<T, TR>& x, int64_t V, acc_t inv_t, OnlineLSE<acc_t>& lse1, acc_t* buf) {
  OnlineLSE<acc_t> lse;
  for (int64_t b = 0; b < V; b += kLSEChunk) {
    add_chunk<T, TR, ONE>(x, b, std::min(kLSEChunk, V - b), inv_t, lse, lse1, buf);
  }
  return lse;
}

// The mixture's log-probabilities of a row into lt[0:V] (hi[0:V] is scratch): with
// a_k = (t_k - m_k) / T + log w_k - log z_k, lt = hi + log(sum_k exp(a_k - hi)), hi = max_k a_k
// (replaced by 0 where it is -inf: lt is then -inf).
template <typename T, bool TR, typename acc_t>
void mixture_log_probs(const Logits<T, TR>& t, int64_t k_stride, int64_t K, const OnlineLSE<acc_t>* lse,
                       const acc_t* log_w, acc_t inv_t, int64_t V, acc_t* lt, acc_t* hi) {
  std::fill(hi, hi + V, acc_t(-INFINITY));
  for (int64_t k = 0; k < K; ++k) {
    const Logits<T, TR> tk = t.shifted(k * k_stride);
    const acc_t mk = lse[k].m, off = log_w[k] - std::log(lse[k].z);
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) hi[i] = std::max(hi[i], (tk[i] - mk) * inv_t + off);
  }
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) {
    hi[i] = hi[i] == acc_t(-INFINITY) ? acc_t(0) : hi[i];
    lt[i] = 0;
  }
  for (int64_t k = 0; k < K; ++k) {
    const Logits<T, TR> tk = t.shifted(k * k_stride);
    const acc_t mk = lse[k].m, off = log_w[k] - std::log(lse[k].z);
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) lt[i] += FastMath::exp((tk[i] - mk) * inv_t + off - hi[i]);
  }
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) lt[i] = hi[i] + log_acc(lt[i]);
}

// Whether one of the K teacher rows t + k * k_stride (k < K) holds a NaN (a transform keeps NaN
// and makes none).
template <typename T>
bool has_nan(const T* t, int64_t k_stride, int64_t K, int64_t V) {
  int nan = 0;
  for (int64_t k = 0; k < K; ++k) {
    const T* tk = t + k * k_stride;
#pragma omp simd reduction(| : nan)
    for (int64_t i = 0; i < V; ++i) {
      const auto x = to_acc(tk[i]);
      nan |= x != x;
    }
  }
  return nan != 0;
}

// The first index of the max of x[0:V] (x[i]: an accessor or a pointer without NaN); 0 when
// every value is -inf.
template <typename acc_t, typename X>
int64_t first_argmax(const X& x, int64_t V) {
  acc_t best = -INFINITY;
  int64_t arg = 0;
  for (int64_t i = 0; i < V; ++i) {
    const acc_t v = x[i];
    if (v > best) {
      best = v;
      arg = i;
    }
  }
  return arg;
}

// Per-thread scratch: of the MULTI rows K logsumexps and two row buffers; of TRANSFORM a chunk.
template <typename acc_t>
struct Scratch {
  std::vector<OnlineLSE<acc_t>> lse;
  std::vector<acc_t> lt, hi, chunk;
  Scratch(int64_t K, int64_t V, bool transform) : lse(K), lt(V), hi(V), chunk(transform ? kLSEChunk : 0) {}
};

template <typename T, int DIV, bool HARD, bool GRAD, bool MULTI, bool TRANSFORM>
void kd_row(const KDParams& p, int64_t r, Scratch<acc_type<T>>* scratch) {
  using acc_t = acc_type<T>;
  const int64_t V = p.vocab;
  const T* s_raw = static_cast<const T*>(p.student) + r * p.student_stride;
  const LogitTransform<acc_t> student_tr{acc_t(p.student_scale), acc_t(p.student_softcap)};
  const Logits<T, TRANSFORM> s{s_raw, student_tr};
  const Logits<T, TRANSFORM> t{static_cast<const T*>(p.teacher) + r * p.teacher_stride,
                               {acc_t(p.teacher_scale), acc_t(p.teacher_softcap)}};
  T* g = GRAD ? static_cast<T*>(p.grad) + r * p.grad_stride : nullptr;
  acc_t& loss = static_cast<acc_t*>(p.loss)[r];
  const int64_t label = p.labels ? p.labels[r] : -1;

  if (label_decides_row<T, HARD, GRAD>(p.labels != nullptr, label, p.ignore_index, V, loss, g)) return;

  // kHard: a NaN teacher logit makes the row NaN (it is not compared).
  if constexpr (DIV == kHard) {
    if (has_nan(t.x, p.teacher_k_stride, p.n_teachers, V)) return fill_row<T, GRAD>(loss, g, V, acc_t(NAN));
  }

  // Pass 1: logsumexp of s / T, t / T (kHard with one teacher: its argmax instead) and (for the
  // hard-label term) s.
  const acc_t inv_t = acc_t(1) / acc_t(p.temperature);
  OnlineLSE<acc_t> lse_1, unused, lse_t;
  acc_t* buf = TRANSFORM ? scratch->chunk.data() : nullptr;
  const OnlineLSE<acc_t> lse_s = logits_lse<HARD>(s, V, inv_t, lse_1, buf);
  int64_t target = 0;  // kHard: the first index of the teacher's max
  if constexpr (DIV != kHard || MULTI) {
    lse_t = logits_lse<false>(t, V, inv_t, unused, buf);
  } else {
    target = first_argmax<acc_t>(t, V);
  }
  const acc_t* mixed = nullptr;  // MULTI: the row's mixture log-probabilities
  if constexpr (MULTI) {
    OnlineLSE<acc_t>* lse = scratch->lse.data();
    lse[0] = lse_t;
    for (int64_t k = 1; k < p.n_teachers; ++k) {
      lse[k] = logits_lse<false>(t.shifted(k * p.teacher_k_stride), V, inv_t, unused, buf);
    }
    mixture_log_probs(t, p.teacher_k_stride, p.n_teachers, lse, static_cast<const acc_t*>(p.teacher_log_weights),
                      inv_t, V, scratch->lt.data(), scratch->hi.data());
    mixed = scratch->lt.data();
    if constexpr (DIV == kHard) target = first_argmax<acc_t>(mixed, V);
  }
  // Log-probabilities relative to the row max, which keeps them accurate for large logits.
  const acc_t ms = lse_s.m, log_zs = std::log(lse_s.z);
  const acc_t mt = lse_t.m, log_zt = std::log(lse_t.z);
  const acc_t log_z1 = std::log(lse_1.z);  // lse_1 = ms + log_z1
  const acc_t beta = acc_t(p.beta);
  const MixWeights<acc_t> w(beta);
  const auto term = [=](int64_t i) KD_INLINE {
    const acc_t ls = (s[i] - ms) * inv_t - log_zs;
    const acc_t lt = MULTI ? mixed[i] : (t[i] - mt) * inv_t - log_zt;
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

  // Pass 3: the gradient soft_weight / T * (q - p_s S) + hard_weight * (softmax(s) - onehot),
  // times the student transform's slope ds/dz and 1 / divisor (folded into `unit`).
  const acc_t unit = p.grad_divisor ? acc_t(1) / *static_cast<const acc_t*>(p.grad_divisor) : acc_t(1);
  const acc_t soft = acc_t(p.soft_weight) * unit, hard = acc_t(p.hard_weight) * unit;
  const auto grad = [=](int64_t i, acc_t q, acc_t onehot) KD_INLINE {
    const acc_t si = s[i];
    const acc_t ps = FastMath::exp((si - ms) * inv_t - log_zs);
    acc_t gi = soft * inv_t * (q - ps * S);
    if constexpr (HARD) gi += hard * (FastMath::exp(si - ms - log_z1) - onehot);
    if constexpr (TRANSFORM) gi *= student_tr.slope(si);
    return gi;
  };
  // q of element i: kHard's -onehot(target), else the divergence term's.
  const auto q_of = [=](int64_t i) KD_INLINE {
    if constexpr (DIV == kHard) {
      return i == target ? acc_t(-1) : acc_t(0);
    } else {
      return term(i).q;
    }
  };
  if constexpr (DIV == kHard) {
    D = log_zs - (s[target] - ms) * inv_t;  // -ls[target]
    if constexpr (GRAD) {
#pragma omp simd
      for (int64_t i = 0; i < V; ++i) g[i] = from_acc<T>(grad(i, acc_t(0), acc_t(0)));
      g[target] = from_acc<T>(grad(target, acc_t(-1), acc_t(0)));
    }
  } else if constexpr (DIV == kForwardKL || GRAD) {
#pragma omp simd reduction(+ : D)
    for (int64_t i = 0; i < V; ++i) {
      const Term<acc_t> e = term(i);
      if constexpr (DIV == kForwardKL) D += e.d;
      if constexpr (GRAD) g[i] = from_acc<T>(grad(i, e.q, acc_t(0)));
    }
  }

  loss = acc_t(p.soft_weight) * D;
  if constexpr (HARD) {
    // Cross entropy at T = 1.
    loss += acc_t(p.hard_weight) * (log_z1 - (s[label] - ms));
    if constexpr (GRAD) g[label] = from_acc<T>(grad(label, q_of(label), acc_t(1)));
  }
}

template <typename T, int DIV, bool HARD, bool GRAD, bool MULTI, bool TRANSFORM>
void kd_rows(const KDParams& p) {
  // Rows of uneven cost (ignored rows are cheap): hand out about 64K elements at a time.
  const int64_t rows_per_task = std::max<int64_t>(1, 65536 / std::max<int64_t>(p.vocab * p.n_teachers, 1));
#pragma omp parallel
  {
    Scratch<acc_type<T>> scratch(MULTI ? p.n_teachers : 0, MULTI ? p.vocab : 0, TRANSFORM);
#pragma omp for schedule(dynamic, rows_per_task)
    for (int64_t r = 0; r < p.n_rows; ++r) kd_row<T, DIV, HARD, GRAD, MULTI, TRANSFORM>(p, r, &scratch);
  }
}

}  // namespace

void kd_forward_cpu(const KDParams& p) {
  with_dtype(p.dtype, [&](auto type) {
    with_divergence<true>(p.divergence, [&](auto div) {
      with_bool(p.hard_weight > 0 && p.labels != nullptr, [&](auto hard) {
        with_bool(p.grad != nullptr, [&](auto grad) {
          with_bool(p.n_teachers > 1, [&](auto multi) {
            with_bool(p.has_transform(), [&](auto transform) {
              using T = typename decltype(type)::type;
              kd_rows<T, decltype(div)::value, decltype(hard)::value, decltype(grad)::value,
                      decltype(multi)::value, decltype(transform)::value>(p);
            });
          });
        });
      });
    });
  });
}

}  // namespace kdops
