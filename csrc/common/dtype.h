// Storage types of the kernels' elements and their ONE conversion helper, Elem<T>, without c10:
// float16 / bfloat16 are 16-bit PODs. On the CPU they convert with branch-free integer code (so
// that the loops vectorize); in CUDA device code with the hardware's cvt instructions (the same
// values: both are exact widening and round-to-nearest-even narrowing).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "common/macros.h"

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

// Elem<T> for a storage type T: acc_t (its accumulation type: double for double, float
// otherwise), bits (the plain type a load or store moves: the 16-bit types travel as uint16_t),
// and the conversions to_acc / from_acc between T (or its bits) and acc_t.
template <typename T>
struct Elem;

template <typename F>
struct PlainElem {  // float, double: bits are the value
  using acc_t = F;
  using bits = F;
  KD_HD static F to_acc(F x) { return x; }
  KD_HD static F from_acc(F x) { return x; }
  KD_HD static F bits_to_acc(F b) { return b; }
  KD_HD static F acc_to_bits(F x) { return x; }
};

template <>
struct Elem<float> : PlainElem<float> {};
template <>
struct Elem<double> : PlainElem<double> {};

template <typename T>
struct HalfElem {  // half_t, bfloat16_t (see the conversions above)
  using acc_t = float;
  using bits = uint16_t;
  KD_HD static float bits_to_acc(uint16_t b) {
    if constexpr (!std::is_same<T, half_t>::value) return bf16_to_float(b);  // a shift
#if defined(__CUDA_ARCH__)
    else return __half2float(__ushort_as_half(b));
#else
    else return half_to_float(b);
#endif
  }
  KD_HD static uint16_t acc_to_bits(float x) {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same<T, half_t>::value) return __half_as_ushort(__float2half_rn(x));
    else return __bfloat16_as_ushort(__float2bfloat16_rn(x));
#else
    if constexpr (std::is_same<T, half_t>::value) return float_to_half(x);
    else return float_to_bf16(x);
#endif
  }
  KD_HD static float to_acc(T x) { return bits_to_acc(x.bits); }
  KD_HD static T from_acc(float x) { return T{acc_to_bits(x)}; }
};

template <>
struct Elem<half_t> : HalfElem<half_t> {};
template <>
struct Elem<bfloat16_t> : HalfElem<bfloat16_t> {};

template <typename T>
using acc_type = typename Elem<T>::acc_t;

template <typename T>
using Bits = typename Elem<T>::bits;

template <typename T>
KD_HD acc_type<T> to_acc(T x) {
  return Elem<T>::to_acc(x);
}

// from_acc<T>(x): x rounded to the storage type T.
template <typename T>
KD_HD T from_acc(acc_type<T> x) {
  return Elem<T>::from_acc(x);
}

}  // namespace kdops
