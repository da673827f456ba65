// The sparse (top-k teacher) KD kernel on the GPU: sparse_kd_forward_cuda (see
// common/sparse_kd.h). One thread block per row (grid-stride over rows): the block sweeps the
// vocabulary for the online logsumexp, its threads share the top-k entries for the bucket terms,
// then the block writes softmax * coefficient over the vocabulary and, after a barrier, the
// top-k entries (times the student transform's slope, divided by the gradient divisor).
// Everything accumulates in float.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dispatch.h"
#include "common/divergence.h"
#include "common/dtype.h"
#include "common/sparse_kd.h"
#include "cuda/block_reduce.cuh"

namespace kdops {
namespace {

// Threads per block. __launch_bounds__(kThreads, 1): without the minimum of resident blocks,
// ptxas (CUDA 13, sm_100) held these kernels to 40-48 registers and spilled 4-20 B per thread in
// 4 of 72 instances (22 with the logit transform), though far below its limit; with it they
// take 58-80 registers on sm_100 (29-40 on sm_80 / 90), spill-free on all three
// (tools/cuda_resource_check.py), still 3 blocks of 256 threads per SM.
constexpr int kThreads = 256;

// Online logsumexp state of scale * x: m the max of x, z = sum exp(scale * (x - m)).
struct LSE {
  float m = -INFINITY, z = 0.f;
};

__device__ __forceinline__ LSE lse_merge(LSE a, LSE b, float scale) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.z * __expf((a.m - m) * scale) + b.z * __expf((b.m - m) * scale)};
}

struct Pair {
  float a = 0.f, b = 0.f;
};

template <typename T>
struct Args {
  const T* student;
  const float* lt;
  const int32_t* idx;
  const int64_t* labels;
  float* loss;
  T* grad;
  int64_t n_rows, vocab, k, student_stride, grad_stride;
  float inv_t, beta, hard_weight, soft_weight;
  int64_t ignore_index;
  bool bucket;
  LogitTransform<float> transform;  // the student's
  const float* grad_divisor;        // 0-dim, or nullptr
};

template <typename T, int DIV, bool HARD, bool GRAD>
__global__ void __launch_bounds__(kThreads, 1) sparse_kd_kernel(const Args<T> a) {
  const int64_t V = a.vocab, K = a.k;
  const float inv_t = a.inv_t, beta = a.beta;
  const MixWeights<float> w(beta);
  const LogitTransform<float> tf = a.transform;
  const float inv_div = GRAD && a.grad_divisor ? 1.f / *a.grad_divisor : 1.f;
  for (int64_t r = blockIdx.x; r < a.n_rows; r += gridDim.x) {
    const T* s = a.student + r * a.student_stride;
    const float* lt = a.lt + r * K;
    const int32_t* idx = a.idx + r * K;
    T* g = GRAD ? a.grad + r * a.grad_stride : nullptr;
    const int64_t label = a.labels ? a.labels[r] : -1;
    const auto z = [&](int64_t i) { return tf.apply(to_acc(s[i])); };  // transformed logit i
    if (a.labels && label == a.ignore_index) {
      if (GRAD)
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) g[i] = from_acc<T>(0.f);
      if (threadIdx.x == 0) a.loss[r] = 0.f;
      continue;
    }
    if (HARD && (label < 0 || label >= V)) {  // an out-of-range label: a NaN row (never read)
      if (GRAD)
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) g[i] = from_acc<T>(NAN);
      if (threadIdx.x == 0) a.loss[r] = NAN;
      continue;
    }

    // Pass 1: logsumexp of s / T and of s.
    LSE ls = {-INFINITY, 0.f}, l1 = {-INFINITY, 0.f};
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const float x = z(i);
      ls = lse_merge(ls, {x, 1.f}, inv_t);
      if (HARD) l1 = lse_merge(l1, {x, 1.f}, 1.f);
    }
    ls = block_reduce(ls, [&](LSE u, LSE o) { return lse_merge(u, o, inv_t); });
    if (HARD) l1 = block_reduce(l1, [](LSE u, LSE o) { return lse_merge(u, o, 1.f); });
    const float ms = ls.m, log_zs = logf(ls.z), log_z1 = logf(l1.z);
    const auto log_ps = [&](int64_t i) { return (z(i) - ms) * inv_t - log_zs; };

    // Pass 2: top-k masses (a NaN mass marks an index out of range), then the bucket terms.
    Pair mass = {0.f, 0.f};
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const int64_t i = idx[k];
      const bool ok = i >= 0 && i < V;
      mass.a += ok ? expf(log_ps(i)) : NAN;
      mass.b += expf(lt[k]);
    }
    mass = block_reduce(mass, [](Pair u, Pair o) { return Pair{u.a + o.a, u.b + o.b}; });
    const bool indices_ok = !isnan(mass.a);
    const SparseRest<float> rest = sparse_rest(mass.a, mass.b, K < V, a.bucket);
    const auto top_term = [&](int64_t k) {
      return divergence_term<DIV, float>(log_ps(idx[k]), lt[k] - rest.teacher_shift, beta, w);
    };
    Pair ds = {0.f, 0.f};
    for (int64_t k = threadIdx.x; k < K && indices_ok; k += blockDim.x) {
      const Term<float> e = top_term(k);
      ds.a += e.d;
      ds.b += e.q;
    }
    ds = block_reduce(ds, [](Pair u, Pair o) { return Pair{u.a + o.a, u.b + o.b}; });
    float D = ds.a, S = ds.b, ratio = 0.f;
    if (rest.present) {
      const Term<float> e = divergence_term<DIV, float>(rest.ls, rest.lt, beta, w);
      D += e.d;
      S += e.q;
      ratio = sparse_rest_ratio(rest, e.q);
    }
    if (!indices_ok) S = NAN;  // an index outside [0, V): a NaN loss and a NaN gradient row
    if (threadIdx.x == 0) {
      float loss = indices_ok ? a.soft_weight * D : NAN;
      if (HARD) loss += a.hard_weight * (log_z1 - (z(label) - ms));
      a.loss[r] = loss;
    }

    // Pass 3: softmax * coefficient everywhere, then (after a barrier) the top-k entries.
    if (GRAD) {
      const float rest_coef = a.soft_weight * inv_t * (ratio - S);
      const auto hard_term = [&](float zi, int64_t i) {
        return HARD ? a.hard_weight * (__expf(zi - ms - log_z1) - (i == label ? 1.f : 0.f)) : 0.f;
      };
      const auto out = [&](float zi, float gi) { return from_acc<T>(gi * tf.slope(zi) * inv_div); };
      for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
        const float zi = z(i);
        g[i] = out(zi, __expf((zi - ms) * inv_t - log_zs) * rest_coef + hard_term(zi, i));
      }
      __syncthreads();
      for (int64_t k = threadIdx.x; k < K && indices_ok; k += blockDim.x) {
        const int64_t i = idx[k];
        const float zi = z(i);
        g[i] = out(zi, a.soft_weight * inv_t * (top_term(k).q - expf((zi - ms) * inv_t - log_zs) * S) +
                           hard_term(zi, i));
      }
    }
  }
}

}  // namespace

void sparse_kd_forward_cuda(const SparseKDParams& p, uintptr_t stream) {
  if (p.n_rows == 0) return;
  with_dtype<false>(p.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    Args<T> a{static_cast<const T*>(p.student), static_cast<const float*>(p.topk_logprobs),
              p.topk_indices, p.labels, static_cast<float*>(p.loss), static_cast<T*>(p.grad),
              p.n_rows, p.vocab, p.k, p.student_stride, p.grad_stride,
              float(1.0 / p.temperature), float(p.beta), float(p.hard_weight),
              float(p.soft_weight), p.ignore_index, p.bucket,
              LogitTransform<float>{float(p.student_scale), float(p.student_softcap)},
              static_cast<const float*>(p.grad_divisor)};
    const int blocks = int(p.n_rows < 65535 * 8 ? p.n_rows : 65535 * 8);
    with_divergence(p.divergence, [&](auto div) {
      with_bool(p.hard_weight > 0 && p.labels != nullptr, [&](auto hard) {
        with_bool(p.grad != nullptr, [&](auto grad) {
          sparse_kd_kernel<T, decltype(div)::value, decltype(hard)::value, decltype(grad)::value>
              <<<blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
        });
      });
    });
  });
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("kdops: sparse_kd_forward_cuda launch failed: ") +
                             cudaGetErrorString(err));
}

}  // namespace kdops
