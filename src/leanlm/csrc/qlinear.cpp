// Low-bit weight-only products (qlinear): leanlm.quant's packed int4 / int8 weights, y = x . W^T.
//
// Why: torch's CPU weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) widen
// every weight to float and were compute-bound at a few GB/s on the AVX2 machine this was written on,
// barely faster than the bf16 GEMV they replace. This kernel does what llama.cpp does: the activation
// row is quantized to int8 per block of 32 (scale amax/127), and each block's dot product runs on int8
// SIMD (`maddubs` + `madd`, or one VNNI `dpbusd` where the CPU has AVX512-VNNI: the same exact
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

static constexpr int64_t PF_TILES = 4;

namespace qlinear_portable {  // the build's own ISA level
#define QL_TARGET
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define QL_VNNI 1
#else
#define QL_VNNI 0
#endif
#include "qlinear_gemv.inc"
#undef QL_TARGET
#undef QL_VNNI
}  // namespace qlinear_portable

namespace qlinear_vnni {  // AVX512-VNNI whatever the build's level (called only where the CPU has it)
#define QL_TARGET LEANLM_VNNI
#define QL_VNNI 1
#include "qlinear_gemv.inc"
#undef QL_TARGET
#undef QL_VNNI
}  // namespace qlinear_vnni

// VNNI dot products where the CPU has them; set_q_linear_vnni(false) keeps the portable path (same results;
// tests compare the two)
static bool q_linear_vnni_allowed = true;
static bool q_linear_vnni() {
  static const bool cpu = cpu_has_avx512_vnni();
  return cpu && q_linear_vnni_allowed;
}
static bool set_q_linear_vnni(bool allowed) {
  const bool before = q_linear_vnni_allowed;
  q_linear_vnni_allowed = allowed;
  return before;
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
  const bool vnni = q_linear_vnni();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    // rows in chunks of 8 (the second chunk re-reads the weights); each row's sums run in the
    // same order whatever M is, so a k-row call equals k one-row calls bit for bit
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t mc = std::min<int64_t>(8, M - m0);
      const int8_t* q = qx.data() + m0 * Kp;
      const float *s = sx.data() + m0 * NB, *c = corr.data() + m0 * G, *sm = sumx.data() + m0 * G;
      if (vnni) {
        if (bits == 4) qlinear_vnni::gemv_rows<4>(mc, wp, q, s, c, sm, sp, zp, yp + m0 * N, N, G, BPG, n0, n1);
        else qlinear_vnni::gemv_rows<8>(mc, wp, q, s, c, sm, sp, zp, yp + m0 * N, N, G, BPG, n0, n1);
      } else {
        if (bits == 4) qlinear_portable::gemv_rows<4>(mc, wp, q, s, c, sm, sp, zp, yp + m0 * N, N, G, BPG, n0, n1);
        else qlinear_portable::gemv_rows<8>(mc, wp, q, s, c, sm, sp, zp, yp + m0 * N, N, G, BPG, n0, n1);
      }
    }
  });
  return y;
}
