// The CPU kernels' running logsumexp (kd, multi-teacher kd, sparse kd): chunk by chunk, a chunk's
// max first, then its exp-sums while it is in L1, vectorized with `omp simd` and the inline exp of
// common/fast_math.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/dtype.h"
#include "common/fast_math.h"

namespace kdops {

// Elements per chunk of a row sweep.
constexpr int64_t kLSEChunk = 2048;

// A running logsumexp of scale * x: lse = scale * m + log(z), z = sum exp(scale * (x - m)).
template <typename acc_t>
struct OnlineLSE {
  acc_t m = -INFINITY;
  acc_t z = 0;

  // Adds x[0:n], whose max is chunk_max.
  template <typename T>
  void add(const T* x, int64_t n, acc_t chunk_max, acc_t scale) {
    const acc_t m_new = std::max(m, chunk_max);
    if (m_new == -INFINITY) return;  // only -inf so far: z stays 0
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += FastMath::exp((to_acc(x[i]) - m_new) * scale);
    z = z * FastMath::exp((m - m_new) * scale) + sum;
    m = m_new;
  }
};

// The max of x[0:n] in the accumulation type.
template <typename acc_t, typename T>
acc_t chunk_max(const T* x, int64_t n) {
  acc_t m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = std::max(m, to_acc(x[i]));
  return m;
}

// The online logsumexp of x[0:V] * scale.
template <typename acc_t, typename T>
OnlineLSE<acc_t> row_lse(const T* x, int64_t V, acc_t scale) {
  OnlineLSE<acc_t> lse;
  for (int64_t b = 0; b < V; b += kLSEChunk) {
    const int64_t n = std::min(kLSEChunk, V - b);
    lse.add(x + b, n, chunk_max<acc_t>(x + b, n), scale);
  }
  return lse;
}

}  // namespace kdops
