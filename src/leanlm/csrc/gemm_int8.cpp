// Low-bit weight GEMM for many rows (prefill, scoring): y = x . W^T on int8 dot products (AVX512-VNNI).
//
// Why: multi-row products of leanlm.quant's packed weights used to dequantize the weight to fp32 and run
// the fp32 GEMM; this kernel keeps the weight in its codes and runs the dot products on `vpdpbusd` (64
// u8 x s8 products per instruction), with the activations quantized on the fly, as llama.cpp's repacked
// Q8_0/Q4_0 GEMMs and ONNX Runtime's MatMulNBits int8-compute path do.
//
// Numerics (the same scheme as qlinear.cpp's small-row kernel, so decode and prefill see the same
// quantization): each activation row is quantized to int8 per block of 32 (scale amax/127, round to
// nearest even), the weights are unsigned codes (int4: 0..15 around mid 8; int8: 0..255 around mid 128,
// stored as code - 128), and
//
//   y[m,n] = sum_g s[n,g] * (sum_{b in g} sx[m,b] * sum_{k in b} q[n,k] qx[m,k]  -  mid * corr[m,g])
//          + z[n,g] * sumx[m,g]                                               (asymmetric weights only)
//
// with corr[m,g] = sum_{b in g} sx[m,b] * sum_{k in b} qx[m,k] and sumx[m,g] = sum_{k in g} x[m,k]. The
// integer sums are exact; the float sums run in a fixed order per output, so a row's result does not
// depend on which thread computed it, but it differs from qlinear.cpp's order (the <= 16-row path keeps
// its own kernel: speculative verification's batch invariance is a property of that path).
//
// Layout: the weight stays in qlinear.cpp's tiled layout (no second copy). Each thread packs a panel of 32
// output columns (two tiles) at a time into a scratch buffer [k/4][32 columns][4 bytes] (the tiles' 64-byte
// steps side by side, made unsigned; int4 codes unpacked to bytes), then runs every row of x against it: the
// packing costs O(N K) against the O(M N K) products, as a BLAS packs its B panels.
//
// The kernels carry their own target attribute (AVX512F/BW/VL + VNNI) so the extension, built for its
// run-time ISA level (native.py), contains them whatever that level is; ops.py calls them only on a CPU
// with those flags (native.vnni_gemm), and the entry point checks again.
#include "leanlm.h"

// (LEANLM_VNNI: leanlm.h)

namespace gemm_int8 {

constexpr int64_t NR = 32;  // output columns per panel (two zmm of 16 int32 lanes)
constexpr int MR = 4;       // activation rows per micro-tile

struct Acts {  // one call's quantized activations
  std::vector<int8_t> q;  // [M, Kp]
  std::vector<float> sx;  // [M, NB] block scales
  std::vector<float> corr, sumx;  // [M, G]
};

// quantize rows [m0, m1) of x (fp32 [M, K]) per block of 32, as qlinear.cpp does (q = rne(x * 127 / amax))
LEANLM_VNNI static inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
LEANLM_VNNI static inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {  // bf16 -> fp32: a 16-bit shift
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

template <typename T>
LEANLM_VNNI static void quantize_rows(const T* x, int64_t K, int64_t Kp, int64_t NB, int64_t G, int64_t BPG,
                                      bool want_sum, Acts& a, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const T* xr = x + m * K;
    int8_t* qr = a.q.data() + m * Kp;
    float* cr = a.corr.data() + m * G;
    float* sr = want_sum ? a.sumx.data() + m * G : nullptr;
    for (int64_t g = 0; g < G; ++g) { cr[g] = 0.f; if (sr) sr[g] = 0.f; }
    for (int64_t b = 0; b < NB; ++b) {
      const int64_t k0 = b * 32, valid = std::max<int64_t>(0, std::min<int64_t>(32, K - k0));
      const __mmask16 m_lo = (__mmask16)((1u << std::min<int64_t>(16, valid)) - 1);
      const __mmask16 m_hi = (__mmask16)(valid > 16 ? (1u << (valid - 16)) - 1 : 0);
      const __m512 v0 = load16(xr + k0, m_lo), v1 = load16(xr + k0 + 16, m_hi);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      const __m512 vi = _mm512_set1_ps(inv);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vi)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vi));
      _mm_storeu_si128((__m128i*)(qr + k0), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128((__m128i*)(qr + k0 + 16), _mm512_cvtepi32_epi8(q1));
      const int isum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      a.sx[m * NB + b] = d;
      cr[b / BPG] += d * (float)isum;
      if (sr) sr[b / BPG] += _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
    }
  }
}

// panel [Kp/4][NR][4] of output columns [n0, n0 + NR) (two tiles of qlinear.cpp's layout, codes made unsigned;
// zero past the last tile), and its scales / zeros as fp32 [G][NR]
template <int BITS>
LEANLM_VNNI static void pack_panel(const uint8_t* w, const uint16_t* sp, const uint16_t* zp, int64_t N, int64_t Kp,
                                   int64_t G, int64_t n0, uint8_t* panel, float* psw, float* pzw) {
  const int64_t tiles = (N + TILE_ROWS - 1) / TILE_ROWS, tile_bytes = TILE_ROWS * (BITS == 4 ? Kp / 2 : Kp);
  for (int64_t half = 0; half < NR / TILE_ROWS; ++half) {
    const int64_t t = n0 / TILE_ROWS + half;
    uint8_t* out = panel + half * TILE_ROWS * 4;
    if (t >= tiles) {
      for (int64_t k4 = 0; k4 < Kp / 4; ++k4) _mm512_storeu_si512((void*)(out + k4 * NR * 4), _mm512_setzero_si512());
      continue;
    }
    const uint8_t* wt = w + t * tile_bytes;
    if (BITS == 8) {
      for (int64_t k4 = 0; k4 < Kp / 4; ++k4)  // stored code - 128 -> code
        _mm512_storeu_si512((void*)(out + k4 * NR * 4),
                            _mm512_xor_si512(_mm512_loadu_si512((const void*)(wt + k4 * 64)), _mm512_set1_epi8((char)0x80)));
    } else {
      const __m512i m4 = _mm512_set1_epi8(0x0F);
      for (int64_t k8 = 0; k8 < Kp / 8; ++k8) {  // low nibbles: columns 8 k8 .. +3, high: the next 4
        const __m512i v = _mm512_loadu_si512((const void*)(wt + k8 * 64));
        _mm512_storeu_si512((void*)(out + 2 * k8 * NR * 4), _mm512_and_si512(v, m4));
        _mm512_storeu_si512((void*)(out + (2 * k8 + 1) * NR * 4), _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < NR; ++j) {
      const int64_t n = n0 + j;
      psw[g * NR + j] = n < N ? bf16f(sp[n * G + g]) : 0.f;
      pzw[g * NR + j] = n < N && zp ? bf16f(zp[n * G + g]) : 0.f;
    }
}

// R rows (R <= MR) of x against one panel -> y[r, n0 .. n0 + ncols)
LEANLM_VNNI static inline void store16(float* p, __mmask16 k, __m512 v) { _mm512_mask_storeu_ps(p, k, v); }
LEANLM_VNNI static inline void store16(c10::BFloat16* p, __mmask16 k, __m512 v) {  // round to nearest even, as torch
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(r));
}

template <int R, bool ZERO, typename TO>
LEANLM_VNNI static void micro(const uint8_t* panel, const float* psw, const float* pzw, const int8_t* xq, int64_t Kp,
                              const float* sx, int64_t NB, const float* corr, const float* sumx, int64_t G,
                              int64_t BPG, float mid, const float* pb, TO* y, int64_t ldy, int64_t ncols) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 gacc[R][2];
    for (int r = 0; r < R; ++r) gacc[r][0] = gacc[r][1] = _mm512_setzero_ps();
    for (int64_t b = g * BPG; b < (g + 1) * BPG; ++b) {
      __m512i ia[R][2];
      for (int r = 0; r < R; ++r) ia[r][0] = ia[r][1] = _mm512_setzero_si512();
      const uint8_t* pw = panel + b * 8 * NR * 4;
      const int8_t* xb = xq + b * 32;
      for (int kq = 0; kq < 8; ++kq) {
        const __m512i w0 = _mm512_loadu_si512((const void*)(pw + kq * NR * 4));
        const __m512i w1 = _mm512_loadu_si512((const void*)(pw + kq * NR * 4 + 64));
        for (int r = 0; r < R; ++r) {
          int32_t xv;
          std::memcpy(&xv, xb + r * Kp + kq * 4, 4);
          const __m512i xb4 = _mm512_set1_epi32(xv);
          ia[r][0] = _mm512_dpbusd_epi32(ia[r][0], w0, xb4);
          ia[r][1] = _mm512_dpbusd_epi32(ia[r][1], w1, xb4);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_set1_ps(sx[r * NB + b]);
        gacc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r][0]), s, gacc[r][0]);
        gacc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r][1]), s, gacc[r][1]);
      }
    }
    for (int j = 0; j < 2; ++j) {
      const __m512 sw = _mm512_loadu_ps(psw + g * NR + j * 16);
      for (int r = 0; r < R; ++r) {
        const __m512 c = _mm512_set1_ps(mid * corr[r * G + g]);
        acc[r][j] = _mm512_fmadd_ps(_mm512_sub_ps(gacc[r][j], c), sw, acc[r][j]);
        if (ZERO) acc[r][j] = _mm512_fmadd_ps(_mm512_loadu_ps(pzw + g * NR + j * 16), _mm512_set1_ps(sumx[r * G + g]), acc[r][j]);
      }
    }
  }
  const __mmask16 k0 = (__mmask16)(ncols >= 16 ? 0xFFFF : (1u << ncols) - 1);
  const __mmask16 k1 = (__mmask16)(ncols >= 32 ? 0xFFFF : ncols > 16 ? (1u << (ncols - 16)) - 1 : 0);
  const __m512 b0 = pb ? _mm512_loadu_ps(pb) : _mm512_setzero_ps(), b1 = pb ? _mm512_loadu_ps(pb + 16) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {  // y + bias in fp32, then rounded to the output dtype (QuantLinear's order)
    store16(y + r * ldy, k0, _mm512_add_ps(acc[r][0], b0));
    store16(y + r * ldy + 16, k1, _mm512_add_ps(acc[r][1], b1));
  }
}

template <bool ZERO, typename TO>
LEANLM_VNNI static void rows(int64_t R, const uint8_t* panel, const float* psw, const float* pzw, const float* pb,
                             const Acts& a, int64_t m, int64_t Kp, int64_t NB, int64_t G, int64_t BPG, float mid, TO* y,
                             int64_t N, int64_t n0) {
  const int8_t* xq = a.q.data() + m * Kp;
  const float *sx = a.sx.data() + m * NB, *corr = a.corr.data() + m * G;
  const float* sumx = ZERO ? a.sumx.data() + m * G : nullptr;
  TO* yp = y + m * N + n0;
  const int64_t nc = std::min<int64_t>(NR, N - n0);
  switch (R) {
    case 4: micro<4, ZERO, TO>(panel, psw, pzw, xq, Kp, sx, NB, corr, sumx, G, BPG, mid, pb, yp, N, nc); break;
    case 3: micro<3, ZERO, TO>(panel, psw, pzw, xq, Kp, sx, NB, corr, sumx, G, BPG, mid, pb, yp, N, nc); break;
    case 2: micro<2, ZERO, TO>(panel, psw, pzw, xq, Kp, sx, NB, corr, sumx, G, BPG, mid, pb, yp, N, nc); break;
    default: micro<1, ZERO, TO>(panel, psw, pzw, xq, Kp, sx, NB, corr, sumx, G, BPG, mid, pb, yp, N, nc); break;
  }
}

template <int BITS, typename TI, typename TO>
LEANLM_VNNI static void run(const TI* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* sp,
                            const uint16_t* zp, const float* bias, int64_t N, int64_t G, int64_t BPG, TO* y) {
  const int64_t NB = G * BPG, Kp = NB * 32;
  Acts a;
  a.q.resize(M * Kp);
  a.sx.resize(M * NB);
  a.corr.resize(M * G);
  if (zp) a.sumx.resize(M * G);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) { quantize_rows(x, K, Kp, NB, G, BPG, zp != nullptr, a, m0, m1); });
  const float mid = BITS == 4 ? 8.f : 128.f;
  const int64_t panels = (N + NR - 1) / NR;
  // panels are handed out one at a time from a shared counter, not split in equal halves: on a busy machine a
  // thread that lost its core does not hold up the others with half the work
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<uint8_t> panel(Kp * NR);
    std::vector<float> psw(G * NR), pzw(G * NR), pb(NR, 0.f);
    for (int64_t p = next++; p < panels; p = next++) {
      const int64_t n0 = p * NR;
      pack_panel<BITS>(w, sp, zp, N, Kp, G, n0, panel.data(), psw.data(), pzw.data());
      if (bias)
        for (int64_t j = 0; j < NR; ++j) pb[j] = n0 + j < N ? bias[n0 + j] : 0.f;
      const float* pbp = bias ? pb.data() : nullptr;
      for (int64_t m = 0; m < M; m += MR) {
        const int64_t R = std::min<int64_t>(MR, M - m);
        if (zp) rows<true>(R, panel.data(), psw.data(), pzw.data(), pbp, a, m, Kp, NB, G, BPG, mid, y, N, n0);
        else rows<false>(R, panel.data(), psw.data(), pzw.data(), pbp, a, m, Kp, NB, G, BPG, mid, y, N, n0);
      }
    }
  });
}

}  // namespace gemm_int8

// does this CPU run the kernel (AVX512F/BW/VL + VNNI)?
static bool q_gemm_supported() { return cpu_has_avx512_vnni(); }

template <int BITS>
static void dispatch(const Tensor& x, const uint8_t* w, const uint16_t* sp, const uint16_t* zp, const float* bias,
                     int64_t N, int64_t G, int64_t BPG, Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1);
  if (x.scalar_type() == at::kBFloat16)
    gemm_int8::run<BITS>(x.data_ptr<c10::BFloat16>(), M, K, w, sp, zp, bias, N, G, BPG, y.data_ptr<c10::BFloat16>());
  else
    gemm_int8::run<BITS>(x.data_ptr<float>(), M, K, w, sp, zp, bias, N, G, BPG, y.data_ptr<float>());
}

// x [M, K] (fp32 or bf16) times a packed int4 / int8 weight (qlinear.cpp's layout), + an fp32 bias when given ->
// [M, N] in x's dtype (fp32 sums, rounded once)
torch::Tensor q_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor zeros, torch::Tensor bias,
                     int64_t bits, int64_t group) {
  TORCH_CHECK(q_gemm_supported(), "q_gemm: this CPU lacks AVX512-VNNI");
  TORCH_CHECK(x.dim() == 2 && scales.dim() == 2 && group % 32 == 0 && group > 0, "q_gemm: bad shapes");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(), "q_gemm: scales must be bf16");
  TORCH_CHECK(w.is_contiguous() && (bits == 4 || bits == 8), "q_gemm: bad weight");
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(0), G = scales.size(1);
  const int64_t BPG = group / 32, Kp = G * group;
  TORCH_CHECK(K <= Kp, "q_gemm: K <= padded K");
  TORCH_CHECK(w.numel() == (N + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS * (bits == 4 ? Kp / 2 : Kp),
              "q_gemm: weight size does not match the scales (qlinear.cpp's tiles of 16 rows)");
  const bool has_zero = zeros.numel() > 0, has_bias = bias.numel() > 0;
  if (has_zero) TORCH_CHECK(zeros.scalar_type() == at::kBFloat16 && zeros.is_contiguous() && zeros.numel() == N * G);
  if (has_bias) TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == N, "q_gemm: fp32 bias [N]");
  auto xc = (x.scalar_type() == at::kBFloat16 ? x : x.to(at::kFloat)).contiguous();
  auto y = torch::empty({M, N}, xc.options());
  if (M == 0) return y;
  const uint16_t* sp = (const uint16_t*)scales.data_ptr<at::BFloat16>();
  const uint16_t* zp = has_zero ? (const uint16_t*)zeros.data_ptr<at::BFloat16>() : nullptr;
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  const uint8_t* wp = (const uint8_t*)w.data_ptr();
  if (bits == 4) dispatch<4>(xc, wp, sp, zp, bp, N, G, BPG, y);
  else dispatch<8>(xc, wp, sp, zp, bp, N, G, BPG, y);
  return y;
}
