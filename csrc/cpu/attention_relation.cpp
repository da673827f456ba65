// The attention-relation kernels on the CPU (common/attention_relation.h), OpenMP over
// (sample, head, row). Forward and da: one query row per task, its score row s_i., t_i. in a
// per-thread buffer of L values per model (never L x L); db: one key row per task, the scores of
// its column into the same buffers. Dot products over d and the per-key math (the divergence
// terms with the inline exp of common/fast_math.h) vectorized with `omp simd`; keys outside the
// softmax have s = t = -inf, whose terms are exactly 0.
#include "common/attention_relation.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/fast_math.h"

namespace kdops {
namespace {

template <typename T>
struct Heads {
  using acc_t = acc_type<T>;
  const AttentionRelationParams& p;
  acc_t scale_s, scale_t, beta;
  MixWeights<acc_t> mix;

  explicit Heads(const AttentionRelationParams& params)
      : p(params),
        scale_s(acc_t(1.0 / (std::sqrt(double(params.student_dim)) * params.temperature))),
        scale_t(acc_t(1.0 / (std::sqrt(double(params.teacher_dim)) * params.temperature))),
        beta(acc_t(params.beta)),
        mix(acc_t(params.beta)) {}

  static const T* row(const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t l) {
    return static_cast<const T*>(base) + b * stride[0] + h * stride[1] + l * stride[2];
  }
  static acc_t dot(const T* x, const T* y, int64_t d) {
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < d; ++c) sum += to_acc(x[c]) * to_acc(y[c]);
    return sum;
  }
  bool counted(int64_t b, int64_t l) const { return !p.counted || p.counted[b * p.length + l] != 0; }
  int64_t index(int64_t b, int64_t h, int64_t l) const { return (b * p.heads + h) * p.length + l; }
  int64_t n_rows() const { return p.batch * p.heads * p.length; }
  const acc_t* stat(int k) const { return static_cast<const acc_t*>(p.stats) + k * n_rows(); }

  // The scaled scores of query i with key j: the student's into s, the teacher's into t.
  void score(int64_t b, int64_t h, int64_t i, int64_t j, acc_t& s, acc_t& t) const {
    s = dot(row(p.student_a, p.sa_stride, b, h, i), row(p.student_b, p.sb_stride, b, h, j), p.student_dim) * scale_s;
    t = dot(row(p.teacher_a, p.ta_stride, b, h, i), row(p.teacher_b, p.tb_stride, b, h, j), p.teacher_dim) * scale_t;
  }

  // Scores of query i with keys [0, n) (n = i + 1 if causal, else L) into s, t; -inf outside.
  int64_t score_row(int64_t b, int64_t h, int64_t i, acc_t* s, acc_t* t) const {
    const int64_t n = p.causal ? i + 1 : p.length;
    for (int64_t j = 0; j < n; ++j) score(b, h, i, j, s[j], t[j]);
    if (p.counted && counted(b, i)) {
      const uint8_t* keys = p.counted + b * p.length;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        s[j] = keys[j] ? s[j] : acc_t(-INFINITY);
        t[j] = keys[j] ? t[j] : acc_t(-INFINITY);
      }
    }
    return n;
  }

  // A thread's buffers of L values per model (scores s, t and pair weights w) and d accumulators.
  struct Buffers {
    std::vector<acc_t> s, t, w, acc;
    explicit Buffers(const AttentionRelationParams& p) : s(p.length), t(p.length), w(p.length), acc(p.student_dim) {}
  };

  // body(b, h, l, buffers) for every (sample, head, row), OpenMP over the three.
  template <typename Body>
  void for_each_row(const Body& body) const {
#pragma omp parallel
    {
      Buffers buffers(p);
#pragma omp for collapse(3) schedule(dynamic, 8)
      for (int64_t b = 0; b < p.batch; ++b)
        for (int64_t h = 0; h < p.heads; ++h)
          for (int64_t l = 0; l < p.length; ++l) body(b, h, l, buffers);
    }
  }

  static acc_t lse(const acc_t* x, int64_t n) {
    acc_t m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
    if (m == -INFINITY) return m;
    acc_t z = 0;
#pragma omp simd reduction(+ : z)
    for (int64_t j = 0; j < n; ++j) z += FastMath::exp(x[j] - m);
    return m + std::log(z);
  }

  template <int DIV>
  void forward() const {
    acc_t* rows = static_cast<acc_t*>(p.rows);
    acc_t* stats = static_cast<acc_t*>(p.stats);
    for_each_row([&](int64_t b, int64_t h, int64_t i, Buffers& buf) {
      const int64_t n = score_row(b, h, i, buf.s.data(), buf.t.data());
      const acc_t lse_s = lse(buf.s.data(), n), lse_t = lse(buf.t.data(), n);
      const acc_t bt = beta;
      const MixWeights<acc_t> w = mix;
      const acc_t* ps = buf.s.data();
      const acc_t* pt = buf.t.data();
      acc_t d_sum = 0, q_sum = 0;
#pragma omp simd reduction(+ : d_sum, q_sum)
      for (int64_t j = 0; j < n; ++j) {
        const Term<acc_t> term = divergence_term<DIV, acc_t, FastMath>(ps[j] - lse_s, pt[j] - lse_t, bt, w);
        d_sum += term.d;
        q_sum += term.q;
      }
      const int64_t at = index(b, h, i);
      rows[at] = counted(b, i) ? d_sum : acc_t(0);
      stats[at] = lse_s;
      stats[n_rows() + at] = lse_t;
      stats[2 * n_rows() + at] = q_sum;
    });
  }

  // W_ij / (c_s) = g_i (q_ij - p_ij S_i) for the scores s, t of n pairs with row statistics at
  // stride `step` (0: one row's, 1: consecutive rows') into w.
  template <int DIV>
  void weights(const acc_t* s, const acc_t* t, int64_t n, int64_t at, int64_t step, acc_t* w) const {
    const acc_t *lse_s = stat(0) + at, *lse_t = stat(1) + at, *q_sum = stat(2) + at;
    const acc_t* g = static_cast<const acc_t*>(p.grad_rows) + at;
    const acc_t bt = beta;
    const MixWeights<acc_t> mw = mix;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const int64_t r = k * step;
      const acc_t ls = s[k] - lse_s[r];
      const Term<acc_t> term = divergence_term<DIV, acc_t, FastMath>(ls, t[k] - lse_t[r], bt, mw);
      w[k] = g[r] * (term.q - FastMath::exp(ls) * q_sum[r]);
    }
  }

  // out[0:d] = c_s * sum_k w[k] x_k (x_k the rows of `base` from `first`), rounded to T.
  void apply(const acc_t* w, int64_t n, const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t first,
             acc_t* acc, T* out) const {
    const int64_t d = p.student_dim;
    std::fill(acc, acc + d, acc_t(0));
    for (int64_t k = 0; k < n; ++k) {
      const acc_t wk = w[k];
      if (wk == acc_t(0)) continue;
      const T* x = row(base, stride, b, h, first + k);
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) acc[c] += wk * to_acc(x[c]);
    }
    for (int64_t c = 0; c < d; ++c) out[c] = from_acc<T>(acc[c] * scale_s);
  }

  template <int DIV>
  void backward_a() const {
    T* da = static_cast<T*>(p.da);
    for_each_row([&](int64_t b, int64_t h, int64_t i, Buffers& buf) {
      const int64_t at = index(b, h, i);
      int64_t n = 0;
      if (counted(b, i)) {  // else W = 0
        n = score_row(b, h, i, buf.s.data(), buf.t.data());
        weights<DIV>(buf.s.data(), buf.t.data(), n, at, 0, buf.w.data());
      }
      apply(buf.w.data(), n, p.student_b, p.sb_stride, b, h, 0, buf.acc.data(), da + at * p.student_dim);
    });
  }

  template <int DIV>
  void backward_b() const {
    T* db = static_cast<T*>(p.db);
    for_each_row([&](int64_t b, int64_t h, int64_t j, Buffers& buf) {
      const int64_t first = p.causal ? j : 0, n = counted(b, j) ? p.length - first : 0;
      for (int64_t k = 0; k < n; ++k) score(b, h, first + k, j, buf.s[k], buf.t[k]);  // column j, queries first + k
      weights<DIV>(buf.s.data(), buf.t.data(), n, index(b, h, first), 1, buf.w.data());
      if (p.counted) {  // queries that do not count have W = 0
        const uint8_t* queries = p.counted + b * p.length + first;
        for (int64_t k = 0; k < n; ++k) buf.w[k] = queries[k] ? buf.w[k] : acc_t(0);
      }
      apply(buf.w.data(), n, p.student_a, p.sa_stride, b, h, first, buf.acc.data(), db + index(b, h, j) * p.student_dim);
    });
  }
};

template <bool BACKWARD>
void run(const AttentionRelationParams& p) {
  with_dtype(p.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    const Heads<T> heads(p);
    with_divergence(p.divergence, [&](auto div) {
      if constexpr (BACKWARD) {
        heads.template backward_a<div.value>();
        heads.template backward_b<div.value>();
      } else {
        heads.template forward<div.value>();
      }
    });
  });
}

}  // namespace

void attention_relation_forward_cpu(const AttentionRelationParams& p) { run<false>(p); }
void attention_relation_backward_cpu(const AttentionRelationParams& p) { run<true>(p); }

}  // namespace kdops
