// Inline float exp and log1p that gcc / clang vectorize inside `#pragma omp simd` loops (the libm
// ones are only vectorized under -ffast-math, which would break the kernels' inf / NaN handling).
// Branch-free; about 1 ulp; exp(-inf) = 0, exp(+inf) = overflow = inf, NaN in -> NaN out.
// Needs IEEE evaluation without reassociation (no -fassociative-math / -ffast-math).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dtype.h"

namespace kdops {

KD_HD float fast_exp(float x) {
  // Clamping keeps 2^n below a product of two normal floats; NaN fails both tests and stays.
  float xc = x < -110.0f ? -110.0f : x;
  xc = xc > 89.0f ? 89.0f : xc;
  // n = round(x / ln2) by the 1.5 * 2^23 trick; r = x - n ln2 in two parts (Cody-Waite).
  const float magic = 12582912.0f;
  const float k = xc * 1.44269504088896341f + magic;
  const float n = k - magic;
  const int32_t ni = int32_t(float_bits(k)) - int32_t(float_bits(magic));
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  // exp(r) on |r| <= ln2 / 2 (Cephes expf polynomial).
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * (r * r) + r + 1.0f;
  // 2^n = 2^n1 * 2^n2, each a normal float for n in [-159, 129]: the last product rounds
  // correctly into the subnormal range, to 0, or to inf.
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  return e * bits_float(uint32_t(n1 + 127) << 23) * bits_float(uint32_t(n2 + 127) << 23);
}

// log(x) for x >= 0 (0 -> -inf, inf -> inf, negative or NaN -> NaN).
// (Selects on one condition each: gcc 12 does not vectorize selects on combined AVX-512 masks.)
KD_HD float fast_log(float x) {
  // Subnormals are scaled to normals first.
  const bool tiny = x < 1.17549435e-38f;
  const uint32_t u = float_bits(tiny ? x * 8388608.0f : x);
  // x = 2^e * m with m in [sqrt(1/2), sqrt(2)).
  const uint32_t off = u - 0x3f3504f3u;  // bits of sqrt(1/2)
  const float e = float(int32_t(off) >> 23) - (tiny ? 23.0f : 0.0f);
  const float f = bits_float((off & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  const float z = f * f;
  // Cephes logf polynomial.
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = p * f * z + e * -2.12194440e-4f - 0.5f * z;
  y = f + y + e * 0.693359375f;
  y = x < INFINITY ? y : x;  // inf and NaN pass through
  y = x == 0.0f ? -INFINITY : y;
  return x < 0.0f ? NAN : y;
}

// log(1 + x) for x >= -1, accurate for small x: log(u) corrected by the rounding of u = 1 + x.
KD_HD float fast_log1p(float x) {
  const float u = 1.0f + x;
  float c = (x - (u - 1.0f)) / u;
  c = u < INFINITY ? c : 0.0f;
  c = u > 0.0f ? c : 0.0f;
  return fast_log(u) + c;
}

// The divergence terms' math (see divergence.h) with these functions for float.
struct FastMath {
  KD_HD static float exp(float x) { return fast_exp(x); }
  KD_HD static float log1p(float x) { return fast_log1p(x); }
  KD_HD static double exp(double x) { return std::exp(x); }
  KD_HD static double log1p(double x) { return std::log1p(x); }
};

}  // namespace kdops
