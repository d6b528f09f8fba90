// leanlm's kernels: helpers shared by every kernel family (one translation unit, extension.cpp).
//
// Built by leanlm/native.py at one ISA level chosen at run time (AVX2 + FMA at least; the AVX-512
// levels compile the same code with -mavx512* flags, plus the variants guarded by the compiler's
// feature macros, e.g. __AVX512VNNI__ in qlinear.cpp). Every variant gives the same numbers bit for
// bit: the guarded code paths compute the same integer / float operations in the same order.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

using at::Tensor;

// Kernels with their own target attribute run on a CPU with these instructions whatever level the build
// has (qlinear.cpp's VNNI GEMV copy, gemm_int8.cpp); callers check cpu_has_avx512_vnni() first.
#define LEANLM_VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
static inline bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// bf16 dot products (`vdpbf16ps`) whatever the build's level: gemv_small.cpp's bf16 x bf16 path; callers check
// cpu_has_avx512_bf16() first
#define LEANLM_BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))
static inline bool cpu_has_avx512_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

template <typename T> static inline T rnd(float v) { return static_cast<T>(v); }  // round to T (RNE for bf16)
template <typename T> static inline float f(T v) { return static_cast<float>(v); }

// one bf16 (raw bits) as fp32: a 16-bit shift
static inline float bf16f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; std::memcpy(&f, &u, 4); return f; }

// eight bf16 (raw bits) widened to fp32
static inline __m256 bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// sum of the 8 lanes, in a fixed order (pairs of halves, then pairs within)
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out = T( (h * rsqrt(mean(h^2) + eps)) * w ), in transformers' order; h already fp32
template <typename T>
static void norm_row(const float* h, const float* w, int64_t D, float eps, bool plus_one, T* out) {
  float ss = 0.f;
  for (int64_t d = 0; d < D; ++d) ss += h[d] * h[d];
  const float r = 1.0f / std::sqrt(ss / (float)D + eps);
  for (int64_t d = 0; d < D; ++d) out[d] = rnd<T>((h[d] * r) * (plus_one ? 1.0f + w[d] : w[d]));
}

static inline Tensor as_float(const Tensor& t) {
  return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous();
}

// qlinear_nm.cpp: x [1..16, K] . a 2:4 sparse int8 weight (leanlm.quant.nm's tiles) -> fp32 [M, N]
torch::Tensor q_linear_nm(torch::Tensor x, torch::Tensor w, torch::Tensor scales, int64_t group);
