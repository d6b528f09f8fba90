"""Fused decode step (1 to 16 new tokens): a block in one C++ call instead of ~55 torch ops.

Why: at batch-1 decode the GEMVs of SmolLM2-135M take ~20 ms per token at 2 threads in bf16,
but the Python block dispatches ~1,650 small ops per token around them (norms, RoPE, the cache
write, casts, residual adds), each costing microseconds on this CPU, and none of that shrinks
with more threads. Here the glue between the GEMVs is C++ over one row: RMSNorm, the residual
add fused with the next norm, (QK-norm +) RoPE + KV write + attention, and the gated activation.
When the block's four linears are plain dense weights, leanlm.quant's packed int8/int4 weights
(q_linear) or leanlm.adaptive's input-sparse products (sparse_rows), all compiled into this
extension, the whole block is one call; otherwise the same C++ glue runs between the linear
modules, so whatever a method put there (pruned, routed, hooked) keeps working at a few calls
per block.

The products and the attention are leanlm's own AVX2 loops (`small_linear`, attend), not ATen:
- ATen's fp32 GEMV runs on one thread here, its 2..16-row products repack the weight, and its
  bf16 products have no native kernel (they scale with the rows). `small_linear` streams each
  weight row once for all rows: benchmarks/bench_speculative.py's v(k) (results/speculative.json)
  has a SmolLM2 bf16 step at 22.4 vs 36.2 ms with ATen, and a 4-token forward at 1.57x one token
  vs 3.36x (1 thread).
- Both are batch-invariant: each row's result is computed in the same order whatever the number
  of rows, so a k-token speculative verification reproduces k one-token steps bit for bit
  (tests/test_fused_decode.py). ATen's SDPA and GEMMs are not (their blocking depends on the
  shape), which flipped near-tied greedy choices in bf16.

Forwards of up to MAX_ROWS new tokens take this path (decode, and speculative verification of
drafted tokens); longer prefills stay in Python, where ATen's big GEMMs win.

Numerics follow the Python path (runtime.Block): fp32 residual stream and norm math, every
intermediate rounded to the compute dtype where the Python path rounds it, so the two agree
to float rounding (tests/test_fused_decode.py). A block runs here when it is the stock Block
on CPU in fp32/bf16; a cache policy or a replaced attention/MLP runs its own forward inside
it. It is the runtime's default decode step (`Transformer.fused_decode`); LEANLM_NATIVE=0 or a
machine without a C++ compiler keeps the Python path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..native import build
from . import runtime as _rt  # runtime imports this module first; its classes are looked up at call time

MAX_ROWS = 16  # new positions per forward taken here: decode, and speculative verification of k <= 15 drafts

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <cmath>
#include <optional>
#include <vector>

using at::Tensor;

template <typename T> static inline T rnd(float v) { return static_cast<T>(v); }  // round to T (RNE for bf16)
template <typename T> static inline float f(T v) { return static_cast<float>(v); }

// out = T( (h * rsqrt(mean(h^2) + eps)) * w ), in transformers' order; h already fp32
template <typename T>
static void norm_row(const float* h, const float* w, int64_t D, float eps, bool plus_one, T* out) {
  float ss = 0.f;
  for (int64_t d = 0; d < D; ++d) ss += h[d] * h[d];
  const float r = 1.0f / std::sqrt(ss / (float)D + eps);
  for (int64_t d = 0; d < D; ++d) out[d] = rnd<T>((h[d] * r) * (plus_one ? 1.0f + w[d] : w[d]));
}

static Tensor as_float(const Tensor& t) { return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous(); }

// ---- small-row products: y [M <= 16, N] = x [M, K] . w [N, K]^T, w row-major fp32 or bf16 ----
// Why: at decode and speculative verification the weights stream from memory once per forward.
// ATen's fp32 GEMV runs on one thread here (MKL), its 2..16-row products repack the weight, and
// bf16 products have no native kernel (they scale with the rows). This streams each weight row
// once and accumulates all M dot products from it (v(k) measured in results/speculative.json).
// (hsum8 and bf16f come from quant/native.py's source, compiled ahead of this one)
template <typename W> static inline __m256 sk_load(const W* p);
template <> inline __m256 sk_load<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 sk_load<uint16_t>(const uint16_t* p) {  // bf16 -> fp32 is a 16-bit shift
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline float sk_f(float v) { return v; }
static inline float sk_f(uint16_t v) { return bf16f(v); }

// Every output is a sum of its 8-wide chunk products in two chains (chunk i goes to chain i % 2,
// which hides the FMA latency at one row), combined in a fixed order: a row's result does not depend
// on how many rows share the call, so a k-token verification forward reproduces k one-token decode
// steps bit for bit (speculative decoding stays exact in bf16, where one rounding step apart flips
// near-tied greedy choices). One weight row streams at a time (several rows at once defeat the
// hardware prefetcher here) and feeds up to 4 activation rows per pass; further passes over the
// same block of 8 weight rows find it in L1 and take 2-4 weight rows at once (more independent
// chains). PF prefetches 4 rows ahead (helps bf16 and multi-row fp32, not the fp32 GEMV).
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

static bool small_ok(const Tensor& x, const Tensor& w) {
  return x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 16 && w.dim() == 2 && w.is_contiguous() && w.device().is_cpu() &&
         (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) && x.size(1) == w.size(1);
}

// x [M <= 16, K] (fp32/bf16) times w [N, K] row-major (fp32/bf16) + b: fp32 accumulation, result
// rounded to x's dtype (as F.linear rounds a bf16 product)
Tensor small_linear(Tensor x, Tensor w, std::optional<Tensor> b) {
  TORCH_CHECK(small_ok(x, w), "small_linear: x [1..16, K], w contiguous [N, K] fp32/bf16 on CPU");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  Tensor xf = as_float(x);
  Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const void* wp = w.data_ptr();
  const bool bf = w.scalar_type() == at::kBFloat16;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    if (bf) sk_rows<uint16_t, 4>(M, (const uint16_t*)wp, xp, yp, K, N, n0, n1);
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

// x[b] (fp32) += h[b], after the optional sandwich norm of h (rounded to T, as the Python path does)
template <typename T>
static void add_residual(Tensor& x, const Tensor& h, const std::optional<Tensor>& post, float eps, bool plus_one) {
  const int64_t B = x.size(0), D = x.size(1);
  float* xp = x.data_ptr<float>();
  const T* hp = h.data_ptr<T>();
  std::vector<float> hf(D);
  std::vector<T> hn(D);
  Tensor pw = post ? as_float(*post) : Tensor();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t d = 0; d < D; ++d) hf[d] = f(hp[b * D + d]);
    if (post) {
      norm_row<T>(hf.data(), pw.data_ptr<float>(), D, eps, plus_one, hn.data());
      for (int64_t d = 0; d < D; ++d) xp[b * D + d] += f(hn[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) xp[b * D + d] += hf[d];
    }
  }
}

template <typename T>
static Tensor normed(const Tensor& x, const Tensor& w, float eps, bool plus_one, at::ScalarType dt) {
  const int64_t B = x.size(0), D = x.size(1);
  Tensor out = at::empty({B, D}, x.options().dtype(dt));
  Tensor wf = as_float(w);
  for (int64_t b = 0; b < B; ++b)
    norm_row<T>(x.data_ptr<float>() + b * D, wf.data_ptr<float>(), D, eps, plus_one, out.data_ptr<T>() + b * D);
  return out;
}

// q . k over one head (fp32 accumulate) and acc += p * v, for fp32 or bf16 rows
static inline float dot_row(const float* a, const float* b, int64_t n) {
  __m256 s = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s);
  float r = hsum8(s);
  for (; d < n; ++d) r += a[d] * b[d];
  return r;
}
static inline float dot_row(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n) {
  const uint16_t *pa = (const uint16_t*)a, *pb = (const uint16_t*)b;
  __m256 s = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) s = _mm256_fmadd_ps(sk_load<uint16_t>(pa + d), sk_load<uint16_t>(pb + d), s);
  float r = hsum8(s);
  for (; d < n; ++d) r += sk_f(pa[d]) * sk_f(pb[d]);
  return r;
}
static inline void axpy_row(float p, const float* v, float* acc, int64_t n) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + d), _mm256_loadu_ps(acc + d)));
  for (; d < n; ++d) acc[d] += p * v[d];
}
static inline void axpy_row(float p, const c10::BFloat16* v, float* acc, int64_t n) {
  const uint16_t* pv16 = (const uint16_t*)v;
  const __m256 pv = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, sk_load<uint16_t>(pv16 + d), _mm256_loadu_ps(acc + d)));
  for (; d < n; ++d) acc[d] += p * sk_f(pv16[d]);
}

template <typename T>
static Tensor attend_impl(const Tensor& qkv_in, const std::optional<Tensor>& q_norm, const std::optional<Tensor>& k_norm,
                          Tensor cache_k, Tensor cache_v, const Tensor& cos, const Tensor& sin, int64_t pos,
                          int64_t nh, int64_t nkv, int64_t window, float eps, bool plus_one, double scale) {
  Tensor qkv = qkv_in.contiguous();  // [B, T, (nh + 2 nkv) * hd] for positions pos .. pos+T-1
  const int64_t B = qkv.size(0), Tn = qkv.size(1), hd = cache_k.size(3), L = cache_k.size(2), half = hd / 2;
  Tensor q = at::empty({B, nh, Tn, hd}, qkv.options());
  const T* qkvp = qkv.data_ptr<T>();
  T* qp = q.data_ptr<T>();
  T* kc = cache_k.data_ptr<T>();
  T* vc = cache_v.data_ptr<T>();
  Tensor qnw = q_norm ? as_float(*q_norm) : Tensor(), knw = k_norm ? as_float(*k_norm) : Tensor();
  std::vector<float> v(hd);
  std::vector<T> vn(hd);
  const int64_t row = (nh + 2 * nkv) * hd;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < Tn; ++t) {
      const T* cp = cos.data_ptr<T>() + t * hd;
      const T* sp = sin.data_ptr<T>() + t * hd;
      const T* src_row = qkvp + (b * Tn + t) * row;
      for (int64_t h = 0; h < nh + nkv; ++h) {
        const T* src = src_row + h * hd;
        for (int64_t d = 0; d < hd; ++d) v[d] = f(src[d]);
        if (q_norm) {  // Gemma: per-head RMSNorm of q and k before RoPE, rounded to T
          norm_row<T>(v.data(), (h < nh ? qnw : knw).data_ptr<float>(), hd, eps, plus_one, vn.data());
          for (int64_t d = 0; d < hd; ++d) v[d] = f(vn[d]);
        }
        T* dst = h < nh ? qp + ((b * nh + h) * Tn + t) * hd : kc + ((b * nkv + (h - nh)) * L + pos + t) * hd;
        for (int64_t d = 0; d < hd; ++d) {  // x*cos + rotate_half(x)*sin (sign folded into sin)
          const float sw = v[d < half ? d + half : d - half];
          dst[d] = rnd<T>(f(rnd<T>(v[d] * f(cp[d]))) + sw * f(sp[d]));
        }
      }
      for (int64_t h = 0; h < nkv; ++h) {
        const T* src = src_row + (nh + nkv + h) * hd;
        std::copy(src, src + hd, vc + ((b * nkv + h) * L + pos + t) * hd);
      }
    }
  // attention per (row, head, new position) over its own keys: query pos+t sees cached positions
  // [lo, pos+t] (lo > 0 outside a sliding window). Each query's result is computed the same way
  // whatever Tn is, so a k-token verification forward equals k one-token steps bit for bit.
  Tensor out = at::empty({B * Tn, nh * hd}, qkv.options());
  T* op = out.data_ptr<T>();
  const int64_t group = nh / nkv;
  const float sc = (float)scale;
  at::parallel_for(0, B * nh * Tn, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(pos + Tn), acc(hd);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (nh * Tn), h = (i / Tn) % nh, t = i % Tn, qpos = pos + t;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, qpos - window + 1) : 0;
      const T* qr = qp + ((b * nh + h) * Tn + t) * hd;
      const T* kb = kc + (b * nkv + h / group) * L * hd;
      const T* vb = vc + (b * nkv + h / group) * L * hd;
      float mx = -INFINITY;
      for (int64_t j = lo; j <= qpos; ++j) {
        p[j] = dot_row(qr, kb + j * hd, hd) * sc;
        mx = std::max(mx, p[j]);
      }
      float sum = 0.f;
      for (int64_t j = lo; j <= qpos; ++j) { p[j] = std::exp(p[j] - mx); sum += p[j]; }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = lo; j <= qpos; ++j) axpy_row(p[j], vb + j * hd, acc.data(), hd);
      T* o = op + (b * Tn + t) * nh * hd + h * hd;
      const float inv = 1.f / sum;
      for (int64_t d = 0; d < hd; ++d) o[d] = rnd<T>(acc[d] * inv);
    }
  });
  return out;
}

template <typename T>
static Tensor glu_impl(const Tensor& gu_in, bool gelu) {
  Tensor gu = gu_in.contiguous();
  const int64_t B = gu.size(0), F = gu.size(1) / 2;
  Tensor a = at::empty({B, F}, gu.options());
  const T* gp = gu.data_ptr<T>();
  T* ap = a.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < F; ++j) {
      const float g = f(gp[b * 2 * F + j]), u = f(gp[b * 2 * F + F + j]);
      const float act = gelu ? 0.5f * g * (1.0f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)))
                             : g / (1.0f + std::exp(-g));
      ap[b * F + j] = rnd<T>(f(rnd<T>(act)) * u);  // act(gate) rounded, then * up rounded: as torch does
    }
  return a;
}

// RMSNorm of the fp32 residual rows x [B, D], written in bf16 or fp32
Tensor rms_norm(Tensor x, Tensor w, double eps, bool plus_one, bool bf16) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [B, D]");
  return bf16 ? normed<c10::BFloat16>(x, w, (float)eps, plus_one, at::kBFloat16)
              : normed<float>(x, w, (float)eps, plus_one, at::kFloat);
}

// x += post_norm(h) (or h) in place; then the next RMSNorm of x when next_w is given (else an empty tensor)
Tensor residual_norm(Tensor x, Tensor h, std::optional<Tensor> post, std::optional<Tensor> next_w, double eps,
                     bool plus_one) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [B, D]");
  Tensor hc = h.contiguous().view({x.size(0), x.size(1)});
  const bool bf16 = hc.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || hc.scalar_type() == at::kFloat, "h: fp32 or bf16");
  if (bf16) add_residual<c10::BFloat16>(x, hc, post, (float)eps, plus_one);
  else add_residual<float>(x, hc, post, (float)eps, plus_one);
  if (!next_w) return Tensor();
  return rms_norm(x, *next_w, eps, plus_one, bf16);
}

// T new positions pos..pos+T-1: (QK-norm) + RoPE of q and k, K/V written to the cache, attention over
// the cache (causal, windowed when window > 0); qkv [B, T, (nh+2nkv)*hd] -> [B*T, nh*hd]
Tensor attend(Tensor qkv, std::optional<Tensor> q_norm, std::optional<Tensor> k_norm, Tensor cache_k, Tensor cache_v,
              Tensor cos, Tensor sin, int64_t pos, int64_t nh, int64_t nkv, int64_t window, double eps, bool plus_one,
              double scale) {
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous(), "cache");
  TORCH_CHECK(qkv.scalar_type() == cache_k.scalar_type() && cos.scalar_type() == cache_k.scalar_type(), "dtypes");
  const bool bf16 = qkv.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || qkv.scalar_type() == at::kFloat, "fp32 or bf16");
  TORCH_CHECK(qkv.dim() == 3 && pos + qkv.size(1) <= cache_k.size(2), "qkv [B, T, row] within the cache");
  Tensor c = cos.contiguous(), s = sin.contiguous();
  return bf16 ? attend_impl<c10::BFloat16>(qkv, q_norm, k_norm, cache_k, cache_v, c, s, pos, nh, nkv, window, (float)eps, plus_one, scale)
              : attend_impl<float>(qkv, q_norm, k_norm, cache_k, cache_v, c, s, pos, nh, nkv, window, (float)eps, plus_one, scale);
}

// act(gate) * up of the fused gate/up output [B, 2F] -> [B, F] (SiLU, or GELU-tanh for Gemma)
Tensor glu(Tensor gu, bool gelu) {
  if (gu.scalar_type() == at::kBFloat16) return glu_impl<c10::BFloat16>(gu, gelu);
  TORCH_CHECK(gu.scalar_type() == at::kFloat, "fp32 or bf16");
  return glu_impl<float>(gu, gelu);
}

// one linear of the block: L = {weight, bias, scales, zeros} (empty tensors where absent); bits 0 is
// a dense fp32/bf16 weight, 4/8 leanlm.quant's packed weight through q_linear (quant/native.py),
// with QuantLinear.forward's numerics: fp32 product, + fp32 bias, rounded to x's dtype
static Tensor lin_forward(const Tensor& x, const std::vector<Tensor>& lins, int64_t i, const std::vector<int64_t>& meta) {
  const Tensor &w = lins[4 * i], &b = lins[4 * i + 1];
  const int64_t bits = meta[2 * i], group = meta[2 * i + 1];
  std::optional<Tensor> bias = b.numel() ? std::optional<Tensor>(b) : std::nullopt;
  if (bits == 0) return project(x, w, bias);
  if (bits < 0) {  // input-sparse (leanlm.adaptive's SparseInputLinear): w is W^T [K, N], threshold in slot 2
    Tensor y = at::empty({x.size(0), w.size(1)}, x.options().dtype(at::kFloat));
    sparse_rows(x, w, lins[4 * i + 2].item<double>(), y.data_ptr<float>());
    if (bias) y.add_(*bias);
    return y.to(x.scalar_type());
  }
  Tensor y = q_linear(x, w, lins[4 * i + 2], lins[4 * i + 3], bits, group);
  if (bias) y.add_(*bias);
  return y.to(x.scalar_type());
}

// the whole block in one call when its four linears are dense or packed-quantized; x [B*T, D];
// lins/meta: wqkv, wo, w_gate_up, w_down as lin_forward takes them
Tensor decode_layer(Tensor x, Tensor attn_norm, std::vector<Tensor> lins, std::vector<int64_t> meta,
                    std::optional<Tensor> q_norm, std::optional<Tensor> k_norm, std::optional<Tensor> attn_post,
                    Tensor mlp_norm, std::optional<Tensor> mlp_post,
                    Tensor cache_k, Tensor cache_v, Tensor cos, Tensor sin, int64_t pos, int64_t batch, int64_t nh,
                    int64_t nkv, int64_t window, double eps, bool plus_one, double scale, bool gelu) {
  TORCH_CHECK(lins.size() == 16 && meta.size() == 8, "decode_layer: 4 linears");
  const bool bf16 = cache_k.scalar_type() == at::kBFloat16;
  Tensor qkv = lin_forward(rms_norm(x, attn_norm, eps, plus_one, bf16), lins, 0, meta);
  Tensor att = attend(qkv.view({batch, x.size(0) / batch, -1}), q_norm, k_norm, cache_k, cache_v, cos, sin, pos, nh,
                      nkv, window, eps, plus_one, scale);
  Tensor xn = residual_norm(x, lin_forward(att, lins, 1, meta), attn_post, mlp_norm, eps, plus_one);
  residual_norm(x, lin_forward(glu(lin_forward(xn, lins, 2, meta), gelu), lins, 3, meta), mlp_post, std::nullopt, eps,
                plus_one);
  return x;
}
"""


def _native():
    """The compiled extension (this file's kernels + leanlm.quant's q_linear + leanlm.adaptive's
    input-sparse product), or None."""
    from ..adaptive.kernels import SPARSE_SOURCE  # at call time: both packages import the runtime
    from ..quant.native import Q_LINEAR_SOURCE

    return build("leanlm_fused_decode_v13", Q_LINEAR_SOURCE + SPARSE_SOURCE + _SOURCE,
                 ["rms_norm", "residual_norm", "attend", "glu", "decode_layer", "small_linear", "q_linear"],
                 ("-mavx2", "-mfma", "-mf16c"), fallback="the Python decode path")  # fmt: skip


def available() -> bool:
    return _native() is not None


def can_fuse(layer, dtype: torch.dtype) -> bool:
    """True for the stock Block on CPU in fp32/bf16 (its linears, attention or MLP may be replaced)."""
    return type(layer) is _rt.Block and dtype in (torch.float32, torch.bfloat16) and layer.attn_norm.weight.device.type == "cpu"


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [..., K] @ weight.T (+ bias) through the native small-row kernel when it applies: at most
    MAX_ROWS rows, a row-major fp32/bf16 weight on CPU, no autograd. None otherwise (use F.linear)."""
    if not _rt.Linear.fused_small or x.device.type != "cpu" or x.dim() < 2 or weight.dim() != 2 or not weight.is_contiguous():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):  # the kernel has no backward
        return None
    rows = x.numel() // x.shape[-1]
    if not 1 <= rows <= MAX_ROWS or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if x.dtype not in (torch.float32, torch.bfloat16) or x.shape[-1] != weight.shape[1]:
        return None
    N = _native()
    if N is None:
        return None
    y = N.small_linear(x.reshape(rows, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def _linear(mod, x: torch.Tensor) -> torch.Tensor:
    """x [rows, K] through a linear layer: plain ones as one native call, replaced ones
    (quantized, sparse, packed) through their own forward."""
    if _plain(mod, x.dtype):
        y = small_linear(x, mod.weight, mod.bias)
        return y if y is not None else F.linear(x, mod.weight, mod.bias)
    return mod(x.unsqueeze(0)).squeeze(0)


_EMPTY = torch.empty(0)


def _block_linears(mods, dtype, rows: int):
    """([weight, bias, scales, zeros] x 4, [bits, group] x 4) for decode_layer when every linear is
    a plain dense weight, leanlm.quant's packed weight on the native kernel or leanlm.adaptive's
    native input-sparse linear (bits -1, its threshold in the scales slot); else None."""
    lins, meta = [], []
    for mod in mods:
        if _plain(mod, dtype) and mod.weight.is_contiguous():
            lins += [mod.weight, _EMPTY if mod.bias is None else mod.bias, _EMPTY, _EMPTY]
            meta += [0, 0]
        elif type(mod).__name__ == "QuantLinear" and mod.backend == "native" and rows <= mod.max_kernel_rows \
                and not (mod._forward_pre_hooks or mod._forward_hooks):  # fmt: skip
            lins += [mod.qweight, _EMPTY if mod.bias is None else mod.bias, mod.scales,
                     _EMPTY if mod.zeros is None else mod.zeros]  # fmt: skip
            meta += [mod.spec.bits, mod.kgroup]
        elif type(mod).__name__ == "SparseInputLinear" and mod.kernel == "native" \
                and not (mod._forward_pre_hooks or mod._forward_hooks):  # fmt: skip
            lins += [mod.weight, _EMPTY if mod.bias is None else mod.bias, torch.tensor([mod.threshold]), _EMPTY]
            meta += [-1, 0]
        else:
            return None
    return lins, meta


def _plain(mod, dtype) -> bool:
    return type(mod) is _rt.Linear and mod.weight.dtype == dtype and not (mod._forward_pre_hooks or mod._forward_hooks)


def _plain_cache(c, dtype) -> bool:
    return type(c) is _rt.KVCache and c.k.dtype == dtype and c.k.is_contiguous()


class _Reads:
    """Module attributes read without nn.Module.__getattr__, each remembered by identity, so a
    cached layer plan can tell cheaply whether anything it holds was replaced since."""

    def __init__(self):
        self.seen: list = []

    def get(self, mod, name):
        for d in (mod._parameters, mod._buffers, mod._modules, mod.__dict__):
            if name in d:
                self.seen.append((d, name, d[name]))
                return d[name]
        return getattr(mod, name)  # a property or class attribute: not something a method replaces


def _plan_fresh(plan, dtype) -> bool:
    if plan is None or plan[0] is not dtype:
        return False
    if not all(d.get(name) is obj for d, name, obj in plan[1]):
        return False
    return all(not (m._forward_hooks or m._forward_pre_hooks) and (w is None or w.is_contiguous()) for m, w in plan[2])


def _layer_plan(layer, dtype):
    """decode_layer's per-layer arguments when the whole block runs as one C++ call, else None.

    Why cached: rebuilding them (module attribute reads, type checks) every step cost about as
    much as the LM head's product in a profile of a bf16 step. The plan is kept on the layer and reused while every module,
    weight, buffer and cache it read is the same object, no hook was added and the plain weights
    are still contiguous (checked by identity each step, a few us per layer)."""
    plan = layer.__dict__.get("_fused_plan")
    if _plan_fresh(plan, dtype):
        return plan[3]
    r = _Reads()
    a, m = r.get(layer, "attn"), r.get(layer, "mlp")
    args = None
    cache = r.get(a, "cache") if type(a) is _rt.Attention else None
    if cache is not None and type(m) is _rt.MLP and _plain_cache(cache, dtype):
        k, v = r.get(cache, "k"), r.get(cache, "v")
        mods = [r.get(a, "wqkv"), r.get(a, "wo"), r.get(m, "w_gate_up"), r.get(m, "w_down")]
        for mod in mods:  # the linears' tensors (weights or packed codes, scales, zeros)
            for name in ("weight", "bias", "qweight", "scales", "zeros", "backend", "threshold", "kernel"):
                if name in mod._parameters or name in mod._buffers or name in mod.__dict__:
                    r.get(mod, name)
        lins = _block_linears(mods, dtype, MAX_ROWS)
        if lins is not None:
            def norm(mod, name):  # a norm's weight, None where the block has no such norm
                n = r.get(mod, name)
                return None if n is None else r.get(n, "weight")

            head = (norm(layer, "attn_norm"), lins[0], lins[1], norm(a, "q_norm"), norm(a, "k_norm"),
                    norm(layer, "attn_post_norm"), norm(layer, "mlp_norm"), norm(layer, "mlp_post_norm"), k, v)
            an = r.get(layer, "attn_norm")
            tail = (a.n_heads, a.n_kv_heads, a.window or 0, an.eps, an.plus_one, a.scale, m.act is not F.silu)
            args = (head, tail)
        watch = [(mod, mod._parameters.get("weight")) for mod in mods]
    else:
        watch = []
    layer.__dict__["_fused_plan"] = (dtype, r.seen, watch, args)
    return args


def decode_layer(layer, x: torch.Tensor, rope, start: int, dtype: torch.dtype) -> torch.Tensor:
    """One block for T <= MAX_ROWS new positions: x [B, T, D] fp32 (updated in place, returned)."""
    N = _native()
    B, T, D = x.shape
    x = x.contiguous()  # (a quantized embedding's rows may come strided)
    x2 = x.view(B * T, D)
    cos, sin = (t.reshape(T, -1) for t in rope)
    whole = _rt.Linear.fused_small and B * T <= MAX_ROWS  # (fused_small False: ATen GEMVs, general path)
    plan = _layer_plan(layer, dtype) if whole else None
    if plan is not None:
        N.decode_layer(x2, *plan[0], cos, sin, start, B, *plan[1])
        return x
    a, m = layer.attn, layer.mlp
    eps, plus_one = layer.attn_norm.eps, layer.attn_norm.plus_one
    bf16 = dtype == torch.bfloat16
    post = lambda norm: None if norm is None else norm.weight  # noqa: E731
    attn_ok = type(a) is _rt.Attention and _plain_cache(a.cache, dtype)
    mlp_ok = type(m) is _rt.MLP
    # general path: the same C++ glue, with the linear layers called as modules
    if attn_ok:
        qkv = _linear(a.wqkv, N.rms_norm(x2, layer.attn_norm.weight, eps, plus_one, bf16))
        att = N.attend(qkv.to(dtype).view(B, T, -1), post(a.q_norm), post(a.k_norm), a.cache.k, a.cache.v, cos, sin,
                       start, a.n_heads, a.n_kv_heads, a.window or 0, eps, plus_one, a.scale)  # fmt: skip
        h = _linear(a.wo, att)
    else:  # a cache policy or replaced attention: its own forward
        h = a(layer.attn_norm(x, dtype), rope, start).view(B * T, D)
    xn = N.residual_norm(x2, h.to(dtype), post(layer.attn_post_norm), layer.mlp_norm.weight, eps, plus_one)
    if mlp_ok:
        h = _linear(m.w_down, N.glu(_linear(m.w_gate_up, xn).to(dtype), m.act is not F.silu))
    else:
        h = m(xn.view(B, T, D)).view(B * T, D)
    N.residual_norm(x2, h.to(dtype), post(layer.mlp_post_norm), None, eps, plus_one)
    return x
