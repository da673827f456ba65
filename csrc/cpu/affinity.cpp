// The relation-based kernels on the CPU (see common/affinity.h and kdops/backends/triton/affinity.py).
//
// Gram tiles G_IJ = X_I X_J^T (kTile x kTile) come from a register-blocked micro-kernel on
// features packed once into panels of kPanel rows ([panel][k][row], in the accumulation type):
// O(B * D) memory, nothing [B, B] is stored for SP and RKD-D. Every quantity is symmetric in
// (i, j), so only the tiles I <= J are computed, each feeding rows I and rows J, and the tile
// pairs run in the rounds of a round-robin tournament: within a round no two pairs share a row
// block, so threads accumulate per-row sums and gradient rows without atomics. Backward passes
// recompute the tiles, turn them into pair weights W and apply dx_I += W_IJ X_J and
// dx_J += W_IJ^T X_I with the same micro-kernel. RKD-A keeps the exact [B, B] squared
// distances (O(B^2)) and loops over anchors, never holding [B, B, B]; its cosines come from the
// law of cosines except for triplets with a pair close to the anchor, where that cancels and the
// dot of the difference vectors is formed instead.
//
// Distances (euclidean / squared-euclidean affinities, RKD-D, RKD-A) use centred features (the
// batch mean subtracted: distances do not see it, the Gram form n_i + n_j - 2 g cancels less),
// and a pair whose Gram-form squared distance is below kClosePairRatio * (n_i + n_j) is
// recomputed from the difference x_i - x_j, forward and backward (its gradient term
// W_ij (x_i - x_j) applied directly instead of through the tile product).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

#include "common/affinity.h"
#include "common/codes.h"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/macros.h"

#if defined(__AVX512F__)
#define KDOPS_VEC_BYTES 64
#elif defined(__AVX__)
#define KDOPS_VEC_BYTES 32
#else
#define KDOPS_VEC_BYTES 16
#endif

namespace kdops {
namespace {

// GCC / clang vectors of the accumulation type, the native vector width.
template <typename A>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(KDOPS_VEC_BYTES)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(KDOPS_VEC_BYTES)));
};

// c + a * b, fused where the CPU has FMA (this file is compiled with -ffp-contract=off, so that
// the epilogues' differences such as u - v cancel exactly for identical inputs).
template <typename V>
KD_HD V fma_vec(V a, V b, V c) {
#if KDOPS_VEC_BYTES == 64
  if constexpr (sizeof(a[0]) == 4) return _mm512_fmadd_ps(a, b, c);
  else return _mm512_fmadd_pd(a, b, c);
#elif KDOPS_VEC_BYTES == 32 && defined(__FMA__)
  if constexpr (sizeof(a[0]) == 4) return _mm256_fmadd_ps(a, b, c);
  else return _mm256_fmadd_pd(a, b, c);
#else
  return c + a * b;
#endif
}

template <typename A>
constexpr int kLanes = KDOPS_VEC_BYTES / int(sizeof(A));
constexpr int kMR = 8;  // rows of a micro-tile
template <typename A>
constexpr int kNR = 2 * kLanes<A>;  // columns of a micro-tile: two vectors (divides kPanel)
constexpr int64_t kPanel = 32;      // rows per packed panel
constexpr int64_t kTile = 128;      // rows / columns of a Gram tile (a multiple of kPanel)

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// c[m][n] (+)= sum_k a[k * sa + m] * b[k * sb + n] for m < kMR, n < kNR (c row stride sc): the
// accumulators stay in registers for the whole k loop.
template <typename A, bool ACCUMULATE>
KD_HD void micro_kernel(int64_t K, const A* a, int64_t sa, const A* b, int64_t sb, A* c, int64_t sc) {
  using V = typename Vec<A>::type;
  constexpr int L = kLanes<A>;
  V acc[kMR][2];
#pragma GCC unroll 8
  for (int m = 0; m < kMR; ++m) {
    if (ACCUMULATE) {
      std::memcpy(&acc[m][0], c + m * sc, sizeof(V));
      std::memcpy(&acc[m][1], c + m * sc + L, sizeof(V));
    } else {
      acc[m][0] = V{};
      acc[m][1] = V{};
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    V b0, b1;
    std::memcpy(&b0, b + k * sb, sizeof(V));
    std::memcpy(&b1, b + k * sb + L, sizeof(V));
    const A* ak = a + k * sa;
#pragma GCC unroll 8
    for (int m = 0; m < kMR; ++m) {
      const V a_m = V{} + ak[m];
      acc[m][0] = fma_vec(a_m, b0, acc[m][0]);
      acc[m][1] = fma_vec(a_m, b1, acc[m][1]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < kMR; ++m) {
    std::memcpy(c + m * sc, &acc[m][0], sizeof(V));
    std::memcpy(c + m * sc + L, &acc[m][1], sizeof(V));
  }
}

// Features in the accumulation type: `panels` ([panel][k][row], rows padded with zeros to
// kPanel) for Gram tiles, and optionally `rows` (row-major, [round_up(B, kTile)][dim_pad],
// zero-padded) for applying pair weights; `sq_norms` = ||x_i||^2.
template <typename A>
struct Features {
  int64_t batch = 0, dim = 0, dim_pad = 0;
  std::vector<A> panels, rows, sq_norms;
  std::vector<A> raw_rows;  // with rows of centred features: the uncentred rows (same layout)

  const A* panel_at(int64_t row) const { return panels.data() + (row / kPanel) * dim * kPanel + row % kPanel; }
  const A* row_at(int64_t row) const { return rows.data() + row * dim_pad; }
  // The uncentred row: the differences of close rows are exact there (those of centred rows carry
  // the rounding of x - mean, up to ulp(|x - mean|), however close the rows are).
  const A* raw_at(int64_t row) const { return (raw_rows.empty() ? rows : raw_rows).data() + row * dim_pad; }
};

// CENTRE: the batch mean of each column subtracted (for distances).
template <typename T>
Features<acc_type<T>> load_features(const T* x, int64_t B, int64_t D, int64_t stride, bool with_rows,
                                    bool centre = false) {
  using A = acc_type<T>;
  std::vector<A> mean(D, A(0));
  if (centre && B > 0) {
    for (int64_t i = 0; i < B; ++i) {
      const T* xi = x + i * stride;
#pragma omp simd
      for (int64_t k = 0; k < D; ++k) mean[k] += to_acc(xi[k]);
    }
    for (A& m : mean) m /= A(B);
  }
  const A* mu = mean.data();
  Features<A> f;
  f.batch = B;
  f.dim = D;
  f.dim_pad = round_up(D, kPanel);
  const int64_t n_panels = (B + kPanel - 1) / kPanel;
  f.panels.assign(n_panels * kPanel * D, A(0));
  f.sq_norms.assign(B, A(0));
  if (with_rows) f.rows.assign(round_up(B, kTile) * f.dim_pad, A(0));
  if (with_rows && centre) f.raw_rows.assign(B * f.dim_pad, A(0));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < B; ++i) {
    const T* xi = x + i * stride;
    A* packed = f.panels.data() + (i / kPanel) * D * kPanel + i % kPanel;
    A sq = 0;
    for (int64_t k = 0; k < D; ++k) {
      const A v = to_acc(xi[k]) - mu[k];
      packed[k * kPanel] = v;
      sq += v * v;
    }
    f.sq_norms[i] = sq;
    if (with_rows) {
      A* row = f.rows.data() + i * f.dim_pad;
#pragma omp simd
      for (int64_t k = 0; k < D; ++k) row[k] = to_acc(xi[k]) - mu[k];
      if (centre) {
        A* raw = f.raw_rows.data() + i * f.dim_pad;
#pragma omp simd
        for (int64_t k = 0; k < D; ++k) raw[k] = to_acc(xi[k]);
      }
    }
  }
  return f;
}

// g[i - i0][j - j0] = x_i . x_j for the tile rows [i0, i0 + kTile) x [j0, j0 + kTile) (g row
// stride kTile; rows and columns past the last panel are left as they are).
template <typename A>
void gram_tile(const Features<A>& f, int64_t i0, int64_t j0, A* g) {
  const int64_t end = round_up(f.batch, kPanel);
  const int64_t i_end = std::min(i0 + kTile, end), j_end = std::min(j0 + kTile, end);
  for (int64_t j = j0; j < j_end; j += kNR<A>) {
    const A* b = f.panel_at(j);
    for (int64_t i = i0; i < i_end; i += kMR) {
      micro_kernel<A, false>(f.dim, f.panel_at(i), kPanel, b, kPanel, g + (i - i0) * kTile + (j - j0), kTile);
    }
  }
}

// dx[i] += sum_{k < K} w[k][i] x_k for the n_rows rows i of dx (row stride dim_pad): w is
// [K][kTile] (k-major); x_packed holds the K rows x_k by column chunks, [chunk][k][kNR] (see
// pack_rows), so that the micro-kernel reads it contiguously.
template <typename A>
void apply_tile(const A* w, int64_t K, const A* x_packed, A* dx, int64_t dim_pad, int64_t n_rows) {
  for (int64_t d = 0; d < dim_pad; d += kNR<A>) {
    const A* b = x_packed + d * K;
    for (int64_t i = 0; i < n_rows; i += kMR) {
      micro_kernel<A, true>(K, w + i, kTile, b, kNR<A>, dx + i * dim_pad + d, dim_pad);
    }
  }
}

// The K rows from `rows` (row stride dim_pad) as [dim_pad / kNR][K][kNR] into out.
template <typename A>
void pack_rows(const A* rows, int64_t K, int64_t dim_pad, A* out) {
  constexpr int NR = kNR<A>;
  for (int64_t d = 0; d < dim_pad; d += NR) {
    A* o = out + d * K;
    for (int64_t k = 0; k < K; ++k) std::memcpy(o + k * NR, rows + k * dim_pad + d, NR * sizeof(A));
  }
}

// Calls f(I, J, thread) once for every pair of row blocks I, J (both orders of a pair count
// once; I == J included), in rounds during which no two calls share a row block.
template <typename F>
void for_each_tile_pair(int64_t n_blocks, F&& f) {
  const int64_t n = n_blocks + (n_blocks & 1);  // a bye block when odd
#pragma omp parallel
  {
    const int tid = thread_id();
#pragma omp for schedule(dynamic, 1)
    for (int64_t I = 0; I < n_blocks; ++I) f(I, I, tid);
    for (int64_t round = 0; round + 1 < n; ++round) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t k = 0; k < n / 2; ++k) {
        const int64_t I = k == 0 ? n - 1 : (round + k) % (n - 1);
        const int64_t J = k == 0 ? round : (round - k + n - 1) % (n - 1);
        if (I < n_blocks && J < n_blocks) f(I, J, tid);
      }
    }
  }
}

// Per-thread scratch tiles of kTile x kTile.
template <typename A>
struct Scratch {
  int per_thread;
  std::vector<A> data;
  explicit Scratch(int tiles) : per_thread(tiles), data(size_t(max_threads()) * tiles * kTile * kTile) {}
  A* tile(int thread, int index) { return data.data() + (size_t(thread) * per_thread + index) * kTile * kTile; }
};

// The backward's accumulation of dx = sum_j W_ij x_j + delta_i x_i over tile pairs: for a pair
// (I, J) the caller fills w ([i][j]) and wt ([j][i]) (zero outside the batch) and delta.
template <typename A>
struct GradientAccumulator {
  const Features<A>& f;
  std::vector<A> dx, delta, packed;  // packed: per thread, kTile rows of features (pack_rows)

  explicit GradientAccumulator(const Features<A>& features)
      : f(features),
        dx(features.rows.size(), A(0)),
        delta(features.batch, A(0)),
        packed(size_t(max_threads()) * kTile * features.dim_pad) {}

  void apply(int64_t I, int64_t J, const A* w, const A* wt, int tid) {
    const int64_t i0 = I * kTile, j0 = J * kTile;
    const int64_t ni = std::min(kTile, f.batch - i0), nj = std::min(kTile, f.batch - j0);
    A* x_packed = packed.data() + size_t(tid) * kTile * f.dim_pad;
    pack_rows(f.row_at(j0), nj, f.dim_pad, x_packed);
    apply_tile(wt, nj, x_packed, dx.data() + i0 * f.dim_pad, f.dim_pad, round_up(ni, kMR));
    if (I != J) {
      pack_rows(f.row_at(i0), ni, f.dim_pad, x_packed);
      apply_tile(w, ni, x_packed, dx.data() + j0 * f.dim_pad, f.dim_pad, round_up(nj, kMR));
    }
  }

  template <typename T>
  void store(T* out) const {
    const int64_t D = f.dim;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < f.batch; ++i) {
      const A* g = dx.data() + i * f.dim_pad;
      const A* x = f.row_at(i);
      const A di = delta[i];
      T* o = out + i * D;
#pragma omp simd
      for (int64_t k = 0; k < D; ++k) o[k] = from_acc<T>(g[k] + di * x[k]);
    }
  }
};

// Zeroes w / wt, then calls weight(i, j) -> W_ij for the valid pairs of tile (I, J), storing
// W_ij in w[i][j] and wt[j][i].
template <typename A, typename F>
KD_HD void fill_weights(int64_t I, int64_t J, int64_t B, A* w, A* wt, F&& weight) {
  std::fill(w, w + kTile * kTile, A(0));
  std::fill(wt, wt + kTile * kTile, A(0));
  const int64_t i0 = I * kTile, j0 = J * kTile;
  const int64_t ni = std::min(kTile, B - i0), nj = std::min(kTile, B - j0);
  for (int64_t a = 0; a < ni; ++a) {
#pragma omp simd
    for (int64_t b = 0; b < nj; ++b) w[a * kTile + b] = weight(a, b);
  }
  for (int64_t a = 0; a < ni; ++a) {
    for (int64_t b = 0; b < nj; ++b) wt[b * kTile + a] = w[a * kTile + b];
  }
}

template <typename A>
KD_HD A inv_norm(A sq) {
  return A(1) / std::max(std::sqrt(sq), A(kNormEps));
}

// sum_k (a_k - b_k)^2.
template <typename A>
A squared_difference(const A* a, const A* b, int64_t D) {
  A acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < D; ++k) acc += (a[k] - b[k]) * (a[k] - b[k]);
  return acc;
}

// The squared distance of rows i, j of f (centred, with rows) from their Gram entry g: the Gram
// form max(n_i + n_j - 2 g, 0), or the difference form for a close pair.
template <typename A>
A squared_distance(const Features<A>& f, int64_t i, int64_t j, A g) {
  const A n_i = f.sq_norms[i], n_j = f.sq_norms[j];
  const A d2 = std::max(n_i + n_j - 2 * g, A(0));
  return close_pair(d2, n_i, n_j) ? squared_difference(f.raw_at(i), f.raw_at(j), f.dim) : d2;
}

// d_ij = sqrt(max(d2, 1e-12)), 0 for i == j.
template <typename A>
KD_HD A distance_of(A d2, bool same) {
  return same ? A(0) : std::sqrt(std::max(d2, A(kDistEps2)));
}

// dx_i += w (x_i - x_j) and, with BOTH, dx_j += w (x_j - x_i): a close pair's gradient term
// (dx rows of stride dim_pad, features f with rows; differences of the uncentred rows).
template <typename A>
void add_pair_term(const Features<A>& f, A* dx, int64_t i, int64_t j, A w, bool both) {
  const A *xi = f.raw_at(i), *xj = f.raw_at(j);
  A *di = dx + i * f.dim_pad, *dj = dx + j * f.dim_pad;
#pragma omp simd
  for (int64_t k = 0; k < f.dim; ++k) {
    const A d = w * (xi[k] - xj[k]);
    di[k] += d;
    if (both) dj[k] -= d;
  }
}

// ---- affinity ----

template <typename T>
void affinity_forward(const AffinityParams& p) {
  using A = acc_type<T>;
  const int64_t B = p.batch;
  const bool dist = p.kind == kEuclidean || p.kind == kSquaredEuclidean;
  const Features<A> f = load_features(static_cast<const T*>(p.x), B, p.dim, p.x_stride, dist, dist);
  A* out = static_cast<A*>(p.out);
  const int64_t so = p.out_stride;
  const int kind = p.kind;
  const A* n = f.sq_norms.data();
  Scratch<A> scratch(1);
  for_each_tile_pair((B + kTile - 1) / kTile, [&](int64_t I, int64_t J, int tid) {
    A* g = scratch.tile(tid, 0);
    const int64_t i0 = I * kTile, j0 = J * kTile;
    gram_tile(f, i0, j0, g);
    for (int64_t i = i0; i < std::min(i0 + kTile, B); ++i) {
      for (int64_t j = j0; j < std::min(j0 + kTile, B); ++j) {
        const A gij = g[(i - i0) * kTile + (j - j0)];
        A a;
        if (kind == kDot) {
          a = gij;
        } else if (kind == kCosine) {
          a = gij * inv_norm(n[i]) * inv_norm(n[j]);
        } else if (kind == kEuclidean) {
          a = distance_of(squared_distance(f, i, j, gij), i == j);
        } else {
          a = i == j ? A(0) : squared_distance(f, i, j, gij);
        }
        out[i * so + j] = a;
        out[j * so + i] = a;
      }
    }
  });
}

// dx of the affinity A (row stride sa) from grad = dL/dA (strides sg0, sg1), on features f.
template <typename A>
GradientAccumulator<A> affinity_gradient(const Features<A>& f, int kind, const A* grad, int64_t sg0, int64_t sg1,
                                         const A* aff, int64_t sa) {
  const int64_t B = f.batch;
  const A* n = f.sq_norms.data();
  GradientAccumulator<A> acc(f);
  const bool dist = kind == kEuclidean || kind == kSquaredEuclidean;
  Scratch<A> scratch(2);
  for_each_tile_pair((B + kTile - 1) / kTile, [&](int64_t I, int64_t J, int tid) {
    const int64_t i0 = I * kTile, j0 = J * kTile;
    A* w = scratch.tile(tid, 0);
    A* wt = scratch.tile(tid, 1);
    fill_weights(I, J, B, w, wt, [&](int64_t a, int64_t b) {
      const int64_t i = i0 + a, j = j0 + b;
      const A s = grad[i * sg0 + j * sg1] + grad[j * sg0 + i * sg1];
      if (kind == kDot) return s;
      if (kind == kCosine) return s * inv_norm(n[i]) * inv_norm(n[j]);
      if (kind == kSquaredEuclidean) return i == j ? A(0) : A(2) * s;
      const A aij = aff[i * sa + j];  // A_ij > sqrt(1e-12) exactly where d2_ij > 1e-12
      return i != j && aij * aij > A(kDistEps2) ? s / aij : A(0);
    });
    // delta: cosine -sum_j S_ij A_ij / r_i^2 (0 where r_i is clamped); DIST rowsum(W), W -> -W,
    // except close pairs, whose W_ij (x_i - x_j) is added directly
    const int64_t ni = std::min(kTile, B - i0), nj = std::min(kTile, B - j0);
    for (int64_t a = 0; a < ni && (kind == kCosine || dist); ++a) {
      for (int64_t b = 0; b < nj; ++b) {
        const int64_t i = i0 + a, j = j0 + b;
        A term = w[a * kTile + b];
        if (dist && term != A(0)) {
          const A aij = aff[i * sa + j];
          if (close_pair(kind == kEuclidean ? aij * aij : aij, n[i], n[j])) {
            add_pair_term(f, acc.dx.data(), i, j, term, I != J);
            w[a * kTile + b] = wt[b * kTile + a] = A(0);
            continue;
          }
        }
        if (kind == kCosine) {  // S_ij A_ij, -1/r^2 below (S and A are symmetric)
          term = (grad[i * sg0 + j * sg1] + grad[j * sg0 + i * sg1]) * aff[i * sa + j];
        }
        acc.delta[i] += kind == kCosine ? (n[i] > A(kNormEps2) ? -term / n[i] : A(0)) : term;
        if (I != J) acc.delta[j] += kind == kCosine ? (n[j] > A(kNormEps2) ? -term / n[j] : A(0)) : term;
      }
    }
    if (dist) {
      for (int64_t e = 0; e < kTile * kTile; ++e) {
        w[e] = -w[e];
        wt[e] = -wt[e];
      }
    }
    acc.apply(I, J, w, wt, tid);
  });
  return acc;
}

template <typename T>
void affinity_backward(const AffinityParams& p) {
  using A = acc_type<T>;
  const bool dist = p.kind == kEuclidean || p.kind == kSquaredEuclidean;
  const Features<A> f = load_features(static_cast<const T*>(p.x), p.batch, p.dim, p.x_stride, true, dist);
  affinity_gradient(f, p.kind, static_cast<const A*>(p.grad), p.grad_stride0, p.grad_stride1,
                    static_cast<const A*>(p.affinity), p.out_stride)
      .store(static_cast<T*>(p.dx));
}

// ---- SP and RKD-D ----

// Calls f(I, J, gs, gt, tid) with the Gram tiles of student and teacher for every tile pair.
template <typename A, typename F>
void for_each_gram_pair(const Features<A>& s, const Features<A>& t, Scratch<A>& scratch, F&& f) {
  for_each_tile_pair((s.batch + kTile - 1) / kTile, [&](int64_t I, int64_t J, int tid) {
    A* gs = scratch.tile(tid, 0);
    A* gt = scratch.tile(tid, 1);
    gram_tile(s, I * kTile, J * kTile, gs);
    gram_tile(t, I * kTile, J * kTile, gt);
    f(I, J, gs, gt, tid);
  });
}

// Calls term(i, j, gs_ij, gt_ij) for the valid pairs of tile (I, J).
template <typename A, typename F>
KD_HD void for_each_pair(int64_t I, int64_t J, int64_t B, const A* gs, const A* gt, F&& term) {
  const int64_t i0 = I * kTile, j0 = J * kTile;
  for (int64_t i = i0; i < std::min(i0 + kTile, B); ++i) {
    const A* gs_row = gs + (i - i0) * kTile - j0;
    const A* gt_row = gt + (i - i0) * kTile - j0;
    for (int64_t j = j0; j < std::min(j0 + kTile, B); ++j) term(i, j, gs_row[j], gt_row[j]);
  }
}

template <typename A>
A sum(const std::vector<A>& v) {
  A total = 0;
  for (A x : v) total += x;
  return total;
}

template <typename T>
void relation_forward(const RelationParams& p) {
  using A = acc_type<T>;
  const int64_t B = p.batch;
  const bool sp = p.loss == kSP;  // RKD-D: centred features with rows (close pairs)
  const auto s = load_features(static_cast<const T*>(p.student), B, p.student_dim, p.student_stride, !sp, !sp);
  const auto t = load_features(static_cast<const T*>(p.teacher), B, p.teacher_dim, p.teacher_stride, !sp, !sp);
  A* stats = static_cast<A*>(p.stats);
  Scratch<A> scratch(2);
  std::vector<A> row_s(B, A(0)), row_t(B, A(0)), row_loss(B, A(0)), row_aux(B, A(0));
  if (sp) {
    // pass 1: r_i^2 = sum_j G_ij^2
    for_each_gram_pair(s, t, scratch, [&](int64_t I, int64_t J, const A* gs, const A* gt, int) {
      for_each_pair(I, J, B, gs, gt, [&](int64_t i, int64_t j, A a, A b) {
        row_s[i] += a * a;
        row_t[i] += b * b;
        if (I != J) {
          row_s[j] += a * a;
          row_t[j] += b * b;
        }
      });
    });
    A* inv_rs = stats;
    A* inv_rt = stats + B;
    for (int64_t i = 0; i < B; ++i) {
      inv_rs[i] = A(1) / std::max(std::sqrt(row_s[i]), A(kNormEps));
      inv_rt[i] = A(1) / std::max(std::sqrt(row_t[i]), A(kNormEps));
    }
    // pass 2: sum_j z_ij^2 and c_i = sum_j z_ij u_ij, u = G^s / r^s, z = u - G^t / r^t
    for_each_gram_pair(s, t, scratch, [&](int64_t I, int64_t J, const A* gs, const A* gt, int) {
      for_each_pair(I, J, B, gs, gt, [&](int64_t i, int64_t j, A a, A b) {
        const A u = a * inv_rs[i], z = u - b * inv_rt[i];
        row_loss[i] += z * z;
        row_aux[i] += z * u;
        if (I != J) {
          const A u2 = a * inv_rs[j], z2 = u2 - b * inv_rt[j];
          row_loss[j] += z2 * z2;
          row_aux[j] += z2 * u2;
        }
      });
    });
    for (int64_t i = 0; i < B; ++i) stats[2 * B + i] = row_s[i] > A(kNormEps2) ? row_aux[i] : A(0);
    *static_cast<A*>(p.loss_out) = sum(row_loss) / A(B * B);
    return;
  }
  // RKD-D. pass 1: the sums of the distances, so mu = sum / P
  const A pairs = A(B * (B - 1));
  for_each_gram_pair(s, t, scratch, [&](int64_t I, int64_t J, const A* gs, const A* gt, int) {
    const A mult = I == J ? A(1) : A(2);  // the pair (j, i) of the other tile
    for_each_pair(I, J, B, gs, gt, [&](int64_t i, int64_t j, A a, A b) {
      row_s[i] += mult * distance_of(squared_distance(s, i, j, a), i == j);
      row_t[i] += mult * distance_of(squared_distance(t, i, j, b), i == j);
    });
  });
  const A mu_s = sum(row_s) / pairs, mu_t = sum(row_t) / pairs;
  // pass 2: sum h(z), z = d^s / mu_s - d^t / mu_t, and kappa = 1/P sum h'(z) d^s / mu_s
  const A beta = A(p.beta);
  for_each_gram_pair(s, t, scratch, [&](int64_t I, int64_t J, const A* gs, const A* gt, int) {
    const A mult = I == J ? A(1) : A(2);
    for_each_pair(I, J, B, gs, gt, [&](int64_t i, int64_t j, A a, A b) {
      const A u = distance_of(squared_distance(s, i, j, a), i == j) / mu_s;
      const A z = u - distance_of(squared_distance(t, i, j, b), i == j) / mu_t;
      row_loss[i] += mult * smooth_l1(z, beta);
      row_aux[i] += mult * smooth_l1_grad(z, beta) * u;
    });
  });
  stats[0] = mu_s;
  stats[1] = mu_t;
  stats[2] = sum(row_aux) / pairs;
  *static_cast<A*>(p.loss_out) = sum(row_loss) / pairs;
}

template <typename T>
void relation_backward_gram(const RelationParams& p) {
  using A = acc_type<T>;
  const int64_t B = p.batch;
  const bool sp = p.loss == kSP;  // RKD-D: centred features with rows (close pairs)
  const auto s = load_features(static_cast<const T*>(p.student), B, p.student_dim, p.student_stride, true, !sp);
  const auto t = load_features(static_cast<const T*>(p.teacher), B, p.teacher_dim, p.teacher_stride, !sp, !sp);
  const A* stats = static_cast<const A*>(p.stats);
  const A grad = *static_cast<const A*>(p.grad);
  const A* ns = s.sq_norms.data();
  GradientAccumulator<A> acc(s);
  Scratch<A> scratch(4);
  const A scale = grad * A(2) / A(sp ? B * B : B * (B - 1));
  const A beta = A(p.beta);
  for_each_gram_pair(s, t, scratch, [&](int64_t I, int64_t J, const A* gs, const A* gt, int tid) {
    const int64_t i0 = I * kTile, j0 = J * kTile;
    A* w = scratch.tile(tid, 2);
    A* wt = scratch.tile(tid, 3);
    if (sp) {
      // W_ij = scale ((u_ij - v_ij - c_i u_ij) / r^s_i + (u_ji - v_ji - c_j u_ji) / r^s_j)
      const A *inv_rs = stats, *inv_rt = stats + B, *c = stats + 2 * B;
      fill_weights(I, J, B, w, wt, [&](int64_t a, int64_t b) {
        const int64_t i = i0 + a, j = j0 + b;
        const A g = gs[a * kTile + b], h = gt[a * kTile + b];
        const A u_ij = g * inv_rs[i], u_ji = g * inv_rs[j];
        return scale * ((u_ij - h * inv_rt[i] - c[i] * u_ij) * inv_rs[i] +
                        (u_ji - h * inv_rt[j] - c[j] * u_ji) * inv_rs[j]);
      });
    } else {
      // DIST form with w_ij = scale (h'(z_ij) - kappa) / (mu_s d_ij) where d2_ij > 1e-12; close
      // pairs' w_ij (x_i - x_j) added directly
      const A mu_s = stats[0], mu_t = stats[1], kappa = stats[2];
      fill_weights(I, J, B, w, wt, [&](int64_t a, int64_t b) {
        const int64_t i = i0 + a, j = j0 + b;
        const A d2 = squared_distance(s, i, j, gs[a * kTile + b]);
        const A ds = distance_of(d2, i == j);
        const A z = ds / mu_s - distance_of(squared_distance(t, i, j, gt[a * kTile + b]), i == j) / mu_t;
        const bool live = i != j && d2 > A(kDistEps2);
        return live ? scale * (smooth_l1_grad(z, beta) - kappa) / (mu_s * ds) : A(0);
      });
      const int64_t ni = std::min(kTile, B - i0), nj = std::min(kTile, B - j0);
      for (int64_t a = 0; a < ni; ++a) {
        for (int64_t b = 0; b < nj; ++b) {
          const int64_t i = i0 + a, j = j0 + b;
          const A wij = w[a * kTile + b];
          if (wij != A(0) && close_pair(std::max(ns[i] + ns[j] - 2 * gs[a * kTile + b], A(0)), ns[i], ns[j])) {
            add_pair_term(s, acc.dx.data(), i, j, wij, I != J);
            w[a * kTile + b] = wt[b * kTile + a] = A(0);
            continue;
          }
          acc.delta[i0 + a] += wij;
          if (I != J) acc.delta[j0 + b] += wij;
        }
      }
      for (int64_t e = 0; e < kTile * kTile; ++e) {
        w[e] = -w[e];
        wt[e] = -wt[e];
      }
    }
    acc.apply(I, J, w, wt, tid);
  });
  acc.store(static_cast<T*>(p.dx));
}

// ---- RKD-A ----

// The exact squared distances sum_k (x_ik - x_jk)^2 ([B, B], 0 for equal rows) and the masked
// inverse square roots 1 / sqrt(E) (0 where E <= 1e-24).
template <typename A>
void exact_squared(const Features<A>& f, std::vector<A>& e, std::vector<A>& inv_sqrt) {
  const int64_t B = f.batch, D = f.dim;
  e.assign(B * B, A(0));
  inv_sqrt.assign(B * B, A(0));
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t i = 0; i < B; ++i) {
    const A* xi = f.raw_at(i);
    for (int64_t j = i + 1; j < B; ++j) {
      const A* xj = f.raw_at(j);
      A acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < D; ++k) acc += (xi[k] - xj[k]) * (xi[k] - xj[k]);
      e[i * B + j] = acc;
      e[j * B + i] = acc;
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < B * B; ++i) {
    inv_sqrt[i] = e[i] > A(kNormEps2) ? A(1) / std::sqrt(e[i]) : A(0);
  }
}

// The cosine at anchor w between x_u - x_w and x_v - x_w: the law of cosines, or where it cancels
// (skewed) the normalised dot of the differences of the rows of f.
template <typename A>
A cosine(const Features<A>& f, const A* e, const A* inv, int64_t u, int64_t v, int64_t w) {
  const int64_t B = f.batch;
  const A a = e[u * B + w], b = e[v * B + w], inv_ab = inv[u * B + w] * inv[v * B + w];
  if (!skewed(a, b, inv_ab)) return law_of_cosines(a, b, e[u * B + v], inv_ab);
  const A *xu = f.raw_at(u), *xv = f.raw_at(v), *xw = f.raw_at(w);
  A dot = 0;
  for (int64_t k = 0; k < f.dim; ++k) dot += (xu[k] - xw[k]) * (xv[k] - xw[k]);
  return dot * inv_ab;
}

// The four [B, B] tables of RKD-A: the student's and the teacher's exact squared distances (es,
// et) and their masked inverse square roots (is, it); Row points at row i of each.
template <typename A>
struct AngleTables {
  struct Row {
    const A *es, *is, *et, *it;
  };
  int64_t batch;
  std::vector<A> es, is, et, it;
  Row row(int64_t i) const {
    const int64_t offset = i * batch;
    return {es.data() + offset, is.data() + offset, et.data() + offset, it.data() + offset};
  }
};

// visit(i, row i, r, row r, flagged) for every pair of rows (i, r): the rows i spread over the
// threads, each i on one thread with r in order (a result per i is summed in a fixed order: an
// OpenMP reduction adds the threads' partials in an order that varies from call to call);
// flagged: the thread's B bytes of scratch for the triplets where the law of cosines cancels.
template <typename A, typename Visit>
void for_each_row_pair(const AngleTables<A>& tab, Visit visit) {
  const int64_t B = tab.batch;
#pragma omp parallel
  {
    std::vector<unsigned char> flagged(B);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < B; ++i) {
      const auto row_i = tab.row(i);
      for (int64_t r = 0; r < B; ++r) visit(i, row_i, r, tab.row(r), flagged.data());
    }
  }
}

// Forward: returns the loss. Backward (grad != nullptr): dx into p.dx.
// Triplet (p, r, q) has anchor r, a = E_pr, b = E_qr, c = E_pq. The inner loops take the law of
// cosines (vectorised) and flag the triplets where it cancels (skewed, for either model), which
// a second loop then adds with the cosines of the differences.
template <typename T>
acc_type<T> rkd_angle(const RelationParams& p, const acc_type<T>* grad) {
  using A = acc_type<T>;
  using Row = typename AngleTables<A>::Row;
  const int64_t B = p.batch;
  const auto s = load_features(static_cast<const T*>(p.student), B, p.student_dim, p.student_stride, true, true);
  const auto t = load_features(static_cast<const T*>(p.teacher), B, p.teacher_dim, p.teacher_stride, true, true);
  AngleTables<A> tab{B, {}, {}, {}, {}};
  exact_squared(s, tab.es, tab.is);
  exact_squared(t, tab.et, tab.it);
  const A beta = A(p.beta);
  // the cosine at anchor w of the student's (cos_s) and the teacher's (cos_t) rows u, v
  const auto cos_s = [&](int64_t u, int64_t v, int64_t w) { return cosine(s, tab.es.data(), tab.is.data(), u, v, w); };
  const auto cos_t = [&](int64_t u, int64_t v, int64_t w) { return cosine(t, tab.et.data(), tab.it.data(), u, v, w); };
  if (grad == nullptr) {
    std::vector<A> row_loss(B, A(0));  // per anchor row q
    for_each_row_pair(tab, [&](int64_t q, Row row_q, int64_t r, Row row_r, unsigned char* fl) {
      const A bs = row_q.es[r], ibs = row_q.is[r], bt = row_q.et[r], ibt = row_q.it[r];
      A row_total = row_loss[q];
#pragma omp simd reduction(+ : row_total)
      for (int64_t pp = 0; pp < B; ++pp) {  // triplet (pp, r, q)
        const A inv_s = row_r.is[pp] * ibs, inv_t = row_r.it[pp] * ibt;
        const bool skew = skewed(row_r.es[pp], bs, inv_s) || skewed(row_r.et[pp], bt, inv_t);
        const A law_s = law_of_cosines(row_r.es[pp], bs, row_q.es[pp], inv_s);
        const A law_t = law_of_cosines(row_r.et[pp], bt, row_q.et[pp], inv_t);
        row_total += skew ? A(0) : smooth_l1(law_s - law_t, beta);
        fl[pp] = skew;
      }
      for (int64_t pp = 0; pp < B; ++pp) {
        if (fl[pp]) row_total += smooth_l1(cos_s(pp, q, r) - cos_t(pp, q, r), beta);
      }
      row_loss[q] = row_total;
    });
    return sum(row_loss) / (A(B) * A(B) * A(B));
  }
  // Delta_pq = scale sum_r angle_delta_term(...); the masks are the zero inverse square roots.
  std::vector<A> delta(B * B, A(0));
  for_each_row_pair(tab, [&](int64_t pp, Row row_p, int64_t r, Row row_r, unsigned char* fl) {
    A* out = delta.data() + pp * B;
    const A as = row_p.es[r], ias = row_p.is[r], at = row_p.et[r], iat = row_p.it[r];
#pragma omp simd
    for (int64_t q = 0; q < B; ++q) {
      // triplet (p, r, q): a = E_pr, b = E_qr, c = E_pq; triplet (p, q, r): a = E_pq, b = E_rq, c = E_pr
      const A inv1_s = ias * row_r.is[q], inv1_t = iat * row_r.it[q];
      const A inv2_s = row_p.is[q] * row_r.is[q], inv2_t = row_p.it[q] * row_r.it[q];
      const bool skew = skewed(as, row_r.es[q], inv1_s) || skewed(at, row_r.et[q], inv1_t) ||
                        skewed(row_p.es[q], row_r.es[q], inv2_s) || skewed(row_p.et[q], row_r.et[q], inv2_t);
      const A term = angle_delta_term(inv1_s, law_of_cosines(as, row_r.es[q], row_p.es[q], inv1_s),
                                      law_of_cosines(at, row_r.et[q], row_p.et[q], inv1_t), inv2_s, row_p.is[q],
                                      law_of_cosines(row_p.es[q], row_r.es[q], as, inv2_s),
                                      law_of_cosines(row_p.et[q], row_r.et[q], at, inv2_t), beta);
      out[q] += skew ? A(0) : term;
      fl[q] = skew;
    }
    for (int64_t q = 0; q < B; ++q) {
      if (!fl[q]) continue;
      out[q] += angle_delta_term(ias * row_r.is[q], cos_s(pp, q, r), cos_t(pp, q, r), row_p.is[q] * row_r.is[q],
                                 row_p.is[q], cos_s(pp, r, q), cos_t(pp, r, q), beta);
    }
  });
  const A scale = *grad / (A(B) * A(B) * A(B));
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < B * B; ++i) delta[i] *= scale;
  affinity_gradient(s, kSquaredEuclidean, delta.data(), B, 1, tab.es.data(), B).store(static_cast<T*>(p.dx));
  return A(0);
}

}  // namespace

void affinity_forward_cpu(const AffinityParams& p) {
  if (p.batch == 0) return;
  with_dtype(p.dtype, [&](auto type) { affinity_forward<typename decltype(type)::type>(p); });
}

void affinity_backward_cpu(const AffinityParams& p) {
  if (p.batch == 0) return;
  with_dtype(p.dtype, [&](auto type) { affinity_backward<typename decltype(type)::type>(p); });
}

void relation_forward_cpu(const RelationParams& p) {
  with_dtype(p.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    if (p.loss == kRKDAngle) {
      *static_cast<acc_type<T>*>(p.loss_out) = rkd_angle<T>(p, nullptr);
    } else {
      relation_forward<T>(p);
    }
  });
}

void relation_backward_cpu(const RelationParams& p) {
  with_dtype(p.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    if (p.loss == kRKDAngle) {
      rkd_angle<T>(p, static_cast<const acc_type<T>*>(p.grad));
    } else {
      relation_backward_gram<T>(p);
    }
  });
}

}  // namespace kdops
