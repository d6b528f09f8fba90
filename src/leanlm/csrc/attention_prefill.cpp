// Causal attention for many new positions (prefill), fp32 math on AVX-512: out = softmax(q k^T * scale) v.
//
// Why: ATen's CPU flash attention ran SmolLM2's 512-token prefill (9 heads of 64, 3 KV heads) at ~40 GFLOP/s on
// one core, a quarter of a 512-token prefill's time with the int8 GEMM. Here each task takes 8 query rows of
// one head: their scores against every visible key come from one pass over K^T (8 rows share each load), the
// softmax runs over those rows in a scratch buffer, and P.V runs 4 rows at a time (4 rows share each V load).
// K^T and V are widened to fp32 once per call, shared by the heads of a KV group (GQA: query head h reads KV
// head h / (nh / nkv), as transformers and SDPA's enable_gqa do). Key j is visible to the query at position p
// when j <= p and (window == 0 or j > p - window); the query rows are positions start .. start + T - 1.
//
// Numerics: fp32 scores, a max-subtracted exp (a degree-6 polynomial of the reduced argument scaled by
// 2^n, ~1 ulp), fp32 sums; the output is rounded to q's dtype. Not batch-invariant with the decode path
// (attention.cpp), which keeps every forward of <= 16 new positions.
#include "leanlm.h"

#define LEANLM_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))

namespace attn_prefill {

constexpr int R = 8;   // query rows per task
constexpr int KB = 16;  // keys per score vector

LEANLM_AVX512 static inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

template <typename T>
static inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f(src[i]);
}

struct Shape {
  int64_t B, nh, nkv, T, S, hd, Sp, start, window;
  float scale;
};

// 8 (or fewer) query rows of one head against keys [lo, hi): scores, softmax, P.V -> out rows
LEANLM_AVX512 static void rows_task(const Shape& s, const float* q, const float* kt, const float* v, int64_t t0,
                                    int rows, float* sc, float* o) {
  const int64_t hd = s.hd, Sp = s.Sp;
  int64_t lo[R], hi[R];
  int64_t lo_all = INT64_MAX, hi_all = 0;
  for (int r = 0; r < rows; ++r) {
    const int64_t p = s.start + t0 + r;
    hi[r] = std::min<int64_t>(p + 1, s.S);
    lo[r] = s.window > 0 ? std::max<int64_t>(0, p - s.window + 1) : 0;
    lo_all = std::min(lo_all, lo[r]);
    hi_all = std::max(hi_all, hi[r]);
  }
  const int64_t j0 = lo_all / KB * KB;
  for (int64_t j = j0; j < hi_all; j += KB) {  // scores: kt is [hd][Sp]
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < hd; ++d) {
      const __m512 kv = _mm512_loadu_ps(kt + d * Sp + j);
      for (int r = 0; r < R; ++r)
        if (r < rows) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * hd + d]), kv, acc[r]);
    }
    for (int r = 0; r < rows; ++r) _mm512_storeu_ps(sc + r * Sp + j, _mm512_mul_ps(acc[r], _mm512_set1_ps(s.scale)));
  }
  for (int r = 0; r < rows; ++r) {  // softmax over the row's visible keys; zeros elsewhere in [j0, hi_all)
    float* row = sc + r * Sp;
    float mx = -INFINITY;
    for (int64_t j = lo[r]; j < hi[r]; ++j) mx = std::max(mx, row[j]);
    const __m512 vm = _mm512_set1_ps(mx);
    __m512 vs = _mm512_setzero_ps();
    for (int64_t j = j0; j < hi_all; j += KB) {
      const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)j),
                                           _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
      const __mmask16 vis = _mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32((int)lo[r])) &
                            _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32((int)hi[r]));
      const __m512 e = _mm512_maskz_mov_ps(vis, exp512(_mm512_sub_ps(_mm512_loadu_ps(row + j), vm)));
      _mm512_storeu_ps(row + j, e);
      vs = _mm512_add_ps(vs, e);
    }
    const float inv = 1.f / _mm512_reduce_add_ps(vs);
    for (int64_t j = j0; j < hi_all; j += KB) _mm512_storeu_ps(row + j, _mm512_mul_ps(_mm512_loadu_ps(row + j), _mm512_set1_ps(inv)));
  }
  for (int r0 = 0; r0 < rows; r0 += 4) {  // P.V, 4 rows share each V row load; v is [Sp][hd], hd % 16 == 0
    const int rr = std::min(4, rows - r0);
    for (int64_t d0 = 0; d0 < hd; d0 += 64) {
      const int nd = (int)std::min<int64_t>(4, (hd - d0) / 16);
      __m512 acc[4][4];
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
      for (int64_t j = j0; j < hi_all; ++j) {
        __m512 vv[4];
        for (int c = 0; c < 4; ++c)
          if (c < nd) vv[c] = _mm512_loadu_ps(v + j * hd + d0 + c * 16);
        for (int r = 0; r < 4; ++r) {
          if (r >= rr) break;
          const __m512 p = _mm512_set1_ps(sc[(r0 + r) * Sp + j]);
          for (int c = 0; c < 4; ++c)
            if (c < nd) acc[r][c] = _mm512_fmadd_ps(p, vv[c], acc[r][c]);
        }
      }
      for (int r = 0; r < rr; ++r)
        for (int c = 0; c < nd; ++c) _mm512_storeu_ps(o + (r0 + r) * hd + d0 + c * 16, acc[r][c]);
    }
  }
}

template <typename T>
LEANLM_AVX512 static void run(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, const Shape& s) {
  // K^T [B, nkv, hd, Sp] and V [B, nkv, Sp, hd] in fp32 (keys past S are zero)
  std::vector<float> kt(s.B * s.nkv * s.hd * s.Sp, 0.f), vf(s.B * s.nkv * s.Sp * s.hd, 0.f);
  const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *qp = q.data_ptr<T>();
  at::parallel_for(0, s.B * s.nkv, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g / s.nkv, h = g % s.nkv;
      float* ktg = kt.data() + g * s.hd * s.Sp;
      for (int64_t j = 0; j < s.S; ++j) {
        const T* kr = kp + b * k.stride(0) + h * k.stride(1) + j * k.stride(2);
        for (int64_t d = 0; d < s.hd; ++d) ktg[d * s.Sp + j] = f(kr[d]);
        to_float(vp + b * v.stride(0) + h * v.stride(1) + j * v.stride(2), vf.data() + (g * s.Sp + j) * s.hd, s.hd);
      }
    }
  });
  const int64_t blocks = (s.T + R - 1) / R, group = s.nh / s.nkv;
  T* op = out.data_ptr<T>();  // [B, T, nh, hd]
  // tasks from a shared counter, longest (latest rows, most keys) first: a thread that lost its core on a busy
  // machine does not hold up the others with a fixed share
  const int64_t tasks = s.B * s.nh * blocks;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> sc(R * s.Sp), qf(R * s.hd), of(R * s.hd);
    for (int64_t i = next++; i < tasks; i = next++) {
      const int64_t task = tasks - 1 - i;
      const int64_t blk = task % blocks, h = task / blocks % s.nh, b = task / blocks / s.nh;
      const int64_t t0 = blk * R;
      const int rows = (int)std::min<int64_t>(R, s.T - t0);
      for (int r = 0; r < rows; ++r)
        to_float(qp + b * q.stride(0) + h * q.stride(1) + (t0 + r) * q.stride(2), qf.data() + r * s.hd, s.hd);
      const int64_t g = b * s.nkv + h / group;
      rows_task(s, qf.data(), kt.data() + g * s.hd * s.Sp, vf.data() + g * s.Sp * s.hd, t0, rows, sc.data(), of.data());
      for (int r = 0; r < rows; ++r) {
        T* dst = op + ((b * s.T + t0 + r) * s.nh + h) * s.hd;
        for (int64_t d = 0; d < s.hd; ++d) dst[d] = rnd<T>(of[r * s.hd + d]);
      }
    }
  });
}

}  // namespace attn_prefill

static bool prefill_attention_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// q [B, nh, T, hd], k / v [B, nkv, S, hd] (fp32 or bf16, last dim contiguous, any other strides) ->
// [B, T, nh * hd] in q's dtype; query t is at position start + t
Tensor prefill_attention(Tensor q, Tensor k, Tensor v, double scale, int64_t start, int64_t window) {
  TORCH_CHECK(prefill_attention_supported(), "prefill_attention: this CPU lacks AVX-512");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "prefill_attention: 4-D q, k, v");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
              (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16), "prefill_attention: fp32 / bf16");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "prefill_attention: contiguous last dim");
  attn_prefill::Shape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 0, start, window, (float)scale};
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B && v.size(1) == s.nkv && v.size(2) == s.S && k.size(3) == s.hd &&
              v.size(3) == s.hd && s.nkv > 0 && s.nh % s.nkv == 0 && s.hd % 16 == 0, "prefill_attention: bad shapes");
  TORCH_CHECK(start >= 0 && start + s.T <= s.S, "prefill_attention: queries past the keys");
  s.Sp = (s.S + attn_prefill::KB - 1) / attn_prefill::KB * attn_prefill::KB;
  Tensor out = at::empty({s.B, s.T, s.nh * s.hd}, q.options());
  if (q.scalar_type() == at::kFloat) attn_prefill::run<float>(q, k, v, out, s);
  else attn_prefill::run<c10::BFloat16>(q, k, v, out, s);
  return out;
}
