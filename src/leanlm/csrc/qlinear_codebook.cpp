// Non-uniform 4-bit weights (qlinear_codebook): y = x . W^T with W[n, k] = s[n, g] * T[c[n, k]], where c is a 4-bit
// index into a per-tensor table T of 16 int8 values (leanlm.quant.codebook: IQ4_NL's fixed table or one learned
// per tensor) and s a bf16 scale per (row, group of columns).
//
// Why a table: a uniform 4-bit grid spends its levels evenly while weights are bell-shaped; 16 levels placed
// where the weights are cut the rounding error at the same bits. The 16 levels fill one 128-bit `pshufb` table
// exactly, so the lookup costs one shuffle per 64 bytes of indices, and the kernel otherwise streams the same bytes
// and runs the same int8 dot products as the uniform int4 kernel (qlinear.cpp). The activation rows are quantized
// to int8 per block of min(group, 64) columns (scale amax / 127; qlinear.cpp's are per 32), so each block's products
// sum exactly in int32 and meet the float scales once per block and group:
//
//   y[n] = sum_g s[n,g] * sum_{a in g} sx[a] * sum_{k in a} T[c[n,k]] qx[k]
//
// Each activation row's integer sums are exact and its float steps run in the same order whatever the number of rows
// (1..16 per call) and whichever copy runs (AVX2, AVX512-VNNI, AVX512-VNNI + VBMI), so a k-row call equals k one-row
// calls bit for bit.
//
// Layout: qlinear.cpp's int4 tiles (leanlm.quant.packed.tile_codes; the same bytes, the indices in place of the
// uniform codes): rows padded to a multiple of 16, then per tile of 16 rows, per 8 columns, 64 bytes, byte 4r + j
// holding column j (low nibble) and column j + 4 (high nibble) of row r. One 64-byte load, a mask and a shift give
// the indices of 16 rows x 4 columns twice over, each in the 4-byte lanes a dot product takes (row r in lane r: no
// horizontal sums), and one `pshufb` (`vpermb` where the CPU has VBMI) each looks them up (qlinear_codebook.inc).
// Files keep the plain per-row int4 packing (CodebookLinear.export); the module tiles at load. Until the tiles the
// kernel read 16 bytes per row and 32 columns, each with its own lookup, dot products and horizontal sum, at about
// 2.6x the uniform int4 kernel's time; benchmarks/bench_3bit.py --modes kernels times the two (and the 3-bit tiles).
#include "leanlm.h"

struct CBActs {  // one call's quantized activation rows (the 4-bit and 3-bit table kernels)
  std::vector<int8_t> q;      // [M, Kp]
  std::vector<float> sx;      // [M, NA] activation block scales
  std::vector<int32_t> isum;  // [M, NA] sum of each activation block's quantized values (the table shift's term)
  int64_t bpa = 1;            // blocks of 32 per activation block: min(group, 64) / 32
};

// x [M, K] (fp32) -> int8 per block of min(group, 64) columns, q = rne(x * 127 / amax), scale amax / 127; columns
// K..Kp stay 0
static void cb_quantize_activations(const float* xp, int64_t M, int64_t K, int64_t Kp, int64_t BPG, CBActs& a) {
  a.bpa = std::min<int64_t>(BPG, 2);
  const int64_t NA = Kp / 32 / a.bpa, ablock = a.bpa * 32;
  a.q.assign(M * Kp, 0);
  a.sx.assign(M * NA, 0.f);
  a.isum.assign(M * NA, 0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t ab = 0; ab < NA; ++ab) {
      const int64_t k0 = ab * ablock, k1 = std::min(K, k0 + ablock);
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(xp[m * K + k]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int isum = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const int q = (int)std::nearbyint(xp[m * K + k] * inv);
        a.q[m * Kp + k] = (int8_t)q;
        isum += q;
      }
      a.sx[m * NA + ab] = amax / 127.f;
      a.isum[m * NA + ab] = isum;
    }
  }
}

namespace codebook_portable {  // AVX2
using namespace qlinear_portable;  // qlinear_gemv.inc's register helpers and dot products
#define CB_TARGET
#define CB_VNNI 0
#define CB_VBMI 0
#include "qlinear_codebook.inc"
#undef CB_TARGET
#undef CB_VNNI
#undef CB_VBMI
}  // namespace codebook_portable

namespace codebook_vnni {  // AVX512-VNNI whatever the build's level (called only where the CPU has it, without VBMI)
using namespace qlinear_vnni;
#define CB_TARGET LEANLM_VNNI
#define CB_VNNI 1
#define CB_VBMI 0
#include "qlinear_codebook.inc"
#undef CB_TARGET
#undef CB_VNNI
#undef CB_VBMI
}  // namespace codebook_vnni

namespace codebook_vbmi {  // AVX512-VNNI + VBMI (`vpermb`: lookups without index masks; where the CPU has both)
using namespace qlinear_vnni;
#define CB_TARGET LEANLM_VNNI_VBMI
#define CB_VNNI 1
#define CB_VBMI 1
#include "qlinear_codebook.inc"
#undef CB_TARGET
#undef CB_VNNI
#undef CB_VBMI
}  // namespace codebook_vbmi

// VNNI (with VBMI) where the CPU has it; set_q_linear_codebook_vnni(false) keeps the AVX2 path, and
// set_q_linear_codebook_vbmi(false) the VNNI copy without VBMI (same results; tests compare the three)
static bool cb_vnni_allowed = true;
static bool set_q_linear_codebook_vnni(bool allowed) {
  const bool before = cb_vnni_allowed;
  cb_vnni_allowed = allowed;
  return before;
}
static bool cb_vbmi_allowed = true;
static bool set_q_linear_codebook_vbmi(bool allowed) {
  const bool before = cb_vbmi_allowed;
  cb_vbmi_allowed = allowed;
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
  const int64_t BPG = group / 32, NB = G * BPG, Kp = NB * 32, tiles = (N + TILE_ROWS - 1) / TILE_ROWS;
  TORCH_CHECK(M >= 1 && M <= 16 && K <= Kp, "q_linear_codebook: at most 16 rows, K <= padded K");
  TORCH_CHECK(w.numel() == tiles * TILE_ROWS * Kp / 2,
              "q_linear_codebook: weight size does not match the scales (int4 tiles of 16 rows, packed.tile_codes)");
  const int8_t* tp = table.data_ptr<int8_t>();
  for (int i = 0; i < 16; ++i) TORCH_CHECK(tp[i] >= -127, "q_linear_codebook: table values must be in [-127, 127]");
  auto xf = x.to(at::kFloat).contiguous();
  CBActs a;
  cb_quantize_activations(xf.data_ptr<float>(), M, K, Kp, BPG, a);
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const uint16_t* sp = (const uint16_t*)scales.data_ptr<at::BFloat16>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  static const bool cpu_vnni = cpu_has_avx512_vnni(), cpu_vbmi = cpu_vnni && cpu_has_avx512_vbmi();
  const bool vnni = cpu_vnni && cb_vnni_allowed, vbmi = vnni && cpu_vbmi && cb_vbmi_allowed;
  const int64_t chunk = vnni ? 8 : 2;  // activation rows one register set holds
  for_tile_chunks(tiles, M, chunk, G, [&](int64_t mc, int64_t m0, int64_t t, int64_t te, float* ts) {
    if (vbmi) codebook_vbmi::cb_chunk(mc, wp, a, m0, sp, tp, yp, N, G, BPG, t, te, ts);
    else if (vnni) codebook_vnni::cb_chunk(mc, wp, a, m0, sp, tp, yp, N, G, BPG, t, te, ts);
    else codebook_portable::cb_chunk(mc, wp, a, m0, sp, tp, yp, N, G, BPG, t, te, ts);
  });
  return y;
}
