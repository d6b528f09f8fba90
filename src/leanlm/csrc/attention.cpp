// Attention over the KV cache for 1..16 new positions (attention), or for a batch of sequences each with its
// own cache and position (attend_rows): (QK-norm +) RoPE of q and k, the
// K/V write into the cache and softmax(q k^T) v per head, causal and optionally windowed. Each query's
// result is computed the same way whatever the number of new positions, so a k-token verification
// forward equals k one-token steps bit for bit (ATen's SDPA is not batch-invariant).
#include "leanlm.h"

// q . k over one head (fp32 accumulate), for fp32 or bf16 rows (top-k's logits over every visible key)
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

// where one sequence's keys and values live: its rows of a cache [.., nkv, len, hd], and the position of
// its first new token (a batch shares one cache tensor and one position, or each sequence has its own)
template <typename T>
struct SeqKV {
  T* k;
  T* v;
  int64_t len, pos;
};

// (QK-norm +) RoPE of q and k, K and V written to each sequence's cache; returns q [B, nh, T, hd] (rotated).
// cos / sin rows: row (b, t) at cos + (b * cos_b + t) * hd (cos_b = 0: the batch shares positions)
template <typename T>
static Tensor rope_write(const Tensor& qkv, const std::optional<Tensor>& q_norm, const std::optional<Tensor>& k_norm,
                         const std::vector<SeqKV<T>>& seqs, const Tensor& cos, const Tensor& sin, int64_t cos_b,
                         int64_t hd, int64_t nh, int64_t nkv, float eps, bool plus_one) {
  const int64_t B = qkv.size(0), Tn = qkv.size(1), half = hd / 2;
  Tensor q = at::empty({B, nh, Tn, hd}, qkv.options());
  const T* qkvp = qkv.data_ptr<T>();
  T* qp = q.data_ptr<T>();
  Tensor qnw = q_norm ? as_float(*q_norm) : Tensor(), knw = k_norm ? as_float(*k_norm) : Tensor();
  std::vector<float> v(hd);
  std::vector<T> vn(hd);
  const int64_t row = (nh + 2 * nkv) * hd;
  for (int64_t b = 0; b < B; ++b) {
    const SeqKV<T>& s = seqs[b];
    for (int64_t t = 0; t < Tn; ++t) {
      const T* cp = cos.data_ptr<T>() + (b * cos_b + t) * hd;
      const T* sp = sin.data_ptr<T>() + (b * cos_b + t) * hd;
      const T* src_row = qkvp + (b * Tn + t) * row;
      for (int64_t h = 0; h < nh + nkv; ++h) {
        const T* src = src_row + h * hd;
        for (int64_t d = 0; d < hd; ++d) v[d] = f(src[d]);
        if (q_norm) {  // Gemma: per-head RMSNorm of q and k before RoPE, rounded to T
          norm_row<T>(v.data(), (h < nh ? qnw : knw).data_ptr<float>(), hd, eps, plus_one, vn.data());
          for (int64_t d = 0; d < hd; ++d) v[d] = f(vn[d]);
        }
        T* dst = h < nh ? qp + ((b * nh + h) * Tn + t) * hd : s.k + ((h - nh) * s.len + s.pos + t) * hd;
        for (int64_t d = 0; d < hd; ++d) {  // x*cos + rotate_half(x)*sin (sign folded into sin)
          const float sw = v[d < half ? d + half : d - half];
          dst[d] = rnd<T>(f(rnd<T>(v[d] * f(cp[d]))) + sw * f(sp[d]));
        }
      }
      for (int64_t h = 0; h < nkv; ++h) {
        const T* src = src_row + (nh + nkv + h) * hd;
        std::copy(src, src + hd, s.v + (h * s.len + s.pos + t) * hd);
      }
    }
  }
  return q;
}

// Attention of q [B, nh, Tn, hd] over each sequence's cache, causal (query pos+t sees keys [lo, pos+t], lo > 0
// outside a sliding window) -> [B*Tn, nh*hd].
// Work items are (sequence, KV head, block of BLK keys): the keys of a block are widened to fp32 once per tile
// of TK keys and serve every query head of the KV group (GQA) and every new position; q.k for 8 keys at a time,
// an online softmax per block (fp32 running max / sum, vector exp) and p.v with the accumulators in registers.
// The blocks' partials are merged per query in block order. Blocks and tiles sit at fixed key positions and a
// query's arithmetic never involves another query, so its result is the same whatever the number of new
// positions or sequences in the call: a k-token verification forward equals k one-token steps, bit for bit.
namespace att {
constexpr int64_t TK = 32;   // keys per tile
constexpr int64_t BLK = 256;  // keys per work item: small enough to split an 8k cache over the threads
}  // namespace att

// n rows of hd values -> fp32 rows of hp >= hd (the padding stays zero)
template <typename T>
static inline void widen_rows(const T* src, int64_t n, int64_t hd, int64_t hp, float* dst) {
  for (int64_t j = 0; j < n; ++j) {
    const T* r = src + j * hd;
    float* o = dst + j * hp;
    int64_t d = 0;
    if constexpr (std::is_same_v<T, c10::BFloat16>)
      for (; d + 8 <= hd; d += 8) _mm256_storeu_ps(o + d, bf16x8((const uint16_t*)r + d));
    else
      for (; d + 8 <= hd; d += 8) _mm256_storeu_ps(o + d, _mm256_loadu_ps((const float*)r + d));
    for (; d < hd; ++d) o[d] = f(r[d]);
  }
}

// One query row over one tile of cnt <= TK keys (fp32 rows of hp, padding rows of k zero): scores q.k (the scale
// already in q), masked to absolute key positions [lo, qpos] when given (key u sits at js + u), then the online
// softmax update of the row's running max m, sum l and unnormalised acc [hp]. p: TK floats of scratch.
static inline void tile_softmax_pv(const float* q, const float* k, const float* v, int64_t hp, int64_t cnt, float* p,
                                   float& m, float& l, float* acc, int64_t js = 0, int64_t qpos = INT64_MAX,
                                   int64_t lo = 0) {
  const int64_t jn = (cnt + 7) / 8 * 8;
  __m256 mx = _mm256_set1_ps(-INFINITY);
  const bool whole = jn == cnt && js >= lo && js + cnt - 1 <= qpos;  // every key visible: no mask
  for (int64_t j = 0; j < jn; j += 8) {
    _mm256_storeu_ps(p + j, dots8(q, k + j * hp, hp, hp));
    if (!whole)
      for (int64_t u = j; u < j + 8; ++u)  // mask: padding, the future, outside the window
        if (u >= cnt || js + u > qpos || js + u < lo) p[u] = -INFINITY;
    mx = _mm256_max_ps(mx, _mm256_loadu_ps(p + j));
  }
  alignas(32) float m8[8];
  _mm256_store_ps(m8, mx);
  float mt = -INFINITY;
  for (float x : m8) mt = std::max(mt, x);
  if (mt == -INFINITY) return;
  if (mt > m) {  // a new running max: rescale what was summed so far
    const float c = m == -INFINITY ? 0.f : std::exp(m - mt);
    l *= c;
    scale8(c, acc, hp);
    m = mt;
  }
  const __m256 mv = _mm256_set1_ps(m), ninf = _mm256_set1_ps(-INFINITY);
  __m256 lsum = _mm256_setzero_ps();
  for (int64_t j = 0; j < jn; j += 8) {
    const __m256 x = _mm256_loadu_ps(p + j);
    const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(x, mv)), _mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ));
    _mm256_storeu_ps(p + j, e);
    lsum = _mm256_add_ps(lsum, e);
  }
  l += hsum8(lsum);
  pv_cols(p, 1, v, hp, cnt, acc, 0, hp);
}

template <typename T>
static Tensor attend_tiles(const Tensor& q, const std::vector<SeqKV<T>>& seqs, int64_t Tn, int64_t hd, int64_t nh,
                           int64_t nkv, int64_t window, float scale) {
  using att::BLK;
  using att::TK;
  const int64_t B = (int64_t)seqs.size(), G = nh / nkv, R = G * Tn, hp = (hd + 7) / 8 * 8;
  int64_t nb = 1;  // blocks per sequence: enough for the longest
  for (const SeqKV<T>& s : seqs) nb = std::max(nb, (s.pos + Tn + BLK - 1) / BLK);
  const int64_t items = B * nkv * nb;
  std::vector<float> pm(items * R), pl(items * R), pacc(items * R * hp);
  const T* qp = q.data_ptr<T>();
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(R * hp, 0.f), kf(TK * hp, 0.f), vf(TK * hp, 0.f);
    alignas(32) float sc[TK];
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / (nkv * nb), hk = (it / nb) % nkv, blk = it % nb;
      const SeqKV<T>& s = seqs[b];
      float *m = pm.data() + it * R, *l = pl.data() + it * R, *acc = pacc.data() + it * R * hp;
      std::fill(m, m + R, -INFINITY);
      std::fill(l, l + R, 0.f);
      std::fill(acc, acc + R * hp, 0.f);
      const int64_t last = s.pos + Tn - 1;  // the newest key
      const int64_t j0 = blk * BLK, j1 = std::min((blk + 1) * BLK, last + 1);
      const int64_t lo_min = window > 0 ? std::max<int64_t>(0, s.pos - window + 1) : 0;
      if (j0 >= j1 || j1 <= lo_min) continue;  // beyond this sequence, or before every query's window
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = 0; t < Tn; ++t) {
          const T* src = qp + ((b * nh + hk * G + g) * Tn + t) * hd;
          float* dst = qf.data() + (g * Tn + t) * hp;
          for (int64_t d = 0; d < hd; ++d) dst[d] = f(src[d]) * scale;  // the softmax scale folded into q
        }
      const T* kb = s.k + hk * s.len * hd;
      const T* vb = s.v + hk * s.len * hd;
      for (int64_t js = j0; js < j1; js += TK) {
        const int64_t cnt = std::min<int64_t>(TK, j1 - js), jn = (cnt + 7) / 8 * 8;
        widen_rows<T>(kb + js * hd, cnt, hd, hp, kf.data());
        widen_rows<T>(vb + js * hd, cnt, hd, hp, vf.data());
        for (int64_t j = cnt; j < jn; ++j) std::fill(kf.data() + j * hp, kf.data() + (j + 1) * hp, 0.f);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t qpos = s.pos + r % Tn, lo = window > 0 ? std::max<int64_t>(0, qpos - window + 1) : 0;
          if (js > qpos || js + cnt <= lo) continue;  // no visible key in this tile
          tile_softmax_pv(qf.data() + r * hp, kf.data(), vf.data(), hp, cnt, sc, m[r], l[r], acc + r * hp, js, qpos, lo);
        }
      }
    }
  });
  // merge the blocks of each (sequence, head, new position) in block order
  Tensor out = at::empty({B * Tn, nh * hd}, q.options());
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * nh * Tn, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> o(hp);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (nh * Tn), h = (i / Tn) % nh, t = i % Tn;
      const int64_t r = (h % G) * Tn + t, base = (b * nkv + h / G) * nb;
      float mx = -INFINITY;
      for (int64_t k = 0; k < nb; ++k) mx = std::max(mx, pm[(base + k) * R + r]);
      std::fill(o.begin(), o.end(), 0.f);
      float sum = 0.f;
      for (int64_t k = 0; k < nb; ++k) {
        const int64_t it = base + k;
        if (pl[it * R + r] == 0.f) continue;  // no visible key in this block
        const float c = std::exp(pm[it * R + r] - mx);
        sum += c * pl[it * R + r];
        const float* a = pacc.data() + (it * R + r) * hp;
        for (int64_t d = 0; d < hd; ++d) o[d] += c * a[d];
      }
      T* dst = op + (b * Tn + t) * nh * hd + h * hd;
      const float inv = 1.f / sum;
      for (int64_t d = 0; d < hd; ++d) dst[d] = rnd<T>(o[d] * inv);
    }
  });
  return out;
}

template <typename T>
static Tensor attend_impl(const Tensor& qkv_in, const std::optional<Tensor>& q_norm, const std::optional<Tensor>& k_norm,
                          const std::vector<SeqKV<T>>& seqs, const Tensor& cos, const Tensor& sin, int64_t cos_b,
                          int64_t hd, int64_t nh, int64_t nkv, int64_t window, float eps, bool plus_one, double scale) {
  Tensor qkv = qkv_in.contiguous();  // [B, T, (nh + 2 nkv) * hd]: sequence b's positions pos_b .. pos_b+T-1
  Tensor q = rope_write<T>(qkv, q_norm, k_norm, seqs, cos, sin, cos_b, hd, nh, nkv, eps, plus_one);
  return attend_tiles<T>(q, seqs, qkv.size(1), hd, nh, nkv, window, (float)scale);
}

// one cache [B, nkv, L, hd] shared by the batch, every row at position pos
template <typename T>
static std::vector<SeqKV<T>> shared_kv(Tensor& cache_k, Tensor& cache_v, int64_t B, int64_t pos) {
  const int64_t L = cache_k.size(2), stride = cache_k.size(1) * L * cache_k.size(3);
  std::vector<SeqKV<T>> seqs;
  for (int64_t b = 0; b < B; ++b)
    seqs.push_back({cache_k.data_ptr<T>() + b * stride, cache_v.data_ptr<T>() + b * stride, L, pos});
  return seqs;
}

// one cache [1, nkv, L_b, hd] per sequence b, at its own position
template <typename T>
static std::vector<SeqKV<T>> own_kv(std::vector<Tensor>& cache_k, std::vector<Tensor>& cache_v,
                                    const std::vector<int64_t>& positions) {
  std::vector<SeqKV<T>> seqs;
  for (size_t b = 0; b < cache_k.size(); ++b)
    seqs.push_back({cache_k[b].data_ptr<T>(), cache_v[b].data_ptr<T>(), cache_k[b].size(2), positions[b]});
  return seqs;
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
  TORCH_CHECK(cache_k.size(0) >= qkv.size(0), "a cache row per batch row");
  Tensor c = cos.contiguous(), s = sin.contiguous();
  const int64_t B = qkv.size(0), hd = cache_k.size(3);
  if (bf16)
    return attend_impl<c10::BFloat16>(qkv, q_norm, k_norm, shared_kv<c10::BFloat16>(cache_k, cache_v, B, pos), c, s, 0,
                                      hd, nh, nkv, window, (float)eps, plus_one, scale);
  return attend_impl<float>(qkv, q_norm, k_norm, shared_kv<float>(cache_k, cache_v, B, pos), c, s, 0, hd, nh, nkv,
                            window, (float)eps, plus_one, scale);
}

// the same for B sequences, each with its own cache ([1, nkv, L_b, hd]) and position: sequence b's T new
// positions are positions[b] ..; cos / sin [B*T, hd] (row b*T + t for sequence b's t-th new position)
Tensor attend_rows(Tensor qkv, std::optional<Tensor> q_norm, std::optional<Tensor> k_norm, std::vector<Tensor> cache_k,
                   std::vector<Tensor> cache_v, Tensor cos, Tensor sin, std::vector<int64_t> positions, int64_t nh,
                   int64_t nkv, int64_t window, double eps, bool plus_one, double scale) {
  const int64_t B = qkv.size(0);
  TORCH_CHECK(qkv.dim() == 3, "qkv [B, T, row]");
  TORCH_CHECK((int64_t)cache_k.size() == B && (int64_t)cache_v.size() == B && (int64_t)positions.size() == B,
              "one cache pair and one position per sequence");
  const bool bf16 = qkv.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || qkv.scalar_type() == at::kFloat, "fp32 or bf16");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && cos.size(0) == B * qkv.size(1), "cos / sin [B*T, hd]");
  for (int64_t b = 0; b < B; ++b) {
    const Tensor &k = cache_k[b], &v = cache_v[b];
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() && k.dim() == 4 && k.size(0) == 1 &&
                    k.size(1) == nkv && k.scalar_type() == qkv.scalar_type() && v.scalar_type() == qkv.scalar_type(),
                "cache of sequence ", b, ": contiguous [1, nkv, L, hd] in qkv's dtype");
    TORCH_CHECK(k.size(3) == cache_k[0].size(3), "one head size");
    TORCH_CHECK(positions[b] >= 0 && positions[b] + qkv.size(1) <= k.size(2), "sequence ", b, " within its cache");
  }
  Tensor c = cos.contiguous(), s = sin.contiguous();
  const int64_t T = qkv.size(1), hd = cache_k[0].size(3);
  if (bf16)
    return attend_impl<c10::BFloat16>(qkv, q_norm, k_norm, own_kv<c10::BFloat16>(cache_k, cache_v, positions), c, s, T,
                                      hd, nh, nkv, window, (float)eps, plus_one, scale);
  return attend_impl<float>(qkv, q_norm, k_norm, own_kv<float>(cache_k, cache_v, positions), c, s, T, hd, nh, nkv,
                            window, (float)eps, plus_one, scale);
}
