// The one block-wide reduction of the CUDA kernels: block_reduce(v, combine) over every thread of
// the block, for a small struct V made of floats (or a float); the result reaches every thread.
#pragma once

#include <cstring>

namespace kdops {

template <typename V>
__device__ __forceinline__ V shfl_xor(V v, int mask) {
  constexpr int W = sizeof(V) / sizeof(float);
  float w[W];
  memcpy(w, &v, sizeof v);
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = __shfl_xor_sync(0xffffffffu, w[k], mask);
  memcpy(&v, w, sizeof v);
  return v;
}

// V{} must be the identity of `combine` (give struct members their identity as default member
// initializers); blockDim.x a multiple of 32; every thread of the block must call it.
template <typename V, typename Combine>
__device__ __forceinline__ V block_reduce(V v, Combine combine) {
  constexpr int W = sizeof(V) / sizeof(float);
  static_assert(sizeof(V) == W * sizeof(float), "V must be made of floats");
  __shared__ float partial[32 * W];
  __shared__ float result[W];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int m = 16; m > 0; m /= 2) v = combine(v, shfl_xor(v, m));
  if (lane == 0) memcpy(partial + warp * W, &v, sizeof v);
  __syncthreads();
  if (warp == 0) {
    V u{};
    if (lane < warps) memcpy(&u, partial + lane * W, sizeof u);
#pragma unroll
    for (int m = 16; m > 0; m /= 2) u = combine(u, shfl_xor(u, m));
    if (lane == 0) memcpy(result, &u, sizeof u);
  }
  __syncthreads();  // also orders this reduction's reads of `partial` before the next one's writes
  memcpy(&v, result, sizeof v);
  return v;
}

// The block's sum of a float.
__device__ __forceinline__ float block_sum(float v) {
  return block_reduce(v, [](float a, float b) { return a + b; });
}

}  // namespace kdops
