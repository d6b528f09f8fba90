// Non-uniform 3-bit weights (qlinear_codebook3): y = x . W^T with W[n, k] = s[n, g] * T[c[n, k]], c a 3-bit index
// into a per-tensor table T of 8 int8 values (leanlm.quant.codebook: the fixed IQ3 table or one learned per tensor),
// s a bf16 scale per (row, group). 3 bits + one bf16 scale per 32 weights = 3.5 bits per weight.
//
// Numerics: those of q_linear_codebook (qlinear_codebook.cpp): the activation rows are quantized to int8 per block
// of min(group, 64) columns (scale amax / 127), each block's products with the table sum exactly in int32, and meet
// the float scales once per block and group:
//
//   y[n] = sum_g s[n,g] * sum_{a in g} sx[a] * sum_{k in a} T[c[n,k]] qx[k]
//
// Each activation row runs the same operations in the same order whatever the number of rows (1..16 per call) and
// whichever copy runs (AVX2, AVX512-VNNI), so a k-row call equals k one-row calls bit for bit.
//
// Layout: the weight is stored the way qlinear.cpp stores int4 / int8 (and for the same reason: one sequential
// stream, one load feeding 16 rows' dot products, no horizontal sums): rows padded to a multiple of 16, then per
// tile of 16 rows, per block of 32 columns, 192 bytes = 16 rows x 12 bytes, in three 64-byte planes whose byte
// 4r + c belongs to row r:
//   bytes   0..63   low 2 bits of columns 0..15:  bits 2s..2s+1 of byte 4r + c = column 4s + c       (s, c < 4)
//   bytes  64..127  low 2 bits of columns 16..31: bits 2s..2s+1 of byte 4r + c = column 16 + 4s + c
//   bytes 128..191  high bit of all 32 columns:   bit j of byte 4r + c         = column 4j + c       (j < 8)
// so each row keeps 8 bytes of low bits and 4 of high bits per 32 columns (llama.cpp Q3_K's hmask idea), and the
// indices of columns 4j .. 4j+3 of all 16 rows are one shift and one mask of each plane away, in the 4-byte lanes a
// dot product takes (qlinear_codebook3.inc). leanlm.quant.codebook.tile_codes3 writes it; files keep a per-row
// layout instead (pack_blocks3).
//
// Why tiles and not a per-row stream: per row, every 32 weights would cost an unpack, a lookup, a dot product and a
// float multiply-add of their own, where a tile shares each lookup's activation broadcast and each float step among
// 16 rows; the 4-bit table kernel (qlinear_codebook.cpp) moved from a per-row stream to qlinear.cpp's int4 tiles for
// that reason (benchmarks/bench_3bit.py times both against q_linear's uniform int4 tiles).
#include "leanlm.h"

static constexpr int64_t CB3_BLOCK_BYTES = 192;  // one tile's 16 rows x 32 columns

namespace codebook3_portable {  // AVX2
#define CB3_TARGET
#define CB3_VNNI 0
#include "qlinear_codebook3.inc"
#undef CB3_TARGET
#undef CB3_VNNI
}  // namespace codebook3_portable

namespace codebook3_vnni {  // AVX512-VNNI whatever the build's level (called only where the CPU has it)
#define CB3_TARGET LEANLM_VNNI
#define CB3_VNNI 1
#include "qlinear_codebook3.inc"
#undef CB3_TARGET
#undef CB3_VNNI
}  // namespace codebook3_vnni

torch::Tensor q_linear_codebook3(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor table,
                                 int64_t group) {
  TORCH_CHECK(x.dim() == 2 && scales.dim() == 2 && group > 0 && group % 32 == 0 && (group == 32 || group % 64 == 0),
              "q_linear_codebook3: bad shapes (group 32 or a multiple of 64)");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(),
              "q_linear_codebook3: scales must be bf16");
  TORCH_CHECK(table.scalar_type() == at::kChar && table.numel() == 8 && table.is_contiguous(),
              "q_linear_codebook3: table must be 8 int8 values");
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kByte, "q_linear_codebook3: weight must be packed uint8");
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(0), G = scales.size(1);
  const int64_t BPG = group / 32, NB = G * BPG, Kp = NB * 32, tiles = (N + TILE_ROWS - 1) / TILE_ROWS;
  TORCH_CHECK(M >= 1 && M <= 16 && K <= Kp, "q_linear_codebook3: at most 16 rows, K <= padded K");
  TORCH_CHECK(w.numel() == tiles * NB * CB3_BLOCK_BYTES,
              "q_linear_codebook3: weight size does not match the scales (tiles of 16 rows)");
  int8_t t16[16] = {0};
  for (int i = 0; i < 8; ++i) {
    t16[i] = table.data_ptr<int8_t>()[i];
    TORCH_CHECK(t16[i] >= -127, "q_linear_codebook3: table values must be in [-127, 127]");
  }
  auto xf = x.to(at::kFloat).contiguous();
  CBActs a;  // (qlinear_codebook.cpp)
  cb_quantize_activations(xf.data_ptr<float>(), M, K, Kp, BPG, a);
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const uint16_t* sp = (const uint16_t*)scales.data_ptr<at::BFloat16>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  static const bool cpu_vnni = cpu_has_avx512_vnni();
  const bool vnni = cpu_vnni && cb_vnni_allowed;
  const int64_t chunk = vnni ? 8 : 2;  // activation rows one register set holds
  for_tile_chunks(tiles, M, chunk, G, [&](int64_t mc, int64_t m0, int64_t t, int64_t te, float* ts) {
    if (vnni) codebook3_vnni::cb3_chunk(mc, wp, a, m0, sp, t16, yp, N, G, BPG, t, te, ts);
    else codebook3_portable::cb3_chunk(mc, wp, a, m0, sp, t16, yp, N, G, BPG, t, te, ts);
  });
  return y;
}
