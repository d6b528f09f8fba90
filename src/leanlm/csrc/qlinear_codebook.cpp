// Non-uniform 4-bit weights (qlinear_codebook): y = x . W^T with W[n, k] = s[n, g] * T[c[n, k]], where c is a 4-bit
// index into a per-tensor table T of 16 int8 values (leanlm.quant.codebook: IQ4_NL's fixed table or one learned
// per tensor) and s a bf16 scale per (row, group of columns).
//
// Why a table: a uniform 4-bit grid spends its levels evenly while weights are bell-shaped; 16 levels placed
// where the weights are cut the rounding error at the same bits. The lookup is one `pshufb` per 32 weights, so
// the kernel streams the same bytes as the uniform int4 kernel (qlinear.cpp) and does the same int8 dot products:
// the activation row is quantized to int8 per block of min(group, 64) columns (scale amax/127; qlinear.cpp's are
// per 32), so each block's products sum in int32 and meet the float scales once:
//
//   y[n] = sum_g s[n,g] * sum_{a in g} sx[a] * sum_{k in a} T[c[n,k]] qx[k]
//
// computed as sum (T + 128) qx - 128 sum qx (the table shifted to unsigned bytes for `dpbusd`; see the .inc).
// Weight layout: qlinear.cpp's int4 block layout (per row, per 32 columns, 16 bytes; byte j = column j | column
// j + 16 << 4). Up to 16 activation rows per call, in chunks of 8; a k-row call equals k one-row calls bit for bit.
#include "leanlm.h"

static constexpr int64_t CB_PF_TILES = 4;
static constexpr int64_t CB_ABLOCKS = 2;  // blocks of 32 per activation scale at most (64 columns; fewer if the group is 32)

namespace codebook_portable {  // AVX2 sign trick, whatever the build's level
#define CB_TARGET
#define CB_VNNI 0
#include "qlinear_codebook.inc"
#undef CB_TARGET
#undef CB_VNNI
}  // namespace codebook_portable

namespace codebook_vnni {  // AVX512-VNNI (called only where the CPU has it)
#define CB_TARGET LEANLM_VNNI
#define CB_VNNI 1
#include "qlinear_codebook.inc"
#undef CB_TARGET
#undef CB_VNNI
}  // namespace codebook_vnni

// VNNI where the CPU has it; set_q_linear_codebook_vnni(false) keeps the portable path (same results; tests
// compare the two)
static bool cb_vnni_allowed = true;
static bool set_q_linear_codebook_vnni(bool allowed) {
  const bool before = cb_vnni_allowed;
  cb_vnni_allowed = allowed;
  return before;
}

torch::Tensor q_linear_codebook(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor table,
                                int64_t group) {
  TORCH_CHECK(x.dim() == 2 && scales.dim() == 2 && group > 0 && group % 32 == 0 && (group == 32 || group % 64 == 0),
              "q_linear_codebook: bad shapes (group 32 or a multiple of 64)");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(), "q_linear_codebook: scales must be bf16");
  TORCH_CHECK(table.scalar_type() == at::kChar && table.numel() == 16 && table.is_contiguous(),
              "q_linear_codebook: table must be 16 int8 values");
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kByte, "q_linear_codebook: weight must be packed uint8");
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(0), G = scales.size(1);
  const int64_t BPG = group / 32, NB = G * BPG, Kp = NB * 32;
  TORCH_CHECK(M >= 1 && M <= 16 && K <= Kp && w.size(0) == N, "q_linear_codebook: at most 16 rows, K <= padded K");
  TORCH_CHECK(w.numel() == N * Kp / 2, "q_linear_codebook: weight size does not match the scales");
  const int8_t* tp = table.data_ptr<int8_t>();
  for (int i = 0; i < 16; ++i) TORCH_CHECK(tp[i] >= -127, "q_linear_codebook: table values must be in [-127, 127]");
  auto xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  // activations: int8 per block of min(group, 64) columns (scale amax / 127); corr: per weight group, the sum over its
  // activation blocks of scale * sum of codes (the +128 table shift's correction)
  const int64_t BPA = std::min<int64_t>(BPG, CB_ABLOCKS), APG = BPG / BPA, NA = G * APG, ablock = BPA * 32;
  std::vector<int8_t> qx(M * Kp);
  std::vector<int32_t> qsum(M * NB * 8, 0);  // 128 * sum of qx over each dot-product lane's 4 bytes (portable path)
  std::vector<float> sx(M * NA), corr(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t a = 0; a < NA; ++a) {
      const int64_t k0 = a * ablock, k1 = std::min(K, k0 + ablock);
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(xp[m * K + k]));
      const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int isum = 0;
      for (int64_t k = k0; k < k0 + ablock; ++k) {
        const int q = k < K ? (int)std::nearbyint(xp[m * K + k] * inv) : 0;
        qx[m * Kp + k] = (int8_t)q;
        qsum[m * NB * 8 + k / 4] += 128 * q;
        isum += q;
      }
      sx[m * NA + a] = d;
      corr[m * G + a / APG] += d * (float)isum;
    }
  }
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const uint16_t* sp = (const uint16_t*)scales.data_ptr<at::BFloat16>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  static const bool cpu_vnni = cpu_has_avx512_vnni();
  const bool vnni = cpu_vnni && cb_vnni_allowed;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t mc = std::min<int64_t>(8, M - m0);
      const int8_t* q = qx.data() + m0 * Kp;
      const int32_t* qs = qsum.data() + m0 * NB * 8;
      const float *s = sx.data() + m0 * NA, *c = corr.data() + m0 * G;
      if (vnni) codebook_vnni::cb_gemv_rows(mc, wp, q, qs, s, c, sp, tp, yp + m0 * N, N, G, BPG, n0, n1);
      else codebook_portable::cb_gemv_rows(mc, wp, q, qs, s, c, sp, tp, yp + m0 * N, N, G, BPG, n0, n1);
    }
  });
  return y;
}
