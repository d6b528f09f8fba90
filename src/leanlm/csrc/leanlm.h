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

// VNNI plus VBMI's byte permutes (`vpermb`): qlinear_codebook.cpp's table lookups without index masks; callers
// check cpu_has_avx512_vbmi() (and cpu_has_avx512_vnni()) first
#define LEANLM_VNNI_VBMI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))
static inline bool cpu_has_avx512_vbmi() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vbmi");
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

// ---- tile primitives of the attention kernels (attention.cpp, attention_kvquant.cpp) ----
// exp of 8 floats: a degree-6 polynomial after range reduction (~1 ulp); inputs below -87.3 give ~0
static inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// acc[0, n) *= c (n % 8 == 0): an online softmax's rescale when the running max grows
static inline void scale8(float c, float* acc, int64_t n) {
  const __m256 cv = _mm256_set1_ps(c);
  for (int64_t d = 0; d < n; d += 8) _mm256_storeu_ps(acc + d, _mm256_mul_ps(cv, _mm256_loadu_ps(acc + d)));
}

// 8 dot products q . k_i (k_i = k + i * stride, n floats, n % 8 == 0) as one vector
static inline __m256 dots8(const float* q, const float* k, int64_t stride, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t d = 0; d < n; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + d), a0);
    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + stride + d), a1);
    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * stride + d), a2);
    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * stride + d), a3);
    a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 4 * stride + d), a4);
    a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 5 * stride + d), a5);
    a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 6 * stride + d), a6);
    a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 7 * stride + d), a7);
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// acc[c0, c1) += sum_j coef[j * cs] * x[j * D + c], j < cnt; acc held in registers over the keys
static inline void pv_cols(const float* coef, int64_t cs, const float* x, int64_t D, int64_t cnt, float* acc, int64_t c0,
                           int64_t c1) {
  int64_t c = c0;
  for (; c + 64 <= c1; c += 64) {  // 8 accumulators: enough independent FMA chains to hide their latency
    __m256 a[8];
    for (int u = 0; u < 8; ++u) a[u] = _mm256_loadu_ps(acc + c + 8 * u);
    for (int64_t j = 0; j < cnt; ++j) {
      const __m256 p = _mm256_set1_ps(coef[j * cs]);
      const float* xr = x + j * D + c;
      for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(p, _mm256_loadu_ps(xr + 8 * u), a[u]);
    }
    for (int u = 0; u < 8; ++u) _mm256_storeu_ps(acc + c + 8 * u, a[u]);
  }
  for (; c + 32 <= c1; c += 32) {
    __m256 a0 = _mm256_loadu_ps(acc + c), a1 = _mm256_loadu_ps(acc + c + 8), a2 = _mm256_loadu_ps(acc + c + 16),
           a3 = _mm256_loadu_ps(acc + c + 24);
    for (int64_t j = 0; j < cnt; ++j) {
      const __m256 p = _mm256_set1_ps(coef[j * cs]);
      const float* xr = x + j * D + c;
      a0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(xr), a0);
      a1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(xr + 8), a1);
      a2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(xr + 16), a2);
      a3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(xr + 24), a3);
    }
    _mm256_storeu_ps(acc + c, a0); _mm256_storeu_ps(acc + c + 8, a1);
    _mm256_storeu_ps(acc + c + 16, a2); _mm256_storeu_ps(acc + c + 24, a3);
  }
  for (; c < c1; c += 8) {
    __m256 a0 = _mm256_loadu_ps(acc + c);
    for (int64_t j = 0; j < cnt; ++j) a0 = _mm256_fmadd_ps(_mm256_set1_ps(coef[j * cs]), _mm256_loadu_ps(x + j * D + c), a0);
    _mm256_storeu_ps(acc + c, a0);
  }
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
