// 2:4 sparse int8 weights (leanlm.quant.nm, NMInt8Linear): y = x . W^T for the 1..16 activation rows of decode
// and speculative verification, reading 0.625 of the bytes of qlinear.cpp's dense int8.
//
// Why: a 2:4-pruned matrix stored dense streams its zeros, so pruning buys no decode speed. Here each group
// of 4 consecutive input weights of a row keeps its 2 values plus a 3-bit code of their positions (one of 6
// pairs; a nibble), and the kernel gathers the matching activation bytes with `pshufb` (within 128-bit lanes)
// instead of reading zeros.
//
// Layout of `w` (NMInt8Linear's tiles, leanlm.quant.nm.tile_nm): rows padded to a multiple of 16 (values 0),
// then per tile of 16 rows, per step of 8 input columns (two groups A, B), 80 bytes:
//   bytes 4r .. 4r+3: row r's kept values (A first, A second, B first, B second), signed int8;
//   byte 64 + r:      row r's pair codes, A in the low nibble, B in the high one.
// Per row and 8 columns: 4 + 1 bytes, so 5/8 byte per weight (dense int8: 1).
//
// The positions become `pshufb` indexes in registers (no gather): each row's code byte is spread over its
// 4 value bytes, a shift brings group B's nibble down, a 16-entry table maps (code, first/second) to the
// position in the group, and +4 selects group B;
// the activation's 8 bytes of the step are broadcast to every 128-bit lane, so one `pshufb` gathers the
// 4 activation bytes each row needs. The mask depends on the weights only, so it is built once per step for
// all activation rows.
//
// Numerics are qlinear.cpp's int8 path exactly: activations quantized per block of 32 (quantize_activations),
// exact int32 dot products per block, then gacc += ia * sx[b], acc += gacc * s[g] in the same order; so this
// kernel equals q_linear on the same codes with the pruned ones stored as zeros, bit for bit (the tests check
// it), and a k-row call equals k one-row calls.
#include "leanlm.h"

// pair code c (0..5) -> kept positions: NM_TBL[c] = the first, NM_TBL[8 + c] = the second
// codes: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
static constexpr int64_t NM_STEP_BYTES = 80;  // 8 columns x 16 rows: 64 value bytes + 16 code bytes

namespace qlinear_nm_portable {  // AVX2
using namespace qlinear_portable;  // ql_* helpers
#define QL_TARGET
#define QL_VNNI 0
#include "qlinear_nm.inc"
#undef QL_TARGET
#undef QL_VNNI
}  // namespace qlinear_nm_portable

namespace qlinear_nm_vnni {  // AVX512-VNNI whatever the build's level (called only where the CPU has it)
using namespace qlinear_vnni;
#define QL_TARGET LEANLM_VNNI
#define QL_VNNI 1
#include "qlinear_nm.inc"
#undef QL_TARGET
#undef QL_VNNI
}  // namespace qlinear_nm_vnni

static bool q_linear_nm_vnni_allowed = true;
static bool set_q_linear_nm_vnni(bool allowed) {
  const bool before = q_linear_nm_vnni_allowed;
  q_linear_nm_vnni_allowed = allowed;
  return before;
}

torch::Tensor q_linear_nm(torch::Tensor x, torch::Tensor w, torch::Tensor scales, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && scales.dim() == 2 && group % 32 == 0 && group > 0, "q_linear_nm: bad shapes");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(), "q_linear_nm: scales must be bf16");
  TORCH_CHECK(w.is_contiguous() && w.element_size() == 1, "q_linear_nm: the weight must be contiguous bytes");
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(0), G = scales.size(1);
  const int64_t BPG = group / 32, NB = G * BPG, Kp = NB * 32, tiles = (N + TILE_ROWS - 1) / TILE_ROWS;
  TORCH_CHECK(M >= 1 && M <= 16 && K <= Kp, "q_linear_nm: at most 16 rows, K <= padded K");
  TORCH_CHECK(w.numel() == tiles * (Kp / 8) * NM_STEP_BYTES,
              "q_linear_nm: weight size does not match the scales (tiles of 16 rows, 80 bytes per 8 columns)");
  auto xf = x.to(at::kFloat).contiguous();
  QActs a;
  quantize_activations(xf.data_ptr<float>(), M, K, Kp, G, BPG, false, a);
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const uint16_t* sp = (const uint16_t*)scales.data_ptr();
  const uint8_t* wp = (const uint8_t*)w.data_ptr();
  float* yp = y.data_ptr<float>();
  static const bool cpu_vnni = cpu_has_avx512_vnni();
  const bool vnni = cpu_vnni && q_linear_nm_vnni_allowed;
  const int64_t chunk = q_linear_chunk(vnni);
  // the activation bytes the kernel reads: as quantized (AVX2's sign trick), or + 128 (VNNI's unsigned operand)
  std::vector<uint8_t> biased;
  if (vnni) {
    biased.resize(a.q.size());
    for (size_t i = 0; i < biased.size(); ++i) biased[i] = (uint8_t)(a.q[i] + 128);
  }
  const uint8_t* xb = vnni ? biased.data() : (const uint8_t*)a.q.data();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> ts(G * TILE_ROWS);
    const int64_t step = M <= chunk ? t1 - t0 : 2;  // as q_linear: later chunks re-read the tiles from cache
    for (int64_t t = t0; t < t1; t += step) {
      const int64_t te = std::min(t1, t + step);
      for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        const int64_t mc = std::min(chunk, M - m0);
        if (vnni) qlinear_nm_vnni::nm_chunk(mc, wp, a, xb, m0, sp, yp, N, G, BPG, t, te, ts.data());
        else qlinear_nm_portable::nm_chunk(mc, wp, a, xb, m0, sp, yp, N, G, BPG, t, te, ts.data());
      }
    }
  });
  return y;
}
