// The only place where runtime codes become compile-time template arguments (typed dispatch, no
// macros), for the host-side launchers of the CPU and CUDA kernels: with_dtype(code, f) calls
// f(Type<T>{}), with_divergence(code, f) calls f(std::integral_constant<int, DIV>{}),
// with_bool(b, f) calls f(std::true_type / false_type). Nest them for several codes.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/codes.h"
#include "common/dtype.h"

namespace kdops {

template <typename T>
struct Type {
  using type = T;
};

// WITH_FLOAT64: whether float64 is accepted (the CUDA kernels take float32/float16/bfloat16).
template <bool WITH_FLOAT64 = true, typename F>
void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(Type<float>{});
    case kFloat16: return f(Type<half_t>{});
    case kBFloat16: return f(Type<bfloat16_t>{});
    case kFloat64:
      if constexpr (WITH_FLOAT64) return f(Type<double>{});
      throw std::invalid_argument("kdops: the CUDA kernels take float32, float16 or bfloat16 (not float64)");
  }
  throw std::invalid_argument("kdops: unknown dtype code " + std::to_string(dtype));
}

// WITH_HARD: whether the kd family's hard target (kHard) is accepted.
template <bool WITH_HARD = false, typename F>
void with_divergence(int div, F&& f) {
  switch (div) {
    case kForwardKL: return f(std::integral_constant<int, kForwardKL>{});
    case kReverseKL: return f(std::integral_constant<int, kReverseKL>{});
    case kJSD: return f(std::integral_constant<int, kJSD>{});
    case kSkewForwardKL: return f(std::integral_constant<int, kSkewForwardKL>{});
    case kSkewReverseKL: return f(std::integral_constant<int, kSkewReverseKL>{});
    case kTVD: return f(std::integral_constant<int, kTVD>{});
    case kHard:
      if constexpr (WITH_HARD) return f(std::integral_constant<int, kHard>{});
      break;
  }
  throw std::invalid_argument("kdops: unknown divergence code " + std::to_string(div));
}

template <typename F>
void with_bool(bool b, F&& f) {
  if (b) return f(std::true_type{});
  return f(std::false_type{});
}

}  // namespace kdops
