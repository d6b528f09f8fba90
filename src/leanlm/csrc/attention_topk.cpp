// Query-aware sparse attention for 1..16 new positions (leanlm.attention.sparse): each query attends exactly
// over a subset of its visible keys, chosen per kv head and shared by the query heads of its group (a chosen
// key is read once per group). Softmax runs over the chosen keys only; when the budget covers every visible
// key the result is full attention (attention.cpp's tile arithmetic over the kept keys).
// - SPARSE_QUEST (Quest, Tang et al. 2024): the cache is cut in pages of `page` keys; each page keeps the
//   elementwise min and max of its keys (fp32). A page's score is the upper bound of q.k over it,
//   sum_d max(q_d min_d, q_d max_d), summed over the group's heads; the `budget` best pages are kept, always
//   with the first `sinks` pages and the query's own (most recent) page.
// - SPARSE_TOPK: exact q.k over every visible key, then the `budget` keys whose best logit over the group's
//   heads (relative to that head's largest) is highest. It still reads every key: it saves the value reads.
// Each query's selection and result do not depend on the other rows of the call (batch-invariant).
#include "leanlm.h"

enum SparseMode : int64_t { SPARSE_QUEST = 0, SPARSE_TOPK = 1 };

struct SeqBounds {
  float* mn;
  float* mx;
  int64_t np;  // pages per kv head
};

// min / max of the pages of one sequence touched by positions [lo, hi), recomputed from the cache (keys
// [nkv, L, hd]) over each page's keys [page start, hi): exact also after a rollback rewrote positions
template <typename T>
static void update_bounds(const T* k, int64_t L, const SeqBounds& sb, int64_t nkv, int64_t hd, int64_t lo, int64_t hi,
                          int64_t page) {
  for (int64_t g = 0; g < nkv; ++g)
    for (int64_t p = lo / page; p * page < hi; ++p) {
      float* mn = sb.mn + (g * sb.np + p) * hd;
      float* mx = sb.mx + (g * sb.np + p) * hd;
      std::fill(mn, mn + hd, INFINITY);
      std::fill(mx, mx + hd, -INFINITY);
      for (int64_t j = p * page; j < std::min(hi, (p + 1) * page); ++j) {
        const T* kr = k + (g * L + j) * hd;
        for (int64_t d = 0; d < hd; ++d) {
          const float x = f(kr[d]);
          mn[d] = std::min(mn[d], x);
          mx[d] = std::max(mx[d], x);
        }
      }
    }
}

// upper bound of sum over the group's heads of q_h . k for any key k of a page: sum_h sum_d max(q_hd mn_d, q_hd mx_d)
static inline float page_bound(const float* qg, int64_t G, const float* mn, const float* mx, int64_t hd) {
  __m256 s = _mm256_setzero_ps();
  float r = 0.f;
  for (int64_t h = 0; h < G; ++h) {
    const float* q = qg + h * hd;
    int64_t d = 0;
    for (; d + 8 <= hd; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      s = _mm256_add_ps(s, _mm256_max_ps(_mm256_mul_ps(qv, _mm256_loadu_ps(mn + d)), _mm256_mul_ps(qv, _mm256_loadu_ps(mx + d))));
    }
    for (; d < hd; ++d) r += std::max(q[d] * mn[d], q[d] * mx[d]);
  }
  return r + hsum8(s);
}

// the `keep` best of items (score, index), by score then lower index; the rest dropped
static void keep_best(std::vector<std::pair<float, int64_t>>& items, int64_t keep) {
  if ((int64_t)items.size() <= keep) return;
  auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  std::nth_element(items.begin(), items.begin() + std::max<int64_t>(keep, 0), items.end(), better);
  items.resize(std::max<int64_t>(keep, 0));
}

// q [B, nh, Tn, hd] (rotated) over each sequence's cache; query t of sequence b at position pos_b + t sees
// [lo, pos_b + t] (lo > 0 outside a sliding window) -> [B * Tn, nh * hd]
template <typename T>
static Tensor sparse_impl(const Tensor& q, const std::vector<SeqKV<T>>& seqs, const std::vector<SeqBounds>& bounds,
                          int64_t nkv, int64_t window, double scale, int64_t mode, int64_t budget, int64_t page,
                          int64_t sinks) {
  const int64_t B = q.size(0), nh = q.size(1), Tn = q.size(2), hd = q.size(3), G = nh / nkv;
  const T* qp = q.data_ptr<T>();
  const float sc = (float)scale;
  int64_t max_vis = 1;
  for (const SeqKV<T>& s : seqs) max_vis = std::max(max_vis, s.pos + Tn);
  auto range = [&](int64_t b, int64_t t) {  // visible positions [lo, qpos]
    const int64_t qpos = seqs[b].pos + t;
    return std::make_pair(window > 0 ? std::max<int64_t>(0, qpos - window + 1) : 0, qpos);
  };
  // top-k: every visible logit first, per (row, head, position), kept for the selection and the softmax
  std::vector<float> logits;
  if (mode == SPARSE_TOPK) {
    logits.resize(B * nh * Tn * max_vis);
    at::parallel_for(0, B * nh * Tn, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / (nh * Tn), h = (i / Tn) % nh, t = i % Tn;
        const auto [lo, qpos] = range(b, t);
        const T* qr = qp + i * hd;
        const T* kb = seqs[b].k + (h / G) * seqs[b].len * hd;
        float* s = logits.data() + i * max_vis;
        for (int64_t j = lo; j <= qpos; ++j) s[j] = dot_row(qr, kb + j * hd, hd) * sc;
      }
    });
  }
  // the kept keys of each (row, kv head, position), ascending
  std::vector<std::vector<int64_t>> keep(B * nkv * Tn);
  at::parallel_for(0, B * nkv * Tn, 1, [&](int64_t i0, int64_t i1) {
    std::vector<std::pair<float, int64_t>> items;
    std::vector<float> qg(G * hd), best;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (nkv * Tn), g = (i / Tn) % nkv, t = i % Tn;
      const auto [lo, qpos] = range(b, t);
      std::vector<int64_t>& out = keep[i];
      items.clear();
      if (mode == SPARSE_QUEST) {
        const int64_t p0 = lo / page, p1 = qpos / page;
        if (p1 - p0 + 1 <= budget) {
          for (int64_t j = lo; j <= qpos; ++j) out.push_back(j);
          continue;
        }
        for (int64_t h = 0; h < G; ++h)
          for (int64_t d = 0; d < hd; ++d) qg[h * hd + d] = f(qp[((b * nh + g * G + h) * Tn + t) * hd + d]);
        const SeqBounds& sb = bounds[b];
        std::vector<int64_t> pages;
        for (int64_t p = p0; p <= p1; ++p) {
          if (p < sinks || p == p1) {
            pages.push_back(p);
            continue;
          }
          const float* mn = sb.mn + (g * sb.np + p) * hd;
          const float* mx = sb.mx + (g * sb.np + p) * hd;
          items.emplace_back(page_bound(qg.data(), G, mn, mx, hd), p);
        }
        keep_best(items, budget - (int64_t)pages.size());
        for (const auto& it : items) pages.push_back(it.second);
        std::sort(pages.begin(), pages.end());
        for (int64_t p : pages)
          for (int64_t j = std::max(lo, p * page); j <= std::min(qpos, p * page + page - 1); ++j) out.push_back(j);
      } else {
        if (qpos - lo + 1 <= budget) {
          for (int64_t j = lo; j <= qpos; ++j) out.push_back(j);
          continue;
        }
        // a key's score: its best logit over the group's heads, each relative to that head's largest logit
        best.assign(qpos + 1, -INFINITY);
        for (int64_t h = 0; h < G; ++h) {
          const float* s = logits.data() + ((b * nh + g * G + h) * Tn + t) * max_vis;
          float m = -INFINITY;
          for (int64_t j = lo; j <= qpos; ++j) m = std::max(m, s[j]);
          for (int64_t j = lo; j <= qpos; ++j) best[j] = std::max(best[j], s[j] - m);
        }
        for (int64_t j = lo; j <= qpos; ++j) items.emplace_back(best[j], j);
        keep_best(items, budget);
        for (const auto& it : items) out.push_back(it.second);
        std::sort(out.begin(), out.end());
      }
    }
  });
  // softmax(q k^T) v over the kept keys, per (row, kv head, position): the kept keys are gathered in tiles,
  // widened once for the group's query heads, with attention.cpp's tile arithmetic (dots8, online softmax)
  Tensor out = at::empty({B * Tn, nh * hd}, q.options());
  T* op = out.data_ptr<T>();
  const int64_t hp = (hd + 7) / 8 * 8;
  at::parallel_for(0, B * nkv * Tn, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(G * hp, 0.f), kf(att::TK * hp, 0.f), vf(att::TK * hp, 0.f), acc(G * hp), m(G), l(G);
    alignas(32) float p[att::TK];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (nkv * Tn), g = (i / Tn) % nkv, t = i % Tn;
      const std::vector<int64_t>& ks = keep[i];
      const T* kb = seqs[b].k + g * seqs[b].len * hd;
      const T* vb = seqs[b].v + g * seqs[b].len * hd;
      for (int64_t h = 0; h < G; ++h) {
        const T* src = qp + ((b * nh + g * G + h) * Tn + t) * hd;
        for (int64_t d = 0; d < hd; ++d) qf[h * hp + d] = f(src[d]) * sc;
      }
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t n = ks.size();
      for (int64_t c0 = 0; c0 < n; c0 += att::TK) {
        const int64_t cnt = std::min<int64_t>(att::TK, n - c0), jn = (cnt + 7) / 8 * 8;
        for (int64_t j = 0; j < cnt; ++j) {
          widen_rows<T>(kb + ks[c0 + j] * hd, 1, hd, hp, kf.data() + j * hp);
          widen_rows<T>(vb + ks[c0 + j] * hd, 1, hd, hp, vf.data() + j * hp);
        }
        for (int64_t j = cnt; j < jn; ++j) std::fill(kf.data() + j * hp, kf.data() + (j + 1) * hp, 0.f);
        for (int64_t h = 0; h < G; ++h)
          tile_softmax_pv(qf.data() + h * hp, kf.data(), vf.data(), hp, cnt, p, m[h], l[h], acc.data() + h * hp);
      }
      for (int64_t h = 0; h < G; ++h) {
        T* o = op + (b * Tn + t) * nh * hd + (g * G + h) * hd;
        const float inv = 1.f / l[h];
        for (int64_t d = 0; d < hd; ++d) o[d] = rnd<T>(acc[h * hp + d] * inv);
      }
    }
  });
  return out;
}

static void check_sparse(const Tensor& cache_k, const Tensor& cache_v, const Tensor& kmin, const Tensor& kmax,
                         int64_t mode, int64_t budget, int64_t page) {
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous() && cache_k.dim() == 4, "cache [B, nkv, L, hd], contiguous");
  TORCH_CHECK(mode == SPARSE_QUEST || mode == SPARSE_TOPK, "mode: 0 (quest) or 1 (topk)");
  TORCH_CHECK(budget >= 1 && page >= 1, "budget and page >= 1");
  if (mode == SPARSE_QUEST) {
    TORCH_CHECK(kmin.scalar_type() == at::kFloat && kmax.scalar_type() == at::kFloat && kmin.is_contiguous() &&
                    kmax.is_contiguous() && kmin.sizes() == kmax.sizes() && kmin.dim() == 4,
                "page bounds: contiguous fp32 [B, nkv, pages, hd]");
    TORCH_CHECK(kmin.size(0) >= cache_k.size(0), "bounds per batch row");
    TORCH_CHECK(kmin.size(1) == cache_k.size(1) && kmin.size(3) == cache_k.size(3) &&
                    kmin.size(2) * page >= cache_k.size(2), "page bounds cover the cache");
  }
}

static std::vector<SeqBounds> seq_bounds(const Tensor& kmin, const Tensor& kmax, int64_t B, int64_t mode) {
  std::vector<SeqBounds> out;
  if (mode != SPARSE_QUEST) return std::vector<SeqBounds>(B, SeqBounds{nullptr, nullptr, 0});
  const int64_t stride = kmin.size(1) * kmin.size(2) * kmin.size(3);
  for (int64_t b = 0; b < B; ++b)
    out.push_back({kmin.data_ptr<float>() + b * stride, kmax.data_ptr<float>() + b * stride, kmin.size(2)});
  return out;
}

// attention of rotated queries q [B, nh, T, hd] at positions pos.. over the cache (already holding their keys)
// -> [B * T, nh * hd]; the Python path of a sparse cache (runtime.Attention -> SparseCache.attend)
Tensor sparse_attention(Tensor q, Tensor cache_k, Tensor cache_v, Tensor kmin, Tensor kmax, int64_t pos,
                        int64_t window, double scale, int64_t mode, int64_t budget, int64_t page, int64_t sinks) {
  check_sparse(cache_k, cache_v, kmin, kmax, mode, budget, page);
  Tensor qc = q.contiguous();
  TORCH_CHECK(qc.dim() == 4 && qc.scalar_type() == cache_k.scalar_type() && cache_v.scalar_type() == cache_k.scalar_type(),
              "q [B, nh, T, hd] in the cache dtype");
  TORCH_CHECK(qc.size(0) <= cache_k.size(0) && qc.size(3) == cache_k.size(3) && qc.size(1) % cache_k.size(1) == 0,
              "q's batch, heads and head size fit the cache");
  TORCH_CHECK(pos >= 0 && pos + qc.size(2) <= cache_k.size(2), "positions within the cache");
  const int64_t B = qc.size(0), nkv = cache_k.size(1);
  if (qc.scalar_type() == at::kBFloat16)
    return sparse_impl<c10::BFloat16>(qc, shared_kv<c10::BFloat16>(cache_k, cache_v, B, pos),
                                      seq_bounds(kmin, kmax, B, mode), nkv, window, scale, mode, budget,
                                      page, sinks);
  TORCH_CHECK(qc.scalar_type() == at::kFloat, "fp32 or bf16");
  return sparse_impl<float>(qc, shared_kv<float>(cache_k, cache_v, B, pos), seq_bounds(kmin, kmax, B, mode), nkv,
                            window, scale, mode, budget, page, sinks);
}

template <typename T>
static Tensor sparse_attend_impl(const Tensor& qkv, const std::optional<Tensor>& q_norm,
                                 const std::optional<Tensor>& k_norm, Tensor& cache_k, Tensor& cache_v,
                                 const Tensor& kmin, const Tensor& kmax, const Tensor& cos, const Tensor& sin,
                                 int64_t pos, int64_t nh, int64_t nkv, int64_t window, float eps, bool plus_one,
                                 double scale, int64_t mode, int64_t budget, int64_t page, int64_t sinks) {
  const int64_t B = qkv.size(0), Tn = qkv.size(1), hd = cache_k.size(3), L = cache_k.size(2);
  auto seqs = shared_kv<T>(cache_k, cache_v, B, pos);
  Tensor q = rope_write<T>(qkv, q_norm, k_norm, seqs, cos, sin, 0, hd, nh, nkv, eps, plus_one);
  auto sb = seq_bounds(kmin, kmax, B, mode);
  if (mode == SPARSE_QUEST)
    for (int64_t b = 0; b < B; ++b) update_bounds<T>(seqs[b].k, L, sb[b], nkv, hd, pos, pos + Tn, page);
  return sparse_impl<T>(q, seqs, sb, nkv, window, scale, mode, budget, page, sinks);
}

// `attend` (RoPE, K/V write) + the page bounds' update + sparse attention: qkv [B, T, row] -> [B * T, nh * hd]
Tensor sparse_attend(Tensor qkv, std::optional<Tensor> q_norm, std::optional<Tensor> k_norm, Tensor cache_k,
                     Tensor cache_v, Tensor kmin, Tensor kmax, Tensor cos, Tensor sin, int64_t pos, int64_t nh,
                     int64_t nkv, int64_t window, double eps, bool plus_one, double scale, int64_t mode, int64_t budget,
                     int64_t page, int64_t sinks) {
  check_sparse(cache_k, cache_v, kmin, kmax, mode, budget, page);
  Tensor x = qkv.contiguous();
  TORCH_CHECK(x.scalar_type() == cache_k.scalar_type() && cos.scalar_type() == cache_k.scalar_type(), "dtypes");
  TORCH_CHECK(x.dim() == 3 && pos >= 0 && pos + x.size(1) <= cache_k.size(2), "qkv [B, T, row] within the cache");
  TORCH_CHECK(cache_k.size(0) >= x.size(0), "a cache row per batch row");
  Tensor c = cos.contiguous(), s = sin.contiguous();
  if (x.scalar_type() == at::kBFloat16)
    return sparse_attend_impl<c10::BFloat16>(x, q_norm, k_norm, cache_k, cache_v, kmin, kmax, c, s, pos, nh, nkv,
                                             window, (float)eps, plus_one, scale, mode, budget, page, sinks);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fp32 or bf16");
  return sparse_attend_impl<float>(x, q_norm, k_norm, cache_k, cache_v, kmin, kmax, c, s, pos, nh, nkv, window,
                                   (float)eps, plus_one, scale, mode, budget, page, sinks);
}

// decode_layer (fused_block.cpp) with sparse_attend as its attention: the whole block in one call
Tensor decode_layer_sparse(Tensor x, Tensor attn_norm, std::vector<Tensor> lins, std::vector<int64_t> meta,
                           std::vector<double> thresholds, std::optional<Tensor> q_norm, std::optional<Tensor> k_norm,
                           std::optional<Tensor> attn_post, Tensor mlp_norm, std::optional<Tensor> mlp_post,
                           Tensor cache_k, Tensor cache_v, Tensor kmin, Tensor kmax, Tensor cos, Tensor sin, int64_t pos,
                           int64_t batch, int64_t nh, int64_t nkv, int64_t window, double eps, bool plus_one,
                           double scale, bool gelu, int64_t mode, int64_t budget, int64_t page, int64_t sinks) {
  const bool bf16 = cache_k.scalar_type() == at::kBFloat16;
  return block(x, attn_norm, lins, meta, thresholds, attn_post, mlp_norm, mlp_post, bf16, eps, plus_one, gelu,
               [&](const Tensor& qkv) {
                 return sparse_attend(qkv.view({batch, x.size(0) / batch, -1}), q_norm, k_norm, cache_k, cache_v, kmin,
                                      kmax, cos, sin, pos, nh, nkv, window, eps, plus_one, scale, mode, budget, page,
                                      sinks);
               });
}
