#include "leanlm.h"

// Small-row products (gemv_small): y [M <= 16, N] = x [M, K] . w [N, K]^T, w row-major fp32 or bf16
// Why: at decode and speculative verification the weights stream from memory once per forward.
// ATen's fp32 GEMV runs on one thread here (MKL), its 2..16-row products repack the weight, and
// bf16 products have no native kernel (they scale with the rows). This streams each weight row
// once and accumulates all M dot products from it (v(k) measured in results/speculative.json).
template <typename W> static inline __m256 sk_load(const W* p);
template <> inline __m256 sk_load<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 sk_load<uint16_t>(const uint16_t* p) { return bf16x8(p); }  // bf16 -> fp32: a shift
static inline float sk_f(float v) { return v; }
static inline float sk_f(uint16_t v) { return bf16f(v); }

// Every output is a sum of its 8-wide chunk products in two chains (chunk i goes to chain i % 2,
// which hides the FMA latency at one row), combined in a fixed order: a row's result does not depend
// on how many rows share the call, so a k-token verification forward reproduces k one-token decode
// steps bit for bit (speculative decoding stays exact in bf16, where one rounding step apart flips
// near-tied greedy choices). One weight row streams at a time (several rows at once defeat the
// hardware prefetcher here) and feeds up to 4 activation rows per pass; further passes over the
// same block of 8 weight rows find it in L1 and take 2-4 weight rows at once (more independent
// chains). PF prefetches 4 rows ahead: it helps multi-row products, but a one-row GEMV streams faster
// without it, bf16 as fp32 (the hardware prefetcher follows one stream; the software prefetches only add
// instructions and compete for the line-fill buffers): bf16 decode got clearly faster on an AVX-512 EPYC.
// bench_speculative.py's v(k) (results/speculative*.json) measures the end-to-end effect.
template <typename W, int R>
static inline void sk_tile(const W* w, const float* x, float* y, int64_t K, int64_t N, int64_t n, int64_t m) {
  const int64_t K8 = K & ~int64_t(7), K16 = K & ~int64_t(15);
  const float* xm = x + m * K;
  const W* wr = w + n * K;
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k < K16; k += 16) {
    const __m256 w0 = sk_load<W>(wr + k), w1 = sk_load<W>(wr + k + 8);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + r * K + k), a0[r]);
      a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + r * K + k + 8), a1[r]);
    }
  }
  if (k < K8) {
    const __m256 w0 = sk_load<W>(wr + k);
    for (int r = 0; r < R; ++r) a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + r * K + k), a0[r]);
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum8(_mm256_add_ps(a0[r], a1[r]));
    for (int64_t j = K8; j < K; ++j) s += sk_f(wr[j]) * xm[r * K + j];
    y[(m + r) * N + n] = s;
  }
}

// The same sums (same chains, same order) for C weight rows at once: more independent chains.
// (sk_tile is its C = 1 case written out: folded into this template it compiled to a slower fp32
// loop and a faster bf16 one at 2-7 rows in an A/B run, so the benchmarked form stays.)
template <typename W, int R, int C>
static inline void sk_tile_c(const W* w, const float* x, float* y, int64_t K, int64_t N, int64_t n, int64_t m) {
  const int64_t K8 = K & ~int64_t(7), K16 = K & ~int64_t(15);
  const float* xm = x + m * K;
  const W* wr = w + n * K;
  __m256 a0[C][R], a1[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) a0[c][r] = a1[c][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k < K16; k += 16)
    for (int c = 0; c < C; ++c) {
      const __m256 w0 = sk_load<W>(wr + c * K + k), w1 = sk_load<W>(wr + c * K + k + 8);
      for (int r = 0; r < R; ++r) {
        a0[c][r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + r * K + k), a0[c][r]);
        a1[c][r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + r * K + k + 8), a1[c][r]);
      }
    }
  if (k < K8)
    for (int c = 0; c < C; ++c) {
      const __m256 w0 = sk_load<W>(wr + c * K + k);
      for (int r = 0; r < R; ++r) a0[c][r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + r * K + k), a0[c][r]);
    }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) {
      float s = hsum8(_mm256_add_ps(a0[c][r], a1[c][r]));
      for (int64_t j = K8; j < K; ++j) s += sk_f(wr[c * K + j]) * xm[r * K + j];
      y[(m + r) * N + n + c] = s;
    }
}

// One pass of R activation rows over weight rows [nb, ne). The first pass over a block streams
// it from memory one row at a time (PF: prefetch ahead); later passes find it in L1/L2 and take
// C rows at once, so that a pass of 1-3 rows still has 8-12 independent FMA chains (with one
// weight row, 2R chains leave the FMA units idle on latency: a fifth row cost half a step).
template <typename W, int R, int PF>
static inline void sk_pass(const W* w, const float* x, float* y, int64_t K, int64_t N, int64_t nb, int64_t ne, int64_t m) {
  for (int64_t n = nb; n < ne; ++n) {
    if (PF > 0 && n + PF < N) {
      const char* ahead = (const char*)(w + (n + PF) * K);
      for (int64_t off = 0; off < K * (int64_t)sizeof(W); off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
    }
    sk_tile<W, R>(w, x, y, K, N, n, m);
  }
}

template <typename W, int R, int C>
static inline void sk_pass_c(const W* w, const float* x, float* y, int64_t K, int64_t N, int64_t nb, int64_t ne, int64_t m) {
  int64_t n = nb;
  for (; n + C <= ne; n += C) sk_tile_c<W, R, C>(w, x, y, K, N, n, m);
  for (; n < ne; ++n) sk_tile<W, R>(w, x, y, K, N, n, m);
}

template <typename W, int PF>
static void sk_rows(int64_t M, const W* w, const float* x, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t nb = n0; nb < n1; nb += 8) {
    const int64_t ne = std::min(nb + 8, n1);
    const int64_t first = std::min<int64_t>(M, 4);
    if (first == 4) sk_pass<W, 4, PF>(w, x, y, K, N, nb, ne, 0);
    else if (first == 3) sk_pass<W, 3, PF>(w, x, y, K, N, nb, ne, 0);
    else if (first == 2) sk_pass<W, 2, PF>(w, x, y, K, N, nb, ne, 0);
    else sk_pass<W, 1, PF>(w, x, y, K, N, nb, ne, 0);
    int64_t m = first;
    for (; M - m >= 4; m += 4) sk_pass<W, 4, PF>(w, x, y, K, N, nb, ne, m);
    if (M - m == 3) sk_pass_c<W, 3, 2>(w, x, y, K, N, nb, ne, m);
    else if (M - m == 2) sk_pass_c<W, 2, 2>(w, x, y, K, N, nb, ne, m);
    else if (M - m == 1) sk_pass_c<W, 1, 4>(w, x, y, K, N, nb, ne, m);
  }
}

// bf16 activations x bf16 weights on `vdpbf16ps` (AVX512-BF16): 32 products per instruction with fp32
// accumulation, so the weights stream at memory speed with a quarter of the widening path's instructions (that
// path converts every weight to fp32 first). Used where both operands are bf16 (a bf16 model's decode): the
// products of two bf16 are exact in fp32, so the sums differ from the widening path only in order and in
// flushing denormals. Each row's sums run in one fixed order whatever the number of rows (two chains over
// alternate 32-column chunks, then their sum, then a fixed-order reduction), so a k-row call equals k one-row
// calls bit for bit, as speculative verification needs. C weight rows (1-4) share each activation load.
namespace gemv_bf16 {

LEANLM_BF16 static inline __m512bh load32(const uint16_t* p, int64_t left) {
  if (left >= 32) return (__m512bh)_mm512_loadu_si512((const void*)p);
  return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << left) - 1), p);  // zeros past K add nothing
}

template <int R, int C>
LEANLM_BF16 static void tile(const uint16_t* w, const uint16_t* x, float* y, int64_t K, int64_t N, int64_t n, int64_t m) {
  __m512 acc[C][R][2];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r][0] = acc[c][r][1] = _mm512_setzero_ps();
  int64_t k = 0, j = 0;
  for (; k < K; k += 32, j ^= 1) {
    __m512bh xv[R];
    for (int r = 0; r < R; ++r) xv[r] = load32(x + (m + r) * K + k, K - k);
    for (int c = 0; c < C; ++c) {
      const __m512bh wv = load32(w + (n + c) * K + k, K - k);
      for (int r = 0; r < R; ++r) acc[c][r][j] = _mm512_dpbf16_ps(acc[c][r][j], wv, xv[r]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) y[(m + r) * N + n + c] = _mm512_reduce_add_ps(_mm512_add_ps(acc[c][r][0], acc[c][r][1]));
}

// rows [n0, n1) against R activation rows from m: C weight rows at a time (more independent chains at few rows)
template <int R, int C>
LEANLM_BF16 static void pass(const uint16_t* w, const uint16_t* x, float* y, int64_t K, int64_t N, int64_t n0,
                             int64_t n1, int64_t m) {
  int64_t n = n0;
  for (; n + C <= n1; n += C) tile<R, C>(w, x, y, K, N, n, m);
  for (; n < n1; ++n) tile<R, 1>(w, x, y, K, N, n, m);
}

LEANLM_BF16 static void rows(int64_t M, const uint16_t* w, const uint16_t* x, float* y, int64_t K, int64_t N,
                             int64_t n0, int64_t n1) {
  for (int64_t nb = n0; nb < n1; nb += 16) {  // a block of weight rows stays in L1/L2 for the passes after the first
    const int64_t ne = std::min(nb + 16, n1);
    int64_t m = 0;
    for (; M - m >= 4; m += 4) pass<4, 1>(w, x, y, K, N, nb, ne, m);
    if (M - m == 3) pass<3, 1>(w, x, y, K, N, nb, ne, m);
    else if (M - m == 2) pass<2, 2>(w, x, y, K, N, nb, ne, m);
    else if (M - m == 1) pass<1, 4>(w, x, y, K, N, nb, ne, m);
  }
}

}  // namespace gemv_bf16

// Off by default: on Qwen2.5-0.5B bf16 decode it ran at 0.87x the widening path, same run (AVX-512 EPYC;
// benchmarks/results/archive/2026-12-07/bf16_dot_ab.json): vdpbf16ps's chains do not hide the extra shuffles at
// batch 1. set_small_bf16(true) turns it on (A/B runs; tests keep it correct).
static bool small_bf16_allowed = false;
static bool small_bf16_dot() {
  static const bool cpu = cpu_has_avx512_bf16();
  return cpu && small_bf16_allowed;
}
static bool set_small_bf16(bool allowed) {
  const bool before = small_bf16_allowed;
  small_bf16_allowed = allowed;
  return before;
}

static bool small_ok(const Tensor& x, const Tensor& w) {
  return x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 16 && w.dim() == 2 && w.is_contiguous() && w.device().is_cpu() &&
         (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) && x.size(1) == w.size(1);
}

// x [M <= 16, K] (fp32/bf16) times w [N, K] row-major (fp32/bf16) + b: fp32 accumulation, result
// rounded to x's dtype (as F.linear rounds a bf16 product)
Tensor small_linear(Tensor x, Tensor w, std::optional<Tensor> b) {
  TORCH_CHECK(small_ok(x, w), "small_linear: x [1..16, K], w contiguous [N, K] fp32/bf16 on CPU");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && small_bf16_dot()) {
    Tensor xc = x.contiguous();
    const uint16_t* xp = (const uint16_t*)xc.data_ptr<at::BFloat16>();
    const uint16_t* wp = (const uint16_t*)w.data_ptr<at::BFloat16>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { gemv_bf16::rows(M, wp, xp, yp, K, N, n0, n1); });
    if (b) y.add_(*b);
    return y.to(x.scalar_type());
  }
  Tensor xf = as_float(x);
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const void* wp = w.data_ptr();
  const bool bf = w.scalar_type() == at::kBFloat16;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    if (bf && M == 1) sk_rows<uint16_t, 0>(M, (const uint16_t*)wp, xp, yp, K, N, n0, n1);  // see PF above
    else if (bf) sk_rows<uint16_t, 4>(M, (const uint16_t*)wp, xp, yp, K, N, n0, n1);
    else if (M == 1) sk_rows<float, 0>(M, (const float*)wp, xp, yp, K, N, n0, n1);
    else sk_rows<float, 4>(M, (const float*)wp, xp, yp, K, N, n0, n1);
  });
  if (b) y.add_(*b);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// runtime.Linear's rule: multi-row bf16 products run widened to fp32 on CPU (much faster there)
static Tensor project(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  if (small_ok(x, w)) return small_linear(x, w, b);
  if (x.scalar_type() != at::kFloat && x.size(0) > 4) {
    std::optional<Tensor> bf = b ? std::optional<Tensor>(b->to(at::kFloat)) : std::nullopt;
    return at::linear(x.to(at::kFloat), w.to(at::kFloat), bf).to(x.scalar_type());
  }
  return at::linear(x, w, b);
}
