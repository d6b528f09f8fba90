// Low-bit weight-only products (qlinear): leanlm.quant's packed int4 / int8 weights, y = x . W^T, for the
// 1..16 activation rows of decode and speculative verification.
//
// Why: decode reads every weight once per token, so the kernel must stream the weights at DRAM speed with
// few instructions per byte. As llama.cpp's repacked Q4_0/Q8_0 x8 layouts and ONNX Runtime's MatMulNBits do,
// the weights are stored in the order the kernel reads them: tiles of 16 output rows, interleaved 4 bytes at a
// time, so one 64-byte load feeds one `dpbusd` that advances all 16 rows' dot products (row r is lane r: no
// horizontal sums), and each thread reads one sequential stream. The activation row is quantized to int8 per
// block of 32 (scale amax/127, as llama.cpp's Q8 activations), the integer dot products are exact, and the
// per-block activation scale, the per-group weight scale and an asymmetric zero are applied in float:
//
//   y[n] = sum_g s[n,g] * sum_{b in g} sx[b] * sum_{k in b} (q[n,k] - mid) qx[k]  +  z[n,g] * sum_{k in g} x[k]
//
// Layout of `w` (QuantLinear's "tiles" layout, leanlm.quant.packed.tile_codes): rows padded to a multiple of 16
// (padding rows hold the mid code), then per tile of 16 rows:
//   int8: per 4 columns, 64 bytes: row r's 4 stored values (code - 128) at bytes 4r .. 4r+3;
//   int4: per 8 columns, 64 bytes: byte 4r + j holds column j (low nibble) and column j + 4 (high nibble) of row r.
// Scales / zeros stay bf16 [N, G] (row-major); each tile's are widened once into a [G][16] fp32 scratch.
//
// The activation rounding adds a relative error of about 1/254 of each block's largest entry; benchmarks/
// bench_quant.py reports the KL between this path and the float path. Each activation row runs the same
// operations in the same order whatever the number of rows and whichever copy runs, so a k-row call equals k
// one-row calls bit for bit (speculative verification stays exact).
#include "leanlm.h"

static constexpr int64_t TILE_ROWS = 16;

// The tile loop of the tiled table kernels (qlinear_codebook*.cpp, qlinear_wide.cpp): tiles split over threads,
// activation rows in chunks of `chunk` (what one register set holds), a few tiles at a time, so that a chunk after
// the first re-reads the tiles from L1/L2, not DRAM. fn(rows, first row, tile, tile end, per-thread scratch of
// G * TILE_ROWS floats).
template <class ChunkFn>
static void for_tile_chunks(int64_t tiles, int64_t M, int64_t chunk, int64_t G, ChunkFn&& fn) {
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> ts(G * TILE_ROWS);
    const int64_t step = M <= chunk ? t1 - t0 : 2;
    for (int64_t t = t0; t < t1; t += step) {
      const int64_t te = std::min(t1, t + step);
      for (int64_t m0 = 0; m0 < M; m0 += chunk) fn(std::min(chunk, M - m0), m0, t, te, ts.data());
    }
  });
}

struct QActs {  // one call's quantized activation rows
  std::vector<int8_t> q;       // [M, Kp]
  std::vector<float> sx;       // [M, NB] block scales
  std::vector<int32_t> isum;   // [M, NB] sum of each block's quantized values (the mid-point's integer term)
  std::vector<float> sumx;     // [M, G] sum of each group's unrounded values (asymmetric weights)
};

// tile t's scales / zeros (bf16 [N, G], rows past N read as 0) -> fp32 [G][16]
static inline void tile_scales(const uint16_t* sp, const uint16_t* zp, int64_t N, int64_t G, int64_t t, float* ts,
                               float* tz) {
  const int64_t n0 = t * TILE_ROWS;
  for (int64_t r = 0; r < TILE_ROWS; ++r) {
    const bool in = n0 + r < N;
    for (int64_t g = 0; g < G; ++g) {
      ts[g * TILE_ROWS + r] = in ? bf16f(sp[(n0 + r) * G + g]) : 0.f;
      if (zp) tz[g * TILE_ROWS + r] = in ? bf16f(zp[(n0 + r) * G + g]) : 0.f;
    }
  }
}

namespace qlinear_portable {  // AVX2
#define QL_TARGET
#define QL_VNNI 0
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

// VNNI dot products where the CPU has them; set_q_linear_vnni(false) keeps the AVX2 path (same results;
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

// x rows quantized per block of 32: q = rne(x * 127 / amax), scale amax / 127
static void quantize_activations(const float* xp, int64_t M, int64_t K, int64_t Kp, int64_t G, int64_t BPG,
                                 bool want_sum, QActs& a) {
  const int64_t NB = Kp / 32;
  a.q.assign(M * Kp, 0);
  a.sx.assign(M * NB, 0.f);
  a.isum.assign(M * NB, 0);
  a.sumx.assign(want_sum ? M * G : 0, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < NB; ++b) {
      float amax = 0.f, sum = 0.f;
      for (int64_t k = b * 32; k < b * 32 + 32 && k < K; ++k) { amax = std::max(amax, std::fabs(xp[m * K + k])); sum += xp[m * K + k]; }
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int isum = 0;
      for (int64_t k = b * 32; k < b * 32 + 32 && k < K; ++k) {
        const int q = (int)std::nearbyint(xp[m * K + k] * inv);
        a.q[m * Kp + k] = (int8_t)q;
        isum += q;
      }
      a.sx[m * NB + b] = amax / 127.f;
      a.isum[m * NB + b] = isum;
      if (want_sum) a.sumx[m * G + b / BPG] += sum;
    }
  }
}

// the chunk of activation rows one register set holds
static int64_t q_linear_chunk(bool vnni) { return vnni ? 8 : 2; }

torch::Tensor q_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor zeros,
                       int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && scales.dim() == 2 && group % 32 == 0 && group > 0, "q_linear: bad shapes");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(), "q_linear: scales must be bf16");
  TORCH_CHECK(w.is_contiguous() && (bits == 4 || bits == 8), "q_linear: bad weight");
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(0), G = scales.size(1);
  const int64_t BPG = group / 32, NB = G * BPG, Kp = NB * 32, tiles = (N + TILE_ROWS - 1) / TILE_ROWS;
  TORCH_CHECK(M >= 1 && M <= 16 && K <= Kp, "q_linear: at most 16 rows, K <= padded K");
  TORCH_CHECK(w.numel() == tiles * TILE_ROWS * (bits == 4 ? Kp / 2 : Kp),
              "q_linear: weight size does not match the scales (tiles of 16 rows)");
  const bool has_zero = zeros.numel() > 0;
  if (has_zero) TORCH_CHECK(zeros.scalar_type() == at::kBFloat16 && zeros.is_contiguous() && zeros.numel() == N * G);
  auto xf = x.to(at::kFloat).contiguous();
  QActs a;
  quantize_activations(xf.data_ptr<float>(), M, K, Kp, G, BPG, has_zero, a);
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const uint16_t* sp = (const uint16_t*)scales.data_ptr<at::BFloat16>();
  const uint16_t* zp = has_zero ? (const uint16_t*)zeros.data_ptr<at::BFloat16>() : nullptr;
  const uint8_t* wp = (const uint8_t*)w.data_ptr();
  float* yp = y.data_ptr<float>();
  const bool vnni = q_linear_vnni();
  const int64_t chunk = q_linear_chunk(vnni);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> ts(G * TILE_ROWS), tz(has_zero ? G * TILE_ROWS : 0);
    // rows in register-sized chunks, a few tiles at a time, so that a chunk after the first re-reads the tiles
    // from L1/L2, not DRAM
    const int64_t step = M <= chunk ? t1 - t0 : 2;
    for (int64_t t = t0; t < t1; t += step) {
      const int64_t te = std::min(t1, t + step);
      for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        const int64_t mc = std::min(chunk, M - m0);
        if (vnni) {
          if (bits == 4) qlinear_vnni::gemv_chunk<4>(mc, wp, a, m0, sp, zp, yp, N, G, BPG, t, te, ts.data(), tz.data());
          else qlinear_vnni::gemv_chunk<8>(mc, wp, a, m0, sp, zp, yp, N, G, BPG, t, te, ts.data(), tz.data());
        } else {
          if (bits == 4) qlinear_portable::gemv_chunk<4>(mc, wp, a, m0, sp, zp, yp, N, G, BPG, t, te, ts.data(), tz.data());
          else qlinear_portable::gemv_chunk<8>(mc, wp, a, m0, sp, zp, yp, N, G, BPG, t, te, ts.data(), tz.data());
        }
      }
    }
  });
  return y;
}
