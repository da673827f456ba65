// The one function-attribute macro of the kernels' shared headers.
#pragma once

// KD_HD: an inline function of the shared math, callable from CUDA host and device code, and
// always inlined on the CPU (the `omp simd` loops vectorize only what is inlined into them).
// KD_INLINE: the same for CPU lambdas in vectorized loops (`[=](int64_t i) KD_INLINE { ... }`).
#if defined(__CUDACC__)
#define KD_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define KD_HD inline __attribute__((always_inline))
#else
#define KD_HD inline
#endif

#if defined(__GNUC__)
#define KD_INLINE __attribute__((always_inline))
#else
#define KD_INLINE
#endif
