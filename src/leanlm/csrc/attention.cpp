// Attention over the KV cache for 1..16 new positions (attention): (QK-norm +) RoPE of q and k, the
// K/V write into the cache and softmax(q k^T) v per head, causal and optionally windowed. Each query's
// result is computed the same way whatever the number of new positions, so a k-token verification
// forward equals k one-token steps bit for bit (ATen's SDPA is not batch-invariant).
#include "leanlm.h"

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
  for (; d + 8 <= n; d += 8) s = _mm256_fmadd_ps(bf16x8(pa + d), bf16x8(pb + d), s);
  float r = hsum8(s);
  for (; d < n; ++d) r += bf16f(pa[d]) * bf16f(pb[d]);
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
  for (; d + 8 <= n; d += 8) _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, bf16x8(pv16 + d), _mm256_loadu_ps(acc + d)));
  for (; d < n; ++d) acc[d] += p * bf16f(pv16[d]);
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
