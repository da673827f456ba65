// Storage types of the kernels' logits and their conversions to the accumulation type, without
// c10 or the CUDA half headers: float16 / bfloat16 are 16-bit PODs converted with integer code
// (branch-free, so that CPU loops vectorize; independent of flush-to-zero on the GPU).
#pragma once

#include <cstdint>
#include <cstring>

#ifndef KD_HD
#if defined(__CUDACC__)
#define KD_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define KD_HD inline __attribute__((always_inline))  // so that the CPU loops vectorize
#else
#define KD_HD inline
#endif
#endif

namespace kdops {

struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};
static_assert(sizeof(half_t) == 2 && sizeof(bfloat16_t) == 2, "16-bit storage types");

KD_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

KD_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// Exact: subnormals, infinities and NaNs (payload kept) included.
KD_HD float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;  // exponent and mantissa
  // Normal: rebias the exponent from 15 to 127; inf / NaN: exponent 31 -> 255.
  const uint32_t wide = (em << 13) + (em >= 0x7c00u ? 0x70000000u : 0x38000000u);
  // Subnormal (and zero): em * 2^-24, exact in float arithmetic.
  const float sub = float(int32_t(em)) * 5.9604644775390625e-8f;
  return bits_float(sign | (em < 0x0400u ? float_bits(sub) : wide));
}

// Round to nearest even; overflow to inf, NaN to a quiet NaN with the upper payload bits.
KD_HD uint16_t float_to_half(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t inf_nan = a > 0x7f800000u ? 0x7e00u | ((a >> 13) & 0x3ffu) : 0x7c00u;
  // Below 2^-14 the result is subnormal: adding 0.5 puts its bits at the bottom of the mantissa,
  // rounded to nearest even by the addition itself.
  const uint32_t sub = float_bits(bits_float(a) + 0.5f) - 0x3f000000u;
  // Normal: rebias 127 -> 15 and round the 13 dropped bits to nearest even (may carry to inf).
  const uint32_t normal = (a - 0x38000000u + 0x0fffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t h = a >= 0x47800000u ? inf_nan : (a < 0x38800000u ? sub : normal);
  return uint16_t(sign | h);
}

KD_HD float bf16_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

// Round to nearest even; NaN stays NaN (quieted, sign and upper payload kept).
KD_HD uint16_t float_to_bf16(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x0040u : rounded);
}

// to_acc / from_acc between a storage type and its accumulation type: double for double,
// float otherwise.
template <typename T>
struct Scalar;

template <>
struct Scalar<float> {
  using acc_t = float;
  KD_HD static float to_acc(float x) { return x; }
  KD_HD static float from_acc(float x) { return x; }
};

template <>
struct Scalar<double> {
  using acc_t = double;
  KD_HD static double to_acc(double x) { return x; }
  KD_HD static double from_acc(double x) { return x; }
};

template <>
struct Scalar<half_t> {
  using acc_t = float;
  KD_HD static float to_acc(half_t x) { return half_to_float(x.bits); }
  KD_HD static half_t from_acc(float x) { return half_t{float_to_half(x)}; }
};

template <>
struct Scalar<bfloat16_t> {
  using acc_t = float;
  KD_HD static float to_acc(bfloat16_t x) { return bf16_to_float(x.bits); }
  KD_HD static bfloat16_t from_acc(float x) { return bfloat16_t{float_to_bf16(x)}; }
};

template <typename T>
using acc_type = typename Scalar<T>::acc_t;

template <typename T>
KD_HD acc_type<T> to_acc(T x) {
  return Scalar<T>::to_acc(x);
}

// from_acc<T>(x): x rounded to the storage type T.
template <typename T>
KD_HD T from_acc(acc_type<T> x) {
  return Scalar<T>::from_acc(x);
}

}  // namespace kdops
