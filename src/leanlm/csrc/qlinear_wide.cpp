// Uniform 5-bit and 6-bit weights (qlinear_wide), llama.cpp Q5_0-like signed integer grids: y = x . W^T with
//
//   W[n, k] = (c[n, k] - 2^(bits-1)) * s[n, g],   c in [0, 2^bits),   s a bf16 scale per (row, group of columns)
//
// so the levels are -16..15 (5 bits) or -32..31 (6 bits); no table lookup, no zero point. 5 (6) bits + one bf16
// scale per 32 weights = 5.5 (6.5) bits per weight.
//
// Numerics: q_linear's (qlinear.cpp, whose activation quantizer this reuses): each activation row is quantized to
// int8 per block of 32 columns (scale amax / 127), each block's products with the unsigned codes sum exactly in
// int32, the mid-point is taken out in integers (the sum starts at -2^(bits-1) * sum qx), and the float scales meet
// the sums once per block and group:
//
//   y[n] = sum_g s[n,g] * sum_{b in g} sx[b] * (sum_{k in b} c[n,k] qx[k] - 2^(bits-1) sum_{k in b} qx[k])
//
// Both copies (AVX2 `maddubs`, AVX512-VNNI `dpbusd`) form the same int32 sums (codes <= 63 times |qx| <= 127, two
// per int16 in `maddubs`: at most 16002, no saturation) and run the same lane-wise float FMAs in the same order, so
// they agree bit for bit, and a k-row call (1..16 rows) equals k one-row calls bit for bit.
//
// Layout (leanlm.quant.wide.tile_codes_wide writes it): rows padded to a multiple of 16 (padding rows hold the mid
// code), then per tile of 16 rows, per block of 32 columns, lanes of 64 bytes whose byte 4r + c belongs to row r
// (qlinear.cpp's interleave: one load feeds one dot product that advances all 16 rows; row r is lane r, no
// horizontal sums). Each lane holds whole codes in its low bits, one per step of 4 columns, and the spare high
// bits of all lanes hold the codes of the remaining steps, so most steps cost one AND:
//   5 bits, 320 bytes = 5 lanes; lane L (0..4), byte 4r + c:
//     bits 0..4: column 4L + c (columns 0..19)
//     bits 5..7: lane 0: bits 0..2 of column 20 + c;  lane 1: bits 3..4 of column 20 + c, then bit 3 of column 28 + c
//                lane 2: bits 0..2 of column 24 + c;  lane 3: bits 3..4 of column 24 + c, then bit 4 of column 28 + c
//                lane 4: bits 0..2 of column 28 + c
//   6 bits, 384 bytes = 6 lanes, two halves of 16 columns; lane 3p + L (p < 2, L < 3), byte 4r + c:
//     bits 0..5: column 16p + 4L + c;  bits 6..7: bits 2L..2L+1 of column 16p + 12 + c
// Per 32 columns and 16 rows, the VNNI copy spends 5 (6) ANDs on the whole-code steps and 14 (12) shift / mask /
// merge operations on the assembled ones, against 12 for the uniform int4 kernel's nibbles. Files keep a per-row
// layout (pack_wide).
#include "leanlm.h"

static constexpr int64_t wide_block_bytes(int64_t bits) { return bits == 5 ? 320 : 384; }

namespace wide_portable {  // AVX2
#define WD_TARGET
#define WD_VNNI 0
#include "qlinear_wide.inc"
#undef WD_TARGET
#undef WD_VNNI
}  // namespace wide_portable

namespace wide_vnni {  // AVX512-VNNI whatever the build's level (called only where the CPU has it)
#define WD_TARGET LEANLM_VNNI
#define WD_VNNI 1
#include "qlinear_wide.inc"
#undef WD_TARGET
#undef WD_VNNI
}  // namespace wide_vnni

// VNNI where the CPU has it; set_q_linear_wide_vnni(false) keeps the AVX2 path (same results; tests compare the two)
static bool wide_vnni_allowed = true;
static bool set_q_linear_wide_vnni(bool allowed) {
  const bool before = wide_vnni_allowed;
  wide_vnni_allowed = allowed;
  return before;
}

torch::Tensor q_linear_wide(torch::Tensor x, torch::Tensor w, torch::Tensor scales, int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 5 || bits == 6, "q_linear_wide: bits must be 5 or 6, got ", bits);
  TORCH_CHECK(x.dim() == 2 && scales.dim() == 2 && group > 0 && group % 32 == 0,
              "q_linear_wide: bad shapes (x [M, K], scales [N, G], group a multiple of 32)");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(), "q_linear_wide: scales must be bf16");
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kByte, "q_linear_wide: weight must be tiled uint8");
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(0), G = scales.size(1);
  const int64_t BPG = group / 32, NB = G * BPG, Kp = NB * 32, tiles = (N + TILE_ROWS - 1) / TILE_ROWS;
  TORCH_CHECK(M >= 1 && M <= 16 && K <= Kp, "q_linear_wide: at most 16 rows, K <= padded K");
  TORCH_CHECK(w.numel() == tiles * NB * wide_block_bytes(bits),
              "q_linear_wide: weight size does not match the scales and bits (tiles of 16 rows)");
  auto xf = x.to(at::kFloat).contiguous();
  QActs a;
  quantize_activations(xf.data_ptr<float>(), M, K, Kp, G, BPG, false, a);
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const uint16_t* sp = (const uint16_t*)scales.data_ptr<at::BFloat16>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  static const bool cpu_vnni = cpu_has_avx512_vnni();
  const bool vnni = cpu_vnni && wide_vnni_allowed;
  const int64_t chunk = vnni ? 8 : 2;  // activation rows one register set holds
  for_tile_chunks(tiles, M, chunk, G, [&](int64_t mc, int64_t m0, int64_t t, int64_t te, float* ts) {
    if (vnni) {
      if (bits == 5) wide_vnni::wide_chunk<5>(mc, wp, a, m0, sp, yp, N, G, BPG, t, te, ts);
      else wide_vnni::wide_chunk<6>(mc, wp, a, m0, sp, yp, N, G, BPG, t, te, ts);
    } else {
      if (bits == 5) wide_portable::wide_chunk<5>(mc, wp, a, m0, sp, yp, N, G, BPG, t, te, ts);
      else wide_portable::wide_chunk<6>(mc, wp, a, m0, sp, yp, N, G, BPG, t, te, ts);
    }
  });
  return y;
}
