// Non-uniform 3-bit weights (qlinear_codebook3): y = x . W^T with W[n, k] = s[n, g] * T[c[n, k]], c a 3-bit index
// into a per-tensor table T of 8 int8 values (leanlm.quant.codebook: the fixed IQ3 table or one learned per tensor),
// s a bf16 scale per (row, group). 3 bits + one bf16 scale per 32 weights = 3.5 bits per weight.
//
// Numerics: those of q_linear_codebook (qlinear_codebook.cpp, which this file shares its code with: cb_linear and
// the .inc's GEMV): int8 activations per block of min(group, 64) columns, integer dot products with the table,
// one float multiply-add per activation block; a k-row call equals k one-row calls bit for bit, and the AVX2 and
// VNNI copies give the same results.
//
// Weight layout, per row, per 32 columns, 12 bytes (two bit planes, the idea of llama.cpp's Q3_K hmask):
//   bytes 0..7   the low 2 bits of each index: byte i, bits 2s..2s+1 = column 8s + i   (i < 8, s < 4)
//   bytes 8..11  the high bit, as one little-endian uint32: bit j = column j            (j < 32)
// Why this order: the low plane is one 64-bit broadcast and one variable shift (lane s by 2s) that leaves every
// column's two bits at the bottom of its own byte, in column order. The high plane in column order is a byte mask
// as it stands: on AVX-512 (the VNNI copy) one masked add of 4 puts it in; the AVX2 copy spreads it with a byte
// shuffle and a compare (cb_indices in the .inc). Then `pshufb` looks the 32 indices up as at 4 bits.
// leanlm.quant.codebook.pack_blocks3 writes this layout; it is also the layout saved to disk (save.py).
#include "leanlm.h"

torch::Tensor q_linear_codebook3(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor table,
                                 int64_t group) {
  TORCH_CHECK(table.scalar_type() == at::kChar && table.numel() == 8 && table.is_contiguous(),
              "q_linear_codebook3: table must be 8 int8 values");
  int8_t t16[16];  // the lookup takes 16 entries; the indices reach 7 only
  for (int i = 0; i < 16; ++i) t16[i] = table.data_ptr<int8_t>()[i & 7];
  return cb_linear("q_linear_codebook3", x, w, scales, t16, group, 3);
}
