// The fused temperature-softmax KD kernel on the GPU: kd_forward_cuda (see common/kd.h).
//
// One thread block per row (a grid-stride loop over rows) runs the three passes of
// common/divergence.h, each a block-wide sweep of the row in vectors (see Sweep):
//   1. online max / sums of s and t, merged across the block: the log-softmax offsets of
//      s / T, t / T and, with the hard-label term, s.
//   2. D and S (every divergence but forward KL); block sum.
//   3. the gradient row, and D for forward KL (S = -1).
// Pass 1 leaves the rows in L2 for the later passes (the last pass loads them evict-first), so
// that HBM sees each logit about once. With K > 1 teachers (MULTI), pass 1 also sweeps teachers
// 1..K-1 for their logsumexp (kept in dynamic shared memory), and an element's teacher
// log-probability is the mixture's, logsumexp_k(log w_k + (t_k - m_k) / T - log z_k), with
// teachers 1..K-1 loaded per element (teacher 0 rides in the sweep). Everything accumulates in
// float; float16 / bfloat16 use the storage types of common/dtype.h (Elem<T>: the hardware's cvt
// instructions). Row and teacher offsets are int64; offsets within a row (vocab < 2^31) int.
// With the models' logit transforms (TRANSFORM, common/logit_transform.h) every logit is
// transformed where it is loaded, and the gradient multiplied by the student transform's slope;
// the reduction's divisor (grad_divisor, a device scalar) divides it before its one rounding.
// The hard target (kHard, DeiT): pass 1 keeps the teacher's running argmax (ArgMax) instead of
// its max / sum; with MULTI a second sweep takes the argmax of the mixture's log-probabilities;
// pass 3 writes the gradient with q = -onehot(argmax), S = -1, without reading the teacher.
//
// The build compiles this file KDOPS_KD_PARTS times, with KDOPS_KD_PART = 0 .. KDOPS_KD_PARTS - 1
// (CMakeLists.txt; in parallel: one unit of every instantiation took 128 s per architecture on
// one core): part i holds the kernels of the divergences whose code % KDOPS_KD_PARTS is i, part 0
// the entry point kd_forward_cuda. Without the defines (tools/cuda_resource_check.py) one unit
// holds them all.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dispatch.h"
#include "common/divergence.h"
#include "common/dtype.h"
#include "common/kd.h"
#include "common/logit_transform.h"
#include "cuda/block_reduce.cuh"

#ifndef KDOPS_KD_PARTS
#define KDOPS_KD_PARTS 1
#define KDOPS_KD_PART 0
#endif

namespace kdops {

// The launches of part PART (the divergences whose code % KDOPS_KD_PARTS is PART).
template <int PART>
void kd_forward_part(const KDParams& p, cudaStream_t stream);

namespace {

constexpr int kMaxThreads = 512;
constexpr int64_t kMaxTeachers = 4096;  // their row statistics fill 32 KiB of shared memory
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte vector

// How a thread sweeps a row: vectors of `bytes` (16 or 4) and `unroll` of them in flight per
// tensor. Chosen per instantiation so that each fits the 64 registers of
// __launch_bounds__(kMaxThreads, 2) without spills (tools/cuda_resource_check.py): the hard-label
// term takes one vector at a time, and the mixture of K teachers, whose per-element loop over
// teachers 1..K-1 loads them one element at a time anyway, takes 4-byte words of student and
// teacher 0. One 16-byte vector of student and teacher per thread still keeps 32 KiB per SM in
// flight at two 512-thread blocks. 16-bit logits take one vector too: it holds 8 of them, as two
// float32 vectors do (two 16-bit vectors spilled 8-24 B on sm_90 / sm_100).
template <typename T, bool HARD, bool MULTI, bool TRANSFORM>
struct Sweep {
  static constexpr int bytes = MULTI ? 4 : 16;
  static constexpr int unroll = HARD || MULTI || TRANSFORM || sizeof(T) < 4 ? 1 : 2;
  static constexpr bool transform = TRANSFORM;
};

// The logits of both models as the kernel reads them: transformed when TR.
struct Transforms {
  LogitTransform<float> s, t;
};

template <bool TR>
__device__ __forceinline__ float read(const LogitTransform<float>& tr, float z) {
  if constexpr (TR) {
    return tr.apply(z);
  } else {
    return z;
  }
}

template <int BYTES>
struct VectorOf;
template <>
struct VectorOf<16> {
  using type = uint4;
};
template <>
struct VectorOf<4> {
  using type = unsigned int;
};

// L2 policy of a pass's loads: keep the lines for a later pass, or last use (evict first).
enum class Cache { kKeep, kLast };

template <Cache C, typename U>
__device__ __forceinline__ U load(const U* p) {
  return C == Cache::kKeep ? __ldg(p) : __ldcs(p);
}

// ---- sweeping a row ----

// K consecutive elements of a row from i0: logits x (student) and y (teacher) as floats, and the
// gradient g to store.
template <int K>
struct Chunk {
  static constexpr int size = K;
  int i0;
  float x[K], y[K], g[K];
};

// A row as a scalar head (up to N-element alignment), `nvec` N-element vectors and a scalar
// tail. Vectors need all the row's pointers at one offset from the vector alignment; otherwise
// the whole row is head.
struct Split {
  int head, nvec;
};

template <typename T, int N>
__device__ __forceinline__ Split split_row(const void* a, const void* b, const void* c, int vocab) {
  const auto offset = [](const void* p) { return int(reinterpret_cast<uintptr_t>(p) / sizeof(T) % N); };
  const int off = offset(a);
  if (offset(b) != off || (c != nullptr && offset(c) != off)) return {vocab, 0};
  const int head = min((N - off) % N, vocab);
  return {head, (vocab - head) / N};
}

// Calls f(chunk) on the chunks of the row that this thread owns (Chunk<1> or Chunk<N>, N the
// elements of a vector of SW::bytes; logits transformed by `tr` if SW::transform); with STORE,
// then writes chunk.g to g (evict-first: nothing here reads the gradient again).
template <typename T, typename SW, Cache C, bool STORE, typename F>
__device__ __forceinline__ void for_each_chunk(const Bits<T>* __restrict__ s, const Bits<T>* __restrict__ t,
                                               Bits<T>* __restrict__ g, int vocab, const Transforms& tr, F&& f) {
  using E = Elem<T>;
  using Vector = typename VectorOf<SW::bytes>::type;
  constexpr int N = SW::bytes / sizeof(T);
  constexpr int U = SW::unroll;
  const int tid = threadIdx.x, threads = blockDim.x;
  const Split sp = split_row<T, N>(s, t, STORE ? g : nullptr, vocab);

  const auto element = [&](int i) {
    Chunk<1> c;
    c.i0 = i;
    c.x[0] = read<SW::transform>(tr.s, E::bits_to_acc(load<C>(s + i)));
    c.y[0] = read<SW::transform>(tr.t, E::bits_to_acc(load<C>(t + i)));
    f(c);
    if constexpr (STORE) __stcs(g + i, E::acc_to_bits(c.g[0]));
  };
  const auto vector = [&](int v, Vector sv, Vector tv) {
    Bits<T> sb[N], tb[N];
    memcpy(sb, &sv, sizeof sv);
    memcpy(tb, &tv, sizeof tv);
    Chunk<N> c;
    c.i0 = sp.head + v * N;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      c.x[k] = read<SW::transform>(tr.s, E::bits_to_acc(sb[k]));
      c.y[k] = read<SW::transform>(tr.t, E::bits_to_acc(tb[k]));
    }
    f(c);
    if constexpr (STORE) {
      Bits<T> gb[N];
#pragma unroll
      for (int k = 0; k < N; ++k) gb[k] = E::acc_to_bits(c.g[k]);
      Vector gv;
      memcpy(&gv, gb, sizeof gv);
      __stcs(reinterpret_cast<Vector*>(g + c.i0), gv);
    }
  };

  for (int i = tid; i < sp.head; i += threads) element(i);
  const Vector* s4 = reinterpret_cast<const Vector*>(s + sp.head);
  const Vector* t4 = reinterpret_cast<const Vector*>(t + sp.head);
  int v = tid;
  for (; v + (U - 1) * threads < sp.nvec; v += U * threads) {
    Vector sv[U], tv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      sv[u] = load<C>(s4 + v + u * threads);
      tv[u] = load<C>(t4 + v + u * threads);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) vector(v + u * threads, sv[u], tv[u]);
  }
  for (; v < sp.nvec; v += threads) vector(v, load<C>(s4 + v), load<C>(t4 + v));
  for (int i = sp.head + sp.nvec * N + tid; i < vocab; i += threads) element(i);
}

template <typename T>
__device__ __forceinline__ void fill_zero(Bits<T>* g, int vocab) {
  constexpr int N = kVec<T>;
  const int tid = threadIdx.x, threads = blockDim.x;
  const Split sp = split_row<T, N>(g, g, nullptr, vocab);
  for (int i = tid; i < sp.head; i += threads) g[i] = Bits<T>(0);
  uint4* g4 = reinterpret_cast<uint4*>(g + sp.head);
  for (int v = tid; v < sp.nvec; v += threads) g4[v] = make_uint4(0, 0, 0, 0);
  for (int i = sp.head + sp.nvec * N + tid; i < vocab; i += threads) g[i] = Bits<T>(0);
}

// ---- online softmax statistics ----

// 2^x on the SFU, subnormal results flushed to 0: used only in sums that hold a term 1 (the
// maximum's), where that is invisible. 2^-inf = 0, NaN stays NaN.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A sum z of exp2((x - m) * c) moved from reference m to reference ref >= m; exact when m == ref.
__device__ __forceinline__ float rebase(float z, float m, float ref, float c) {
  return m == ref ? z : z * exp2_ftz((m - ref) * c);
}

// The running max m of raw logits x, z = sum exp2((x - m) * c) and, with ONE,
// z1 = sum exp2((x - m) * c1). Empty: m = -inf, sums 0. While m = -inf the sums use reference 0,
// so that no (-inf) - (-inf) occurs; NaN logits reach the sums.
template <bool ONE>
struct Stats {
  float m = -INFINITY, z = 0.f, z1 = 0.f;

  template <int K>
  __device__ __forceinline__ void add(const float (&x)[K], float c, float c1) {
    float mx = m;
#pragma unroll
    for (int k = 0; k < K; ++k) mx = fmaxf(mx, x[k]);
    const float ref = mx == -INFINITY ? 0.f : mx;
    float sz = rebase(z, m, ref, c), sz1 = ONE ? rebase(z1, m, ref, c1) : 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float d = x[k] - ref;
      sz += exp2_ftz(d * c);
      if (ONE) sz1 += exp2_ftz(d * c1);
    }
    m = mx;
    z = sz;
    z1 = sz1;
  }

  __device__ __forceinline__ void merge(const Stats& o, float c, float c1) {
    const float mx = fmaxf(m, o.m);
    const float ref = mx == -INFINITY ? 0.f : mx;
    z = rebase(z, m, ref, c) + rebase(o.z, o.m, ref, c);
    if (ONE) z1 = rebase(z1, m, ref, c1) + rebase(o.z1, o.m, ref, c1);
    m = mx;
  }
};

// The running max of a row's values, the first index holding it (0 while every value is -inf:
// the merge's identity) and whether a NaN was seen (NaNs are not compared). Each thread adds its
// elements in increasing index order; block_reduce moves it as three 4-byte words.
struct ArgMax {
  float m = -INFINITY;
  int index = 0;
  int nan = 0;

  __device__ __forceinline__ void add(float x, int i) {
    nan |= x != x;
    if (x > m) {
      m = x;
      index = i;
    }
  }

  __device__ __forceinline__ void merge(const ArgMax& o) {
    nan |= o.nan;
    if (o.m > m || (o.m == m && o.index < index)) {
      m = o.m;
      index = o.index;
    }
  }
};

// ARGMAX: the teacher's ArgMax (kHard with one teacher) instead of its max / sum.
template <bool HARD, bool ARGMAX>
struct RowStats {
  Stats<HARD> s;  // student, with z1 for the hard-label term
  std::conditional_t<ARGMAX, ArgMax, Stats<false>> t;
};

struct Sums {
  float d = 0.f, q = 0.f;
};

// ---- the kernel ----

template <typename T>
struct Args {
  const Bits<T>* student;
  const Bits<T>* teacher;
  const int64_t* labels;
  float* loss;
  Bits<T>* grad;
  int64_t n_rows;
  int vocab;
  int64_t student_stride, teacher_stride, grad_stride;
  float inv_t, beta, hard_weight, soft_weight;
  int64_t ignore_index;
  int n_teachers;              // K; teacher k's row r at teacher + k * teacher_k_stride + r * teacher_stride
  int64_t teacher_k_stride;
  const float* log_weights;    // [K] log w_k (MULTI)
  Transforms tr;               // the models' logit transforms (TRANSFORM)
  const float* grad_divisor;   // 0-dim: the gradient is divided by it; nullptr: not
};

// MULTI: [2 * K] floats per block: teacher k's max m_k at 2k, and off_k = log w_k - log z_k at 2k + 1.
extern __shared__ float teacher_stats[];

// HARD: hard_weight > 0 and labels given. MULTI: K > 1 teachers, mixed. TRANSFORM: a logit
// transform is not the identity.
template <typename T, int DIV, bool HARD, bool MULTI, bool TRANSFORM>
__global__ void __launch_bounds__(kMaxThreads, 2) kd_forward_kernel(const Args<T> a) {
  constexpr bool kSumPass = needs_sum_pass(DIV);
  constexpr bool kArgMax = DIV == kHard && !MULTI;  // the argmax in pass 1
  using SW = Sweep<T, HARD, MULTI, TRANSFORM>;
  const int vocab = a.vocab;
  const float inv_t = a.inv_t, beta = a.beta;
  const float c = kLog2e * inv_t;  // exp((x - m) / T) = exp2((x - m) * c)
  const MixWeights<float> w(beta);

  for (int64_t r = blockIdx.x; r < a.n_rows; r += gridDim.x) {
    const Bits<T>* s = a.student + r * a.student_stride;
    const Bits<T>* t = a.teacher + r * a.teacher_stride;
    Bits<T>* g = a.grad == nullptr ? nullptr : a.grad + r * a.grad_stride;
    const int64_t label = a.labels == nullptr ? 0 : a.labels[r];
    if (a.labels != nullptr && label == a.ignore_index) {
      if (g != nullptr) fill_zero<T>(g, vocab);
      if (threadIdx.x == 0) a.loss[r] = 0.f;
      continue;
    }

    // Pass 1. Log-probabilities are then ls = (s - ms) / T - log zs (likewise lt), and the
    // softmax at T = 1 is exp(s - ms - log z1): offsets from the max keep them accurate.
    RowStats<HARD, kArgMax> st;
    for_each_chunk<T, SW, Cache::kKeep, false>(s, t, nullptr, vocab, a.tr, [&](auto& ch) {
      st.s.add(ch.x, c, kLog2e);
      if constexpr (kArgMax) {
#pragma unroll
        for (int k = 0; k < ch.size; ++k) st.t.add(ch.y[k], ch.i0 + k);
      } else {
        st.t.add(ch.y, c, 0.f);
      }
    });
    st = block_reduce(st, [&](RowStats<HARD, kArgMax> u, const RowStats<HARD, kArgMax>& o) {
      u.s.merge(o.s, c, kLog2e);
      if constexpr (kArgMax) {
        u.t.merge(o.t);
      } else {
        u.t.merge(o.t, c, 0.f);
      }
      return u;
    });
    const float ms = st.s.m, log_zs = logf(st.s.z);
    float mt = 0.f, log_zt = 0.f;  // the teacher's max and log-sum (not with kArgMax)
    if constexpr (!kArgMax) {
      mt = st.t.m;
      log_zt = logf(st.t.z);
    }
    const int K = a.n_teachers;
    if constexpr (MULTI) {
      // Teachers 1..K-1: online max / sum of each row, block-reduced. The block reductions order
      // these writes after every thread's reads of the previous row's values.
      if (threadIdx.x == 0) {
        teacher_stats[0] = mt;
        teacher_stats[1] = a.log_weights[0] - log_zt;
      }
      for (int k = 1; k < K; ++k) {
        const Bits<T>* tk = t + k * a.teacher_k_stride;
        Stats<false> sk;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
          const float x[1] = {read<TRANSFORM>(a.tr.t, Elem<T>::bits_to_acc(__ldg(tk + i)))};
          sk.add(x, c, 0.f);
        }
        sk = block_reduce(sk, [&](Stats<false> u, const Stats<false>& o) {
          u.merge(o, c, 0.f);
          return u;
        });
        if (threadIdx.x == 0) {
          teacher_stats[2 * k] = sk.m;
          teacher_stats[2 * k + 1] = a.log_weights[k] - logf(sk.z);
        }
      }
      __syncthreads();
    }
    // The teacher log-probability of element i whose teacher-0 logit is y: one teacher's, or
    // the mixture's as an online logsumexp over k (-inf when every term is).
    const auto teacher_log_prob = [&](float y, int i) {
      if constexpr (!MULTI) {
        return fmaf(y - mt, inv_t, -log_zt);
      } else {
        const float2* stats = reinterpret_cast<const float2*>(teacher_stats);  // (m_k, off_k)
        float hi = fmaf(y - stats[0].x, inv_t, stats[0].y);
        float z = hi == -INFINITY ? 0.f : 1.f;  // sum of exp(a_k - hi)
        const Bits<T>* tk = t + i;  // teacher k's element i, stepped by the (int64) k stride
        for (int k = 1; k < K; ++k) {
          tk += a.teacher_k_stride;
          const float2 sk = stats[k];
          const float ak = fmaf(read<TRANSFORM>(a.tr.t, Elem<T>::bits_to_acc(__ldg(tk))) - sk.x, inv_t, sk.y);
          if (ak > hi) {
            z = z * expf(hi - ak) + 1.f;
            hi = ak;
          } else if (ak != -INFINITY) {
            z += expf(ak - hi);
          }
        }
        return hi == -INFINITY ? hi : hi + logf(z);
      }
    };
    // A label outside [0, vocab) (not checked on the GPU) makes the row's loss and gradient NaN.
    const bool label_ok = HARD && label >= 0 && label < vocab;
    const float log_z1 = !HARD ? 0.f : label_ok ? logf(st.s.z1) : NAN;
    const int label_i = label_ok ? int(label) : -1;  // a 32-bit compare per element

    // kHard: the target (the first index of the teacher's max; with MULTI of the mixture's log
    // p_t, swept here) and whether the teacher rows hold a NaN (then so does every mixture lt).
    ArgMax target;
    if constexpr (kArgMax) {
      target = st.t;
    } else if constexpr (DIV == kHard) {
      for_each_chunk<T, SW, Cache::kKeep, false>(s, t, nullptr, vocab, a.tr, [&](auto& ch) {
#pragma unroll
        for (int k = 0; k < ch.size; ++k) target.add(teacher_log_prob(ch.y[k], ch.i0 + k), ch.i0 + k);
      });
      target = block_reduce(target, [](ArgMax u, const ArgMax& o) {
        u.merge(o);
        return u;
      });
    }

    // Pass 2.
    Sums sums;
    if (kSumPass) {
      for_each_chunk<T, SW, Cache::kKeep, false>(s, t, nullptr, vocab, a.tr, [&](auto& ch) {
#pragma unroll
        for (int k = 0; k < ch.size; ++k) {
          const float ls = fmaf(ch.x[k] - ms, inv_t, -log_zs), lt = teacher_log_prob(ch.y[k], ch.i0 + k);
          const Term<float> tm = divergence_term<DIV, float>(ls, lt, beta, w);
          sums.d += tm.d;
          sums.q += tm.q;
        }
      });
      sums = block_reduce(sums, [](Sums u, const Sums& o) {
        u.d += o.d;
        u.q += o.q;
        return u;
      });
    } else {
      sums.q = -1.f;
    }

    // Pass 3: grad_i = (soft_weight / T * (q_i - p_s_i * S) + hard_weight * (softmax(s)_i - [i == label]))
    // * ds_i/dz_i / divisor.
    if (DIV == kForwardKL || g != nullptr) {
      const float unit = a.grad_divisor == nullptr ? 1.f : 1.f / *a.grad_divisor;
      const float S = sums.q, gs = a.soft_weight * inv_t * unit, gh = a.hard_weight * unit;
      float d = 0.f;
      const auto pass3 = [&](auto& ch) {
#pragma unroll
        for (int k = 0; k < ch.size; ++k) {
          const float x = ch.x[k];
          const float ls = fmaf(x - ms, inv_t, -log_zs);
          float q;
          if constexpr (DIV == kHard) {
            q = ch.i0 + k == target.index ? -1.f : 0.f;
          } else {
            const Term<float> tm = divergence_term<DIV, float>(ls, teacher_log_prob(ch.y[k], ch.i0 + k), beta, w);
            if (DIV == kForwardKL) d += tm.d;
            q = tm.q;
          }
          float gi = gs * (q - expf(ls) * S);
          if (HARD) gi += gh * (expf(x - ms - log_z1) - (ch.i0 + k == label_i ? 1.f : 0.f));
          if (TRANSFORM) gi *= a.tr.s.slope(x);
          if (DIV == kHard && target.nan) gi = NAN;
          ch.g[k] = gi;
        }
      };
      // kHard reads no teacher here: the sweep's second row is the student's again (cached).
      const Bits<T>* t3 = DIV == kHard ? s : t;
      if (g != nullptr) {
        for_each_chunk<T, SW, Cache::kLast, true>(s, t3, g, vocab, a.tr, pass3);
      } else {  // forward KL, loss only (the unused gradient math is compiled out)
        for_each_chunk<T, SW, Cache::kLast, false>(s, t3, nullptr, vocab, a.tr, pass3);
      }
      if (DIV == kForwardKL) sums.d = block_reduce(d, [](float u, float o) { return u + o; });
    }

    if (threadIdx.x == 0) {
      if constexpr (DIV == kHard) {  // D = -ls[target]
        const float s_target = read<TRANSFORM>(a.tr.s, Elem<T>::bits_to_acc(s[target.index]));
        sums.d = target.nan ? NAN : log_zs - (s_target - ms) * inv_t;
      }
      float loss = a.soft_weight * sums.d;
      if (HARD) {
        const float s_label = label_ok ? read<TRANSFORM>(a.tr.s, Elem<T>::bits_to_acc(s[label_i])) : 0.f;
        loss += a.hard_weight * (ms - s_label + log_z1);
      }
      a.loss[r] = loss;
    }
  }
}

// ---- launch ----

// Threads per row: about 4 vectors per thread and pass, a power of two from 64 to kMaxThreads.
// With __launch_bounds__(kMaxThreads, 2), two blocks of 512 threads share an SM, so one block's
// reductions overlap the other's loads.
int threads_for(int64_t vocab, int vec) {
  const int64_t want = (vocab + 4 * vec - 1) / (4 * vec);
  int threads = 64;
  while (threads < kMaxThreads && threads < want) threads *= 2;
  return threads;
}

template <typename T, int DIV, bool HARD, bool MULTI, bool TRANSFORM>
void launch(const KDParams& p, cudaStream_t stream) {
  Args<T> a;
  a.student = static_cast<const Bits<T>*>(p.student);
  a.teacher = static_cast<const Bits<T>*>(p.teacher);
  a.labels = p.labels;
  a.loss = static_cast<float*>(p.loss);
  a.grad = static_cast<Bits<T>*>(p.grad);
  a.n_rows = p.n_rows;
  a.vocab = static_cast<int>(p.vocab);
  a.student_stride = p.student_stride;
  a.teacher_stride = p.teacher_stride;
  a.grad_stride = p.grad_stride;
  a.inv_t = static_cast<float>(1.0 / p.temperature);
  a.beta = static_cast<float>(p.beta);
  a.hard_weight = static_cast<float>(p.hard_weight);
  a.soft_weight = static_cast<float>(p.soft_weight);
  a.ignore_index = p.ignore_index;
  a.n_teachers = static_cast<int>(p.n_teachers);
  a.teacher_k_stride = p.teacher_k_stride;
  a.log_weights = static_cast<const float*>(p.teacher_log_weights);
  a.tr.s = {static_cast<float>(p.student_scale), static_cast<float>(p.student_softcap)};
  a.tr.t = {static_cast<float>(p.teacher_scale), static_cast<float>(p.teacher_softcap)};
  a.grad_divisor = static_cast<const float*>(p.grad_divisor);
  const int64_t grid = p.n_rows < INT_MAX ? p.n_rows : INT_MAX;
  const size_t shared = MULTI ? 2 * sizeof(float) * p.n_teachers : 0;
  using SW = Sweep<T, HARD, MULTI, TRANSFORM>;
  kd_forward_kernel<T, DIV, HARD, MULTI, TRANSFORM>
      <<<static_cast<unsigned>(grid), threads_for(p.vocab, SW::bytes / int(sizeof(T))), shared, stream>>>(a);
}

}  // namespace

template <>
void kd_forward_part<KDOPS_KD_PART>(const KDParams& p, cudaStream_t stream) {
  with_dtype<false>(p.dtype, [&](auto type) {
    with_divergence<true>(p.divergence, [&](auto div) {
      if constexpr (decltype(div)::value % KDOPS_KD_PARTS == KDOPS_KD_PART) {
        with_bool(p.hard_weight > 0 && p.labels != nullptr, [&](auto hard) {
          with_bool(p.n_teachers > 1, [&](auto multi) {
            with_bool(p.has_transform(), [&](auto transform) {
              launch<typename decltype(type)::type, decltype(div)::value, decltype(hard)::value,
                     decltype(multi)::value, decltype(transform)::value>(p, stream);
            });
          });
        });
      }
    });
  });
}

#if KDOPS_KD_PART == 0
void kd_forward_cuda(const KDParams& p, uintptr_t stream) {
  if (p.vocab > INT_MAX) {
    throw std::invalid_argument("kd_forward_cuda: vocab " + std::to_string(p.vocab) + " exceeds 2^31 - 1");
  }
  if (p.n_teachers < 1 || p.n_teachers > kMaxTeachers) {
    throw std::invalid_argument("kd_forward_cuda: n_teachers " + std::to_string(p.n_teachers) + " not in [1, " +
                                std::to_string(kMaxTeachers) + "]");
  }
  if (p.n_rows <= 0) return;
  with_divergence<true>(p.divergence, [&](auto div) {
    kd_forward_part<decltype(div)::value % KDOPS_KD_PARTS>(p, reinterpret_cast<cudaStream_t>(stream));
  });
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("kd_forward_cuda: kernel launch failed: ") + cudaGetErrorString(err));
  }
}
#endif

}  // namespace kdops
