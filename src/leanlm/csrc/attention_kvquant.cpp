// Decode attention straight from an int8 / int4 KV store (leanlm.attention.kv_quant.KVStore's buffers), so a
// quantized cache is never dequantized as a whole (bits 16: a store kept in q's dtype, read the same way, so a
// bf16 sinks + window ring decodes fused too): 1..16 new query positions over the store's slots [0, n),
// plus (optionally) the new keys / values in q's dtype that are not stored yet (a chunk attends to them before
// the policy inserts them).
//
// Why: the Python path dequantized every slot to the compute dtype each step, which made int8 KV decode
// slower than the bf16 cache it halves. Here the codes are read once per KV head for all the query heads of
// its group (GQA) and all new positions:
// - q.k on the codes with the scale applied once per key (group): int8 s * (q . c); int4 (asymmetric, per
//   group g) s_g * (q_g . c_g) + z_g * sum(q_g), with sum(q_g) computed once per query row;
// - an online softmax over tiles of TK keys (fp32 running max / sum, rescaled per tile);
// - p * v accumulated from the codes: acc_g += (p s_g) c_g, and for int4 a per-group sum of p z_g added to
//   every channel of the group once at the end.
// Masking is by the original position of each slot (pos, -1 = empty): visible to the query at qpos when
// 0 <= p <= qpos, p > qpos - window (window > 0), and, for a sinks + ring window policy (ring >= 0),
// p < sinks or p >= start - ring. Work items are (row, KV head, block of keys); when rows x KV heads are
// fewer than twice the threads the keys are split into blocks whose partial (max, sum, acc) are merged.
// Numerics: fp32 throughout (codes widened exactly), exp is a degree-6 polynomial (~1 ulp); the output is
// rounded to q's dtype.
#include "leanlm.h"

namespace kvq {

constexpr int TK = 32;  // keys per tile

static inline void axpy8(float p, const float* x, float* acc, int64_t n) {  // n % 8 == 0
  const __m256 pv = _mm256_set1_ps(p);
  for (int64_t d = 0; d < n; d += 8)
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + d), _mm256_loadu_ps(acc + d)));
}

// one row of codes widened to fp32 (exact): int8 [D], or int4 packed two per byte (low nibble first) [D/2]
static inline void widen_int8(const int8_t* c, float* out, int64_t D) {
  for (int64_t d = 0; d < D; d += 8)
    _mm256_storeu_ps(out + d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(c + d)))));
}
static inline void widen_int4(const uint8_t* c, float* out, int64_t D) {  // D % 32 == 0
  const __m128i m = _mm_set1_epi8(0x0F);
  for (int64_t d = 0; d < D; d += 32) {
    const __m128i b = _mm_loadu_si128((const __m128i*)(c + d / 2));
    const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    const __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);
    _mm256_storeu_ps(out + d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c0)));
    _mm256_storeu_ps(out + d + 8, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c0, 8))));
    _mm256_storeu_ps(out + d + 16, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c1)));
    _mm256_storeu_ps(out + d + 24, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c1, 8))));
  }
}
static inline float h2f(const at::Half h) { return _cvtsh_ss(h.x); }  // one F16C instruction (the avx2 level has F16C)

struct Args {
  int64_t B, H, Hkv, G, T, D, bits, group, ng;
  int64_t S, n, Hp, Tn, start, window, sinks, ring;
  float scale;
  const void *kq, *vq;          // codes of the store, [Bc, Hkv, S, D] int8 or [Bc, Hkv, S, D/2] uint8
  const at::Half *ks, *kz, *vs, *vz;  // [Bc, Hkv, S, ng] (zeros: int4 only)
  const int32_t* pos;           // [Bc, Hp, S]
};

// partial result of one item: per query row (g * T + t) its running max, sum and unnormalised acc [D]
template <typename T>
static void item(const Args& a, const T* q, const T* kn, const T* vn, int64_t b, int64_t hk, int64_t j0, int64_t j1,
                 bool with_new, float* pm, float* pl, float* pacc) {
  const int64_t D = a.D, R = a.G * a.T, ng = a.ng, grp = a.group;
  // tiles: widened codes [TK, D]; key and value scales / zeros per group across the tile's keys [ng, TK] (vector
  // loads); an additive mask per new position [T, TK] (0 or -inf)
  std::vector<float> qf(R * D), qs(R * ng), zacc(R * ng, 0.f), kf(TK * D, 0.f), vf(TK * D, 0.f), sc(TK), coef(TK * ng);
  std::vector<float> ksc(ng * TK), kzr(ng * TK), vsc(ng * TK), vzr(ng * TK), bias(a.T * TK);
  for (int64_t g = 0; g < a.G; ++g)
    for (int64_t t = 0; t < a.T; ++t) {
      const T* src = q + ((b * a.H + hk * a.G + g) * a.T + t) * D;
      float* dst = qf.data() + (g * a.T + t) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = f(src[d]) * a.scale;  // the softmax scale folded into q
      for (int64_t k = 0; k < ng; ++k) {
        float s = 0.f;
        for (int64_t d = k * grp; d < (k + 1) * grp; ++d) s += dst[d];
        qs[(g * a.T + t) * ng + k] = s;
      }
    }
  for (int64_t r = 0; r < R; ++r) { pm[r] = -INFINITY; pl[r] = 0.f; }
  std::fill(pacc, pacc + R * D, 0.f);
  const bool zeros = a.bits == 4;
  const int64_t row_s = (b * a.Hkv + hk) * a.S;  // first slot of this (row, KV head)
  const int32_t* pos = a.pos + (b * a.Hp + (a.Hp == 1 ? 0 : hk)) * a.S;
  const int64_t nt_store = (j1 - j0 + TK - 1) / TK, nt_new = with_new ? (a.Tn + TK - 1) / TK : 0;
  for (int64_t tile = 0; tile < nt_store + nt_new; ++tile) {
    // the tile's keys: their positions first, and the mask; a tile no query sees is never loaded (a layer's
    // sliding window over a full store, a ring's gap)
    int64_t cnt, kp[TK];
    const bool fp = tile >= nt_store;
    const int64_t js = fp ? (tile - nt_store) * TK : j0 + tile * TK;
    cnt = std::min<int64_t>(TK, (fp ? a.Tn : j1) - js);
    for (int64_t j = 0; j < cnt; ++j) kp[j] = fp ? a.start + js + j : pos[js + j];
    bool any = false;
    for (int64_t t = 0; t < a.T; ++t) {
      const int64_t qpos = a.start + t;
      for (int64_t j = 0; j < TK; ++j) {
        const int64_t p = j < cnt ? kp[j] : -1;
        const bool vis = p >= 0 && p <= qpos && (a.window <= 0 || p > qpos - a.window) &&
                         (fp || a.ring < 0 || p < a.sinks || p >= a.start - a.ring);
        bias[t * TK + j] = vis ? 0.f : -INFINITY;
        any |= vis;
      }
    }
    if (!any) continue;
    // load it: codes widened to fp32 + per-key scales / zeros, or the new keys with scale 1, zero 0
    if (!fp) {
      if (a.bits == 16) {  // unquantized: the tile's rows are contiguous slots
        widen_rows<T>((const T*)a.kq + (row_s + js) * D, cnt, D, D, kf.data());
        widen_rows<T>((const T*)a.vq + (row_s + js) * D, cnt, D, D, vf.data());
      }
      for (int64_t j = 0; j < cnt; ++j) {
        const int64_t slot = row_s + js + j;
        if (a.bits == 16) {  // scale 1, zero 0
          for (int64_t k = 0; k < ng; ++k) {
            ksc[k * TK + j] = vsc[k * TK + j] = 1.f;
            kzr[k * TK + j] = vzr[k * TK + j] = 0.f;
          }
          continue;
        }
        if (a.bits == 8) {
          widen_int8((const int8_t*)a.kq + slot * D, kf.data() + j * D, D);
          widen_int8((const int8_t*)a.vq + slot * D, vf.data() + j * D, D);
        } else {
          widen_int4((const uint8_t*)a.kq + slot * (D / 2), kf.data() + j * D, D);
          widen_int4((const uint8_t*)a.vq + slot * (D / 2), vf.data() + j * D, D);
        }
        for (int64_t k = 0; k < ng; ++k) {
          ksc[k * TK + j] = h2f(a.ks[slot * ng + k]);
          vsc[k * TK + j] = h2f(a.vs[slot * ng + k]);
          kzr[k * TK + j] = zeros ? h2f(a.kz[slot * ng + k]) : 0.f;
          vzr[k * TK + j] = zeros ? h2f(a.vz[slot * ng + k]) : 0.f;
        }
      }
    } else {
      for (int64_t j = 0; j < cnt; ++j) {
        const int64_t row = ((b * a.Hkv + hk) * a.Tn + js + j) * D;
        for (int64_t d = 0; d < D; ++d) { kf[j * D + d] = f(kn[row + d]); vf[j * D + d] = f(vn[row + d]); }
        for (int64_t k = 0; k < ng; ++k) {
          ksc[k * TK + j] = vsc[k * TK + j] = 1.f;
          kzr[k * TK + j] = vzr[k * TK + j] = 0.f;
        }
      }
    }
    for (int64_t j = cnt; j < TK; ++j)  // padding keys: finite values, masked
      for (int64_t k = 0; k < ng; ++k) ksc[k * TK + j] = kzr[k * TK + j] = vsc[k * TK + j] = vzr[k * TK + j] = 0.f;
    const int64_t jn = (cnt + 7) / 8 * 8;  // key vectors holding real keys
    for (int64_t r = 0; r < R; ++r) {
      const float* qr = qf.data() + r * D;
      const float* br = bias.data() + (r % a.T) * TK;
      __m256 mx = _mm256_set1_ps(-INFINITY);
      for (int64_t j = 0; j < jn; j += 8) {
        __m256 s = _mm256_loadu_ps(br + j);
        for (int64_t k = 0; k < ng; ++k) {
          const __m256 d8 = dots8(qr + k * grp, kf.data() + j * D + k * grp, D, grp);
          s = _mm256_fmadd_ps(d8, _mm256_loadu_ps(ksc.data() + k * TK + j), s);
          if (zeros) s = _mm256_fmadd_ps(_mm256_set1_ps(qs[r * ng + k]), _mm256_loadu_ps(kzr.data() + k * TK + j), s);
        }
        _mm256_storeu_ps(sc.data() + j, s);
        mx = _mm256_max_ps(mx, s);
      }
      float mt = -INFINITY;
      { alignas(32) float m8[8]; _mm256_store_ps(m8, mx); for (float v : m8) mt = std::max(mt, v); }
      if (mt == -INFINITY) continue;
      float* acc = pacc + r * D;
      float* za = zacc.data() + r * ng;
      if (mt > pm[r]) {  // a new running max: rescale what was summed so far
        const float c = pm[r] == -INFINITY ? 0.f : std::exp(pm[r] - mt);
        pl[r] *= c;
        scale8(c, acc, D);
        for (int64_t k = 0; k < ng; ++k) za[k] *= c;
        pm[r] = mt;
      }
      const __m256 mv = _mm256_set1_ps(pm[r]), ninf = _mm256_set1_ps(-INFINITY);
      __m256 lsum = _mm256_setzero_ps();
      for (int64_t j = 0; j < jn; j += 8) {
        const __m256 s = _mm256_loadu_ps(sc.data() + j);
        const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(s, mv)), _mm256_cmp_ps(s, ninf, _CMP_NEQ_OQ));
        _mm256_storeu_ps(sc.data() + j, e);
        lsum = _mm256_add_ps(lsum, e);
      }
      pl[r] += hsum8(lsum);
      // per group: p s_g for the codes, and (int4) sum_j p z_g added once at the end; vectors over the keys
      // (padding keys have p = 0)
      for (int64_t k = 0; k < ng; ++k) {
        __m256 zs = _mm256_setzero_ps();
        for (int64_t j = 0; j < jn; j += 8) {
          const __m256 p = _mm256_loadu_ps(sc.data() + j);
          _mm256_storeu_ps(coef.data() + k * TK + j, _mm256_mul_ps(p, _mm256_loadu_ps(vsc.data() + k * TK + j)));
          if (zeros) zs = _mm256_fmadd_ps(p, _mm256_loadu_ps(vzr.data() + k * TK + j), zs);
        }
        if (zeros) za[k] += hsum8(zs);
        pv_cols(coef.data() + k * TK, 1, vf.data(), D, cnt, acc, k * grp, (k + 1) * grp);
      }
    }
  }
  if (zeros)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < ng; ++k)
        for (int64_t d = k * grp; d < (k + 1) * grp; ++d) pacc[r * D + d] += zacc[r * ng + k];
}

template <typename T>
static Tensor run(const Args& a, const Tensor& q, const Tensor& kn, const Tensor& vn) {
  const int64_t R = a.G * a.T, D = a.D, units = a.B * a.Hkv;
  const int64_t nth = at::get_num_threads();
  int64_t nblk = 1;
  if (units < 2 * nth) nblk = std::max<int64_t>(1, std::min((2 * nth + units - 1) / units, (a.n + 255) / 256));
  // blocks of whole tiles
  const int64_t per = ((a.n + nblk - 1) / nblk + TK - 1) / TK * TK;
  Tensor pm = at::empty({units * nblk, R}, at::kFloat), pl = at::empty({units * nblk, R}, at::kFloat);
  Tensor pacc = at::empty({units * nblk, R, D}, at::kFloat);
  const T* qp = q.data_ptr<T>();
  const T* knp = a.Tn ? kn.data_ptr<T>() : nullptr;
  const T* vnp = a.Tn ? vn.data_ptr<T>() : nullptr;
  float *pmp = pm.data_ptr<float>(), *plp = pl.data_ptr<float>(), *pap = pacc.data_ptr<float>();
  at::parallel_for(0, units * nblk, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t u = i / nblk, blk = i % nblk;
      const int64_t j0 = std::min(a.n, blk * per), j1 = std::min(a.n, (blk + 1) * per);
      item<T>(a, qp, knp, vnp, u / a.Hkv, u % a.Hkv, j0, j1, blk == nblk - 1 && a.Tn > 0, pmp + i * R, plp + i * R,
              pap + i * R * D);
    }
  });
  Tensor out = at::empty({a.B, a.H, a.T, D}, q.options());
  T* op = out.data_ptr<T>();
  at::parallel_for(0, units * R, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> acc(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t u = i / R, r = i % R;
      float m = -INFINITY;
      for (int64_t k = 0; k < nblk; ++k) m = std::max(m, pmp[(u * nblk + k) * R + r]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float l = 0.f;
      if (m != -INFINITY)
        for (int64_t k = 0; k < nblk; ++k) {
          const int64_t it = u * nblk + k;
          if (plp[it * R + r] == 0.f) continue;
          const float c = std::exp(pmp[it * R + r] - m);
          l += c * plp[it * R + r];
          axpy8(c, pap + (it * R + r) * D, acc.data(), D);
        }
      const float inv = l > 0.f ? 1.f / l : 0.f;  // a query that sees no key gets zeros
      const int64_t b = u / a.Hkv, hk = u % a.Hkv, g = r / a.T, t = r % a.T;
      T* o = op + ((b * a.H + hk * a.G + g) * a.T + t) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = rnd<T>(acc[d] * inv);
    }
  });
  return out;
}

}  // namespace kvq

// the kernel's arguments from the store's buffers, checked
static kvq::Args kvq_args(const Tensor& q, const Tensor& kq, const Tensor& ks, const Tensor& kz, const Tensor& vq,
                          const Tensor& vs, const Tensor& vz, const Tensor& pos, int64_t n, int64_t Tn, int64_t start,
                          int64_t bits, int64_t group, int64_t window, int64_t sinks, int64_t ring, double scale) {
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 16, "bits 8, 4 or 16 (the store in q's dtype)");
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "q [B, H, T, D] fp32/bf16");
  kvq::Args a{};
  a.B = q.size(0); a.H = q.size(1); a.T = q.size(2); a.D = q.size(3);
  TORCH_CHECK(kq.dim() == 4 && kq.is_contiguous() && vq.is_contiguous() && kq.sizes() == vq.sizes(), "codes [Bc, Hkv, S, .]");
  a.Hkv = kq.size(1); a.S = kq.size(2); a.n = n;
  TORCH_CHECK(a.H % a.Hkv == 0 && kq.size(0) >= a.B && 0 <= n && n <= a.S, "shapes");
  a.G = a.H / a.Hkv; a.bits = bits;
  const auto code_type = bits == 16 ? q.scalar_type() : bits == 8 ? at::kChar : at::kByte;
  TORCH_CHECK(kq.size(3) == (bits == 4 ? a.D / 2 : a.D) && kq.scalar_type() == code_type && vq.scalar_type() == code_type,
              "code layout (bits 16: the store in q's dtype)");
  TORCH_CHECK(bits == 4 ? a.D % 32 == 0 : a.D % 8 == 0, "head dim: a multiple of 8 (int8, 16 bits) or 32 (int4)");
  a.group = bits == 4 ? group : a.D;
  TORCH_CHECK(a.group % 8 == 0 && a.D % a.group == 0, "group");
  a.ng = a.D / a.group;
  if (bits != 16)
    for (const Tensor* t : {&ks, &vs})
      TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->numel() == kq.size(0) * a.Hkv * a.S * a.ng, "scales fp16 [Bc, Hkv, S, ng]");
  if (bits == 4)
    for (const Tensor* t : {&kz, &vz})
      TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->numel() == kq.size(0) * a.Hkv * a.S * a.ng, "zeros fp16 [Bc, Hkv, S, ng]");
  TORCH_CHECK(pos.scalar_type() == at::kInt && pos.is_contiguous() && pos.dim() == 3 && pos.size(0) >= a.B && pos.size(2) == a.S &&
                  (pos.size(1) == 1 || pos.size(1) == a.Hkv), "pos int32 [Bc, 1 or Hkv, S]");
  a.Hp = pos.size(1);
  a.Tn = Tn;
  a.start = start; a.window = window; a.sinks = sinks; a.ring = ring; a.scale = (float)scale;
  a.kq = kq.data_ptr(); a.vq = vq.data_ptr();
  a.ks = bits == 16 ? nullptr : ks.data_ptr<at::Half>(); a.vs = bits == 16 ? nullptr : vs.data_ptr<at::Half>();
  a.kz = bits == 4 ? kz.data_ptr<at::Half>() : nullptr; a.vz = bits == 4 ? vz.data_ptr<at::Half>() : nullptr;
  a.pos = pos.data_ptr<int32_t>();
  return a;
}

// q [B, H, T, D] (fp32 / bf16, positions start .. start+T-1) over the store's slots [0, n) and the new keys
// k_new / v_new [B, Hkv, Tn, D] in q's dtype (Tn = 0: empty tensors) at positions start .. start+Tn-1
// -> [B, H, T, D] in q's dtype
Tensor attend_kvquant(Tensor q, Tensor kq, Tensor ks, Tensor kz, Tensor vq, Tensor vs, Tensor vz, Tensor pos, int64_t n,
                      Tensor k_new, Tensor v_new, int64_t start, int64_t bits, int64_t group, int64_t window,
                      int64_t sinks, int64_t ring, double scale) {
  q = q.contiguous();
  const int64_t Tn = k_new.numel() ? k_new.size(2) : 0;
  if (Tn) {
    k_new = k_new.contiguous(); v_new = v_new.contiguous();
    TORCH_CHECK(k_new.scalar_type() == q.scalar_type() && v_new.scalar_type() == q.scalar_type() && k_new.sizes() == v_new.sizes() &&
                    k_new.dim() == 4 && k_new.size(0) == q.size(0) && k_new.size(1) == kq.size(1) && k_new.size(3) == q.size(3),
                "new keys [B, Hkv, Tn, D] in q's dtype");
  }
  const kvq::Args a = kvq_args(q, kq, ks, kz, vq, vs, vz, pos, n, Tn, start, bits, group, window, sinks, ring, scale);
  if (q.scalar_type() == at::kBFloat16) return kvq::run<c10::BFloat16>(a, q, k_new, v_new);
  return kvq::run<float>(a, q, k_new, v_new);
}

namespace kvq {

// one row x [D] quantized into the store, as leanlm.attention.kv_quant.quantize_int8 / quantize_int4 do it
// (fp32 math, fp16 scale / zero, round half to even), so the store holds what the Python path writes
static void quantize_row(const float* x, int64_t D, int64_t bits, int64_t group, void* codes, at::Half* s, at::Half* z) {
  if (bits == 8) {
    float mx = 0.f;
    for (int64_t d = 0; d < D; ++d) mx = std::max(mx, std::fabs(x[d]));
    const at::Half sh = static_cast<at::Half>(std::max(mx / 127.0f, 1e-8f));
    const float sf = static_cast<float>(sh);
    int8_t* c = (int8_t*)codes;
    for (int64_t d = 0; d < D; ++d) c[d] = (int8_t)std::min(127.f, std::max(-127.f, std::nearbyint(x[d] / sf)));
    s[0] = sh;
    return;
  }
  uint8_t* c = (uint8_t*)codes;
  for (int64_t g = 0; g < D / group; ++g) {
    const float* xg = x + g * group;
    float mn = xg[0], mx = xg[0];
    for (int64_t d = 1; d < group; ++d) { mn = std::min(mn, xg[d]); mx = std::max(mx, xg[d]); }
    const at::Half sh = static_cast<at::Half>(std::max((mx - mn) / 15.0f, 1e-8f)), zh = static_cast<at::Half>(mn);
    const float sf = static_cast<float>(sh), zf = static_cast<float>(zh);
    for (int64_t d = 0; d < group; d += 2) {
      const uint8_t lo = (uint8_t)std::min(15.f, std::max(0.f, std::nearbyint((xg[d] - zf) / sf)));
      const uint8_t hi = (uint8_t)std::min(15.f, std::max(0.f, std::nearbyint((xg[d + 1] - zf) / sf)));
      c[(g * group + d) / 2] = lo | (hi << 4);
    }
    s[g] = sh;
    z[g] = zh;
  }
}

// (QK-norm +) RoPE of the new rows of qkv [B, T, (nh + 2 nkv) hd] into q [B, nh, T, hd] and k [B, nkv, T, hd],
// v copied to [B, nkv, T, hd]; the same roundings as attention.cpp's attend (the Python path's)
template <typename T>
static void rope_split(const Tensor& qkv, const std::optional<Tensor>& q_norm, const std::optional<Tensor>& k_norm,
                       const Tensor& cos, const Tensor& sin, int64_t nh, int64_t nkv, float eps, bool plus_one, Tensor& q,
                       Tensor& k, Tensor& v) {
  const int64_t B = qkv.size(0), Tn = qkv.size(1), hd = q.size(3), half = hd / 2, row = (nh + 2 * nkv) * hd;
  const T* src_all = qkv.data_ptr<T>();
  Tensor qnw = q_norm ? as_float(*q_norm) : Tensor(), knw = k_norm ? as_float(*k_norm) : Tensor();
  std::vector<float> x(hd);
  std::vector<T> xn(hd);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < Tn; ++t) {
      const T* cp = cos.data_ptr<T>() + t * hd;
      const T* sp = sin.data_ptr<T>() + t * hd;
      const T* src_row = src_all + (b * Tn + t) * row;
      for (int64_t h = 0; h < nh + nkv; ++h) {
        const T* src = src_row + h * hd;
        for (int64_t d = 0; d < hd; ++d) x[d] = f(src[d]);
        if (q_norm) {
          norm_row<T>(x.data(), (h < nh ? qnw : knw).data_ptr<float>(), hd, eps, plus_one, xn.data());
          for (int64_t d = 0; d < hd; ++d) x[d] = f(xn[d]);
        }
        T* dst = h < nh ? q.data_ptr<T>() + ((b * nh + h) * Tn + t) * hd : k.data_ptr<T>() + ((b * nkv + h - nh) * Tn + t) * hd;
        for (int64_t d = 0; d < hd; ++d) {
          const float sw = x[d < half ? d + half : d - half];
          dst[d] = rnd<T>(f(rnd<T>(x[d] * f(cp[d]))) + sw * f(sp[d]));
        }
      }
      for (int64_t h = 0; h < nkv; ++h) {
        const T* src = src_row + (nh + nkv + h) * hd;
        std::copy(src, src + hd, v.data_ptr<T>() + ((b * nkv + h) * Tn + t) * hd);
      }
    }
}

// new keys / values [B, nkv, T, hd] quantized into their slots (slots[t] < 0: not kept), positions recorded
template <typename T>
static void store_rows(const Args& a, const std::vector<Tensor>& st, Tensor& pos, const Tensor& k, const Tensor& v,
                       const std::vector<int64_t>& slots) {
  const int64_t D = a.D, ng = a.ng, cw = a.bits == 4 ? D / 2 : D;
  std::vector<float> x(D);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < a.Hkv; ++h)
      for (int64_t t = 0; t < (int64_t)slots.size(); ++t) {
        if (slots[t] < 0) continue;
        const int64_t slot = (b * a.Hkv + h) * a.S + slots[t];
        for (int kv = 0; kv < 2; ++kv) {
          const T* src = (kv ? v : k).data_ptr<T>() + ((b * a.Hkv + h) * slots.size() + t) * D;
          if (a.bits == 16) {  // the store in q's dtype: a copy
            std::copy(src, src + D, (T*)st[3 * kv].data_ptr() + slot * D);
            continue;
          }
          for (int64_t d = 0; d < D; ++d) x[d] = f(src[d]);
          uint8_t* codes = (uint8_t*)st[3 * kv].data_ptr() + slot * cw;
          at::Half* zp = a.bits == 4 ? st[3 * kv + 2].data_ptr<at::Half>() + slot * ng : nullptr;
          quantize_row(x.data(), D, a.bits, a.group, codes, st[3 * kv + 1].data_ptr<at::Half>() + slot * ng, zp);
        }
      }
  int32_t* pp = pos.data_ptr<int32_t>();
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < a.Hp; ++h)
      for (int64_t t = 0; t < (int64_t)slots.size(); ++t)
        if (slots[t] >= 0) pp[(b * a.Hp + h) * a.S + slots[t]] = (int32_t)(a.start + t);
}

}  // namespace kvq

// decode_layer (fused_block.cpp) with its attention over an int8 / int4 store: RoPE, the quantized write of the new
// keys / values into `slots` (and their positions into pos), attention over the store's slots [0, n) (store_first:
// written before, else the new rows attend in q's dtype and are written after); store = {kq, ks, kz, vq, vs, vz}
Tensor decode_layer_kvquant(Tensor x, Tensor attn_norm, std::vector<Tensor> lins, std::vector<int64_t> meta,
                            std::vector<double> thresholds, std::optional<Tensor> q_norm, std::optional<Tensor> k_norm,
                            std::optional<Tensor> attn_post, Tensor mlp_norm, std::optional<Tensor> mlp_post,
                            std::vector<Tensor> store, Tensor pos, std::vector<int64_t> slots, int64_t n, bool store_first,
                            int64_t sinks, int64_t ring, int64_t bits, int64_t group, Tensor cos, Tensor sin,
                            int64_t start, int64_t batch, int64_t nh, int64_t nkv, int64_t window, double eps,
                            bool plus_one, double scale, bool gelu) {
  TORCH_CHECK(store.size() == 6, "store: kq, ks, kz, vq, vs, vz");
  const bool bf16 = cos.scalar_type() == at::kBFloat16;
  return block(x, attn_norm, lins, meta, thresholds, attn_post, mlp_norm, mlp_post, bf16, eps, plus_one, gelu,
               [&](const Tensor& qkv_rows) {
                 const int64_t Tn = x.size(0) / batch, hd = store[0].size(3) * (bits == 4 ? 2 : 1);
                 Tensor qkv = qkv_rows.contiguous().view({batch, Tn, -1});
                 TORCH_CHECK(qkv.scalar_type() == cos.scalar_type() && (int64_t)slots.size() == Tn &&
                                 qkv.size(2) == (nh + 2 * nkv) * hd, "decode_layer_kvquant: qkv, cos and slots");
                 Tensor q = at::empty({batch, nh, Tn, hd}, qkv.options());
                 Tensor k = at::empty({batch, nkv, Tn, hd}, qkv.options()), v = at::empty_like(k);
                 Tensor c = cos.contiguous(), s = sin.contiguous();
                 if (bf16) kvq::rope_split<c10::BFloat16>(qkv, q_norm, k_norm, c, s, nh, nkv, (float)eps, plus_one, q, k, v);
                 else kvq::rope_split<float>(qkv, q_norm, k_norm, c, s, nh, nkv, (float)eps, plus_one, q, k, v);
                 const kvq::Args a = kvq_args(q, store[0], store[1], store[2], store[3], store[4], store[5], pos, n,
                                              store_first ? 0 : Tn, start, bits, group, window, sinks, ring, scale);
                 auto write = [&] {
                   if (bf16) kvq::store_rows<c10::BFloat16>(a, store, pos, k, v, slots);
                   else kvq::store_rows<float>(a, store, pos, k, v, slots);
                 };
                 if (store_first) write();
                 Tensor out = bf16 ? kvq::run<c10::BFloat16>(a, q, k, v) : kvq::run<float>(a, q, k, v);
                 if (!store_first) write();
                 return out.transpose(1, 2).reshape({batch * Tn, nh * hd});
               });
}
