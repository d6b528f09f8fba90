// A decoder block's glue for many rows (prefill), AVX-512 and parallel over rows: RMSNorm of the fp32 residual
// and the gated activation act(gate) * up. Why: ATen runs each as 3-6 passes over the rows (pow, mean, rsqrt,
// mul, cast; silu, mul), ~15% of a SmolLM2 prefill at 512 with the int8 GEMM; here each is one pass.
// Numerics follow runtime.RMSNorm / runtime.MLP (fp32 math, act(gate) rounded to the dtype before the product,
// as torch does) up to the order of the norm's sum and the exp's last bit; the fused decode step's glue
// (fused_block.cpp) keeps every forward of <= 16 rows.
#include "leanlm.h"

namespace prefill_glue {

LEANLM_AVX512 static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
LEANLM_AVX512 static inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
LEANLM_AVX512 static inline __m512 round_bf16(__m512 v) {  // fp32 -> nearest-even bf16, as fp32
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                               _mm512_set1_epi32((int)0xFFFF0000u));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(r);
}
LEANLM_AVX512 static inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
LEANLM_AVX512 static inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_bf16(v)), 16)));
}
template <typename T> LEANLM_AVX512 static inline __m512 rnd16(__m512 v) {
  if constexpr (std::is_same_v<T, float>) return v; else return round_bf16(v);
}

// (the loops are target functions of their own: a lambda does not inherit the target attribute)
template <typename T>
LEANLM_AVX512 static void glu_range(const T* gu, T* out, int64_t F, bool gelu, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T *g = gu + b * 2 * F, *u = g + F;
      T* o = out + b * F;
      for (int64_t j = 0; j < F; j += 16) {
        const __m512 x = load16(g + j);
        __m512 act;
        if (gelu) {  // 0.5 x (1 + tanh(y)), tanh(y) = 1 - 2 / (exp(2y) + 1)
          const __m512 y = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                         _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
          const __m512 e = attn_prefill::exp512(_mm512_min_ps(_mm512_mul_ps(y, _mm512_set1_ps(2.f)), _mm512_set1_ps(88.f)));
          const __m512 th = _mm512_sub_ps(_mm512_set1_ps(1.f), _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, _mm512_set1_ps(1.f))));
          act = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.f), th));
        } else {  // x / (1 + exp(-x))
          const __m512 e = attn_prefill::exp512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), x), _mm512_set1_ps(88.f)));
          act = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
        }
        store16(o + j, _mm512_mul_ps(rnd16<T>(act), load16(u + j)));
      }
    }
}

template <typename T>
static void glu_rows(const T* gu, T* out, int64_t B, int64_t F, bool gelu) {
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) { glu_range(gu, out, F, gelu, b0, b1); });
}

template <typename T>
LEANLM_AVX512 static void norm_range(const float* x, const float* w, T* out, int64_t D, float eps, bool plus_one,
                                     int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* h = x + b * D;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) ss = _mm512_fmadd_ps(_mm512_loadu_ps(h + d), _mm512_loadu_ps(h + d), ss);
      const __m512 r = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / (float)D + eps));
      for (int64_t d = 0; d < D; d += 16) {
        __m512 wv = _mm512_loadu_ps(w + d);
        if (plus_one) wv = _mm512_add_ps(wv, _mm512_set1_ps(1.f));
        store16(out + b * D + d, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(h + d), r), wv));
      }
    }
}

template <typename T>
static void norm_rows(const float* x, const float* w, T* out, int64_t B, int64_t D, float eps, bool plus_one) {
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) { norm_range(x, w, out, D, eps, plus_one, b0, b1); });
}

}  // namespace prefill_glue

// act(gate) * up of gate_up [B, 2F] (fp32 / bf16, contiguous, F % 16 == 0) -> [B, F]; silu, or GELU-tanh
Tensor glu_rows(Tensor gu, bool gelu) {
  TORCH_CHECK(prefill_attention_supported(), "glu_rows: this CPU lacks AVX-512");
  TORCH_CHECK(gu.dim() == 2 && gu.is_contiguous() && gu.size(1) % 32 == 0, "glu_rows: contiguous [B, 2F], F % 16 == 0");
  const int64_t B = gu.size(0), F = gu.size(1) / 2;
  Tensor out = at::empty({B, F}, gu.options());
  if (gu.scalar_type() == at::kBFloat16)
    prefill_glue::glu_rows(gu.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), B, F, gelu);
  else {
    TORCH_CHECK(gu.scalar_type() == at::kFloat, "glu_rows: fp32 / bf16");
    prefill_glue::glu_rows(gu.data_ptr<float>(), out.data_ptr<float>(), B, F, gelu);
  }
  return out;
}

// RMSNorm of fp32 rows x [B, D] (contiguous, D % 16 == 0) with an fp32 weight, written in bf16 or fp32
Tensor norm_rows(Tensor x, Tensor w, double eps, bool plus_one, bool bf16) {
  TORCH_CHECK(prefill_attention_supported(), "norm_rows: this CPU lacks AVX-512");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() && x.size(1) % 16 == 0,
              "norm_rows: contiguous fp32 [B, D], D % 16 == 0");
  Tensor wf = as_float(w);
  TORCH_CHECK(wf.numel() == x.size(1), "norm_rows: weight [D]");
  const int64_t B = x.size(0), D = x.size(1);
  Tensor out = at::empty({B, D}, x.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  if (bf16) prefill_glue::norm_rows(x.data_ptr<float>(), wf.data_ptr<float>(), out.data_ptr<c10::BFloat16>(), B, D, (float)eps, plus_one);
  else prefill_glue::norm_rows(x.data_ptr<float>(), wf.data_ptr<float>(), out.data_ptr<float>(), B, D, (float)eps, plus_one);
  return out;
}
