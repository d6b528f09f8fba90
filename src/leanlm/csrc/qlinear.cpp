// Low-bit weight-only products (qlinear): leanlm.quant's packed int4 / int8 weights, y = x . W^T.
//
// Why: torch's CPU weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) widen
// every weight to float and were compute-bound at a few GB/s on the AVX2 machine this was written on,
// barely faster than the bf16 GEMV they replace. This kernel does what llama.cpp does: the activation
// row is quantized to int8 per block of 32 (scale amax/127), and each block's dot product runs on int8
// SIMD (`maddubs` + `madd`, or one VNNI `dpbusd` where the build has AVX512-VNNI: the same exact
// integer sums, as no pair of products reaches the int16 saturation of `maddubs`: int4 codes <= 15 and
// int8 magnitudes <= 128 times activations <= 127); the per-group weight scale, the int4 mid-point (-8)
// and an asymmetric zero are applied per group in float:
//
//   y[n] = sum_g s[n,g] * sum_{b in g} sx[b] * (sum_k q[n,k] qx[k] - 8 * sum_k qx[k])   (int4)
//        + sum_g z[n,g] * sum_{k in g} x[k]                                            (asymmetric)
//
// Weight layout (int4): per row, per block of 32 columns, 16 bytes; byte j holds column j (low nibble)
// and column j + 16 (high nibble). int8: plain rows of (code - 128). Scales/zeros bf16 [N, G]. Up to 16
// activation rows per call (decode, speculative verification), in chunks of 8.
//
// The activation rounding adds a relative error of about 1/254 of each block's largest entry (the same
// as llama.cpp's Q8 activations); benchmarks/bench_quant.py reports the KL between this path and the
// float path.
#include "leanlm.h"

// sum over each 4 adjacent byte pairs u8(a) * s8(b) -> 8 int32 lanes
static inline __m256i dot_u8s8(__m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

static constexpr int64_t PF_TILES = 4;

// R output rows at a time share each activation block load; per group, the int8 block dot
// products are scaled by the activation scales into gacc, then by the weight scale into acc.
template <int BITS, int M, int R>
static void gemv_tile(const uint8_t* w, const int8_t* qx, const float* sx, const float* corr, const float* sumx,
                      const uint16_t* sp, const uint16_t* zp, float* y, int64_t N, int64_t G, int64_t BPG, int64_t n) {
  const int64_t NB = G * BPG, Kp = NB * 32, row_bytes = BITS == 4 ? Kp / 2 : Kp;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  {  // software prefetch a few tiles ahead: many short row streams defeat the hardware prefetcher
    const char* ahead = (const char*)(w + (n + PF_TILES * R) * row_bytes);
    for (int64_t off = 0; off < R * row_bytes; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
  }
  __m256 acc[M][R];
  float ysc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) { acc[m][r] = _mm256_setzero_ps(); ysc[m][r] = 0.f; }
  for (int64_t g = 0; g < G; ++g) {
    float s[R];
    for (int r = 0; r < R; ++r) {
      s[r] = bf16f(sp[(n + r) * G + g]);
      const float z = zp ? bf16f(zp[(n + r) * G + g]) : 0.f;
      for (int m = 0; m < M; ++m) ysc[m][r] += (BITS == 4 ? -8.f * s[r] * corr[m * G + g] : 0.f) + z * sumx[m * G + g];
    }
    __m256 gacc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) gacc[m][r] = _mm256_setzero_ps();
    for (int64_t b = g * BPG; b < (g + 1) * BPG; ++b) {
      __m256i q[M];
      __m256 d[M];
      for (int m = 0; m < M; ++m) {
        q[m] = _mm256_loadu_si256((const __m256i*)(qx + m * Kp + b * 32));
        d[m] = _mm256_set1_ps(sx[m * NB + b]);
      }
      for (int r = 0; r < R; ++r) {
        const uint8_t* wr = w + (n + r) * row_bytes;
        if (BITS == 4) {
          const __m128i raw = _mm_loadu_si128((const __m128i*)(wr + b * 16));
          const __m256i wv = _mm256_and_si256(
              _mm256_insertf128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1), low4);
          for (int m = 0; m < M; ++m) {
            const __m256 f = _mm256_cvtepi32_ps(dot_u8s8(wv, q[m]));
            gacc[m][r] = _mm256_fmadd_ps(f, d[m], gacc[m][r]);
          }
        } else {
          const __m256i wv = _mm256_loadu_si256((const __m256i*)(wr + b * 32));
          const __m256i wabs = _mm256_sign_epi8(wv, wv);
          for (int m = 0; m < M; ++m) {
            const __m256 f = _mm256_cvtepi32_ps(dot_u8s8(wabs, _mm256_sign_epi8(q[m], wv)));
            gacc[m][r] = _mm256_fmadd_ps(f, d[m], gacc[m][r]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 vs = _mm256_set1_ps(s[r]);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(gacc[m][r], vs, acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n + r] = hsum8(acc[m][r]) + ysc[m][r];
}

template <int BITS, int M>
static void gemv(const uint8_t* w, const int8_t* qx, const float* sx, const float* corr, const float* sumx,
                 const uint16_t* sp, const uint16_t* zp, float* y, int64_t N, int64_t G, int64_t BPG,
                 int64_t n0, int64_t n1) {
  constexpr int R = M == 1 ? 4 : M == 2 ? 2 : 1;
  int64_t n = n0;
  for (; n + R <= n1; n += R) gemv_tile<BITS, M, R>(w, qx, sx, corr, sumx, sp, zp, y, N, G, BPG, n);
  for (; n < n1; ++n) gemv_tile<BITS, M, 1>(w, qx, sx, corr, sumx, sp, zp, y, N, G, BPG, n);
}

template <int BITS>
static void gemv_rows(int64_t M, const uint8_t* w, const int8_t* qx, const float* sx, const float* corr,
                      const float* sumx, const uint16_t* sp, const uint16_t* zp, float* y, int64_t N, int64_t G,
                      int64_t BPG, int64_t n0, int64_t n1) {
  switch (M) {
#define LEANLM_CASE(R) case R: gemv<BITS, R>(w, qx, sx, corr, sumx, sp, zp, y, N, G, BPG, n0, n1); break;
    LEANLM_CASE(1) LEANLM_CASE(2) LEANLM_CASE(3) LEANLM_CASE(4) LEANLM_CASE(5) LEANLM_CASE(6) LEANLM_CASE(7) LEANLM_CASE(8)
#undef LEANLM_CASE
  }
}

torch::Tensor q_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor zeros,
                       int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && scales.dim() == 2 && group % 32 == 0, "q_linear: bad shapes");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(), "q_linear: scales must be bf16");
  TORCH_CHECK(w.is_contiguous() && (bits == 4 || bits == 8), "q_linear: bad weight");
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(0), G = scales.size(1);
  const int64_t BPG = group / 32, NB = G * BPG, Kp = NB * 32;
  TORCH_CHECK(M >= 1 && M <= 16 && K <= Kp && w.size(0) == N, "q_linear: at most 16 rows, K <= padded K");
  TORCH_CHECK(w.numel() == N * (bits == 4 ? Kp / 2 : Kp), "q_linear: weight size does not match the scales");
  const bool has_zero = zeros.numel() > 0;
  if (has_zero) TORCH_CHECK(zeros.scalar_type() == at::kBFloat16 && zeros.is_contiguous() && zeros.numel() == N * G);
  auto xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  std::vector<int8_t> qx(M * Kp);
  std::vector<float> sx(M * NB), corr(M * G, 0.f), sumx(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < NB; ++b) {
      float amax = 0.f, sum = 0.f;
      for (int64_t k = b * 32; k < b * 32 + 32 && k < K; ++k) { amax = std::max(amax, std::fabs(xp[m * K + k])); sum += xp[m * K + k]; }
      const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int isum = 0;
      for (int64_t k = b * 32; k < b * 32 + 32; ++k) {
        const int q = k < K ? (int)std::nearbyint(xp[m * K + k] * inv) : 0;
        qx[m * Kp + k] = (int8_t)q;
        isum += q;
      }
      sx[m * NB + b] = d;
      corr[m * G + b / BPG] += d * (float)isum;
      sumx[m * G + b / BPG] += sum;
    }
  }
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const uint16_t* sp = (const uint16_t*)scales.data_ptr<at::BFloat16>();
  const uint16_t* zp = has_zero ? (const uint16_t*)zeros.data_ptr<at::BFloat16>() : nullptr;
  const uint8_t* wp = (const uint8_t*)w.data_ptr();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    // rows in chunks of 8 (the second chunk re-reads the weights); each row's sums run in the
    // same order whatever M is, so a k-row call equals k one-row calls bit for bit
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t mc = std::min<int64_t>(8, M - m0);
      const int8_t* q = qx.data() + m0 * Kp;
      const float *s = sx.data() + m0 * NB, *c = corr.data() + m0 * G, *sm = sumx.data() + m0 * G;
      if (bits == 4) gemv_rows<4>(mc, wp, q, s, c, sm, sp, zp, yp + m0 * N, N, G, BPG, n0, n1);
      else gemv_rows<8>(mc, wp, q, s, c, sm, sp, zp, yp + m0 * N, N, G, BPG, n0, n1);
    }
  });
  return y;
}
