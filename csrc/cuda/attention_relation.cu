// The attention-relation kernels on the GPU (common/attention_relation.h): one warp per query row
// (forward, da) or per key row (db) of one (sample, head); lanes take 32 keys (queries) at a time,
// each computing its scores from the row held in shared memory (float) and the other rows read
// from global memory. No L x L buffer: the backward recomputes the scores.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/attention_relation.h"
#include "common/dispatch.h"
#include "common/dtype.h"

namespace kdops {
namespace {

constexpr int kWarps = 4;  // rows per block of 128 threads

struct Shape {
  int64_t batch, heads, length, ds, dt;
  int64_t sa[3], sb[3], ta[3], tb[3];
  const uint8_t* counted;
  bool causal;
  float scale_s, scale_t, beta;

  __device__ bool counted_at(int64_t b, int64_t l) const { return !counted || counted[b * length + l] != 0; }
  __device__ int64_t rows() const { return batch * heads * length; }
};

template <typename T>
__device__ const T* row_of(const void* base, const int64_t* stride, int64_t b, int64_t h, int64_t l) {
  return static_cast<const T*>(base) + b * stride[0] + h * stride[1] + l * stride[2];
}

template <typename T>
__device__ float dot(const float* x, const T* y, int64_t d) {
  float sum = 0.f;
  for (int64_t c = 0; c < d; ++c) sum += x[c] * to_acc(y[c]);
  return sum;
}

__device__ float warp_sum(float v) {
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Warp-wide logsumexp of per-lane running (max m, sum z of exp(x - m)).
__device__ float warp_lse(float m, float z) {
  float hi = m;
  for (int k = 16; k > 0; k /= 2) hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, k));
  if (hi == -INFINITY) return hi;
  return hi + logf(warp_sum(m == -INFINITY ? 0.f : z * expf(m - hi)));
}

__device__ void online_add(float& m, float& z, float x) {
  if (x == -INFINITY) return;
  if (x > m) {
    z = z * expf(m - x) + 1.f;
    m = x;
  } else {
    z += expf(x - m);
  }
}

// Copies row x[0:d] (dtype T) to shared float memory.
template <typename T>
__device__ void stage(float* dst, const T* x, int64_t d, int lane) {
  for (int64_t c = lane; c < d; c += 32) dst[c] = to_acc(x[c]);
  __syncwarp();
}

template <typename T, int DIV>
__global__ void forward_kernel(const AttentionRelationParams p, const Shape sh, float* rows, float* stats) {
  extern __shared__ float shared[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r = int64_t(blockIdx.x) * kWarps + warp;  // (b, h, i) row
  if (r >= sh.rows()) return;
  const int64_t i = r % sh.length, bh = r / sh.length, b = bh / sh.heads, h = bh % sh.heads;
  float* qa = shared + warp * (sh.ds + sh.dt);
  float* ta = qa + sh.ds;
  stage(qa, row_of<T>(p.student_a, sh.sa, b, h, i), sh.ds, lane);
  stage(ta, row_of<T>(p.teacher_a, sh.ta, b, h, i), sh.dt, lane);
  const bool query = sh.counted_at(b, i);
  const int64_t end = sh.causal ? i + 1 : sh.length;
  float m_s = -INFINITY, z_s = 0.f, m_t = -INFINITY, z_t = 0.f;
  for (int64_t j = lane; j < end; j += 32) {
    if (!relation_key_allowed(query, sh.counted_at(b, j), sh.causal, i, j)) continue;
    online_add(m_s, z_s, dot(qa, row_of<T>(p.student_b, sh.sb, b, h, j), sh.ds) * sh.scale_s);
    online_add(m_t, z_t, dot(ta, row_of<T>(p.teacher_b, sh.tb, b, h, j), sh.dt) * sh.scale_t);
  }
  const float lse_s = warp_lse(m_s, z_s), lse_t = warp_lse(m_t, z_t);
  const MixWeights<float> mix(sh.beta);
  float d_sum = 0.f, q_sum = 0.f;
  for (int64_t j = lane; j < end; j += 32) {
    if (!relation_key_allowed(query, sh.counted_at(b, j), sh.causal, i, j)) continue;
    const float s = dot(qa, row_of<T>(p.student_b, sh.sb, b, h, j), sh.ds) * sh.scale_s;
    const float t = dot(ta, row_of<T>(p.teacher_b, sh.tb, b, h, j), sh.dt) * sh.scale_t;
    const Term<float> term = divergence_term<DIV>(s - lse_s, t - lse_t, sh.beta, mix);
    d_sum += term.d;
    q_sum += term.q;
  }
  d_sum = warp_sum(d_sum);
  q_sum = warp_sum(q_sum);
  if (lane == 0) {
    rows[r] = query ? d_sum : 0.f;
    stats[r] = lse_s;
    stats[sh.rows() + r] = lse_t;
    stats[2 * sh.rows() + r] = q_sum;
  }
}

// KEYS false: da of query row i = sum_j W_ij b_j; true: db of key row j = sum_i W_ij a_i. Lanes
// compute the W of 32 partners, then accumulate over them with lanes over channels.
template <typename T, int DIV, bool KEYS>
__global__ void backward_kernel(const AttentionRelationParams p, const Shape sh, const float* grad_rows,
                                const float* stats, T* out) {
  extern __shared__ float shared[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r = int64_t(blockIdx.x) * kWarps + warp;
  if (r >= sh.rows()) return;
  const int64_t own = r % sh.length, bh = r / sh.length, b = bh / sh.heads, h = bh % sh.heads;
  float* x_s = shared + warp * (2 * sh.ds + sh.dt + 32);  // this row (student), its teacher row, acc, W
  float* x_t = x_s + sh.ds;
  float* acc = x_t + sh.dt;
  float* w = acc + sh.ds;
  stage(x_s, KEYS ? row_of<T>(p.student_b, sh.sb, b, h, own) : row_of<T>(p.student_a, sh.sa, b, h, own), sh.ds, lane);
  stage(x_t, KEYS ? row_of<T>(p.teacher_b, sh.tb, b, h, own) : row_of<T>(p.teacher_a, sh.ta, b, h, own), sh.dt, lane);
  for (int64_t c = lane; c < sh.ds; c += 32) acc[c] = 0.f;
  const MixWeights<float> mix(sh.beta);
  const int64_t begin = KEYS && sh.causal ? own : 0;
  const int64_t end = !KEYS && sh.causal ? own + 1 : sh.length;
  for (int64_t k0 = begin; k0 < end; k0 += 32) {
    const int64_t other = k0 + lane;
    const int64_t i = KEYS ? other : own, j = KEYS ? own : other;
    float weight = 0.f;
    if (other < end && sh.counted_at(b, i) && relation_key_allowed(true, sh.counted_at(b, j), sh.causal, i, j)) {
      const T* partner_s = KEYS ? row_of<T>(p.student_a, sh.sa, b, h, other) : row_of<T>(p.student_b, sh.sb, b, h, other);
      const T* partner_t = KEYS ? row_of<T>(p.teacher_a, sh.ta, b, h, other) : row_of<T>(p.teacher_b, sh.tb, b, h, other);
      const int64_t at = bh * sh.length + i;
      const RelationRowStats<float> rs{stats[at], stats[sh.rows() + at], stats[2 * sh.rows() + at]};
      const float s = dot(x_s, partner_s, sh.ds) * sh.scale_s, t = dot(x_t, partner_t, sh.dt) * sh.scale_t;
      weight = grad_rows[at] * sh.scale_s * relation_pair_weight<DIV>(s, t, rs, sh.beta, mix);
    }
    w[lane] = weight;
    __syncwarp();
    const int64_t n = end - k0 < 32 ? end - k0 : 32;
    for (int64_t c = lane; c < sh.ds; c += 32) {
      float sum = acc[c];
      for (int64_t k = 0; k < n; ++k) {
        const T* partner = KEYS ? row_of<T>(p.student_a, sh.sa, b, h, k0 + k) : row_of<T>(p.student_b, sh.sb, b, h, k0 + k);
        sum += w[k] * to_acc(partner[c]);
      }
      acc[c] = sum;
    }
    __syncwarp();
  }
  for (int64_t c = lane; c < sh.ds; c += 32) out[r * sh.ds + c] = from_acc<T>(acc[c]);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("kdops CUDA ") + what + ": " + cudaGetErrorString(err));
}

Shape shape_of(const AttentionRelationParams& p) {
  Shape sh{p.batch, p.heads, p.length, p.student_dim, p.teacher_dim, {}, {}, {}, {}, p.counted, p.causal,
           float(1.0 / (std::sqrt(double(p.student_dim)) * p.temperature)),
           float(1.0 / (std::sqrt(double(p.teacher_dim)) * p.temperature)), float(p.beta)};
  for (int k = 0; k < 3; ++k) {
    sh.sa[k] = p.sa_stride[k];
    sh.sb[k] = p.sb_stride[k];
    sh.ta[k] = p.ta_stride[k];
    sh.tb[k] = p.tb_stride[k];
  }
  return sh;
}

template <bool BACKWARD>
void run(const AttentionRelationParams& p, uintptr_t stream) {
  const Shape sh = shape_of(p);
  const int64_t rows = p.batch * p.heads * p.length;
  if (rows == 0) return;
  const unsigned blocks = unsigned((rows + kWarps - 1) / kWarps);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  with_dtype<false>(p.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    with_divergence(p.divergence, [&](auto div) {
      if constexpr (BACKWARD) {
        const size_t smem = kWarps * (2 * sh.ds + sh.dt + 32) * sizeof(float);
        const auto* g = static_cast<const float*>(p.grad_rows);
        const auto* st = static_cast<const float*>(p.stats);
        auto da = backward_kernel<T, div.value, false>;
        auto db = backward_kernel<T, div.value, true>;
        check(cudaFuncSetAttribute(da, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "shared memory");
        check(cudaFuncSetAttribute(db, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "shared memory");
        da<<<blocks, kWarps * 32, smem, s>>>(p, sh, g, st, static_cast<T*>(p.da));
        db<<<blocks, kWarps * 32, smem, s>>>(p, sh, g, st, static_cast<T*>(p.db));
      } else {
        const size_t smem = kWarps * (sh.ds + sh.dt) * sizeof(float);
        auto fwd = forward_kernel<T, div.value>;
        check(cudaFuncSetAttribute(fwd, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "shared memory");
        fwd<<<blocks, kWarps * 32, smem, s>>>(p, sh, static_cast<float*>(p.rows), static_cast<float*>(p.stats));
      }
      check(cudaGetLastError(), "attention_relation launch");
    });
  });
}

}  // namespace

void attention_relation_forward_cuda(const AttentionRelationParams& p, uintptr_t stream) { run<false>(p, stream); }
void attention_relation_backward_cuda(const AttentionRelationParams& p, uintptr_t stream) { run<true>(p, stream); }

}  // namespace kdops
