// Scale search of the table grids (leanlm/quant/codebook.py, search_scales; any table of 2..64 levels, so the 3- to
// 6-bit grids): for every group of g
// weights, the scale d minimising sum imp * (x - d * T[nearest(x / d)])^2 over candidates that put the group's
// largest-magnitude weight near either end of the table, each refined to its least-squares scale.
//
// Why a kernel: in torch every candidate is a dozen passes over the whole weight (bucketize alone is ~25 ns
// per weight), which made the scale search 2/3 of GPTQ's time on the table grids. Here a group's 32 weights
// stay in registers for all candidates.
//
// Nearest level without a search: the table's levels are integers (int8), so the midpoints between them are
// multiples of 1/2, and "u <= mid" holds exactly when ceil(2u) <= 2 mid. A lookup table indexed by ceil(2u),
// clamped to [-256, 256], gives torch.bucketize(u, mids)'s index (the level below on a tie) exactly.

// err = sum imp (x - d v)^2 for the levels v chosen at candidate d; writes the least-squares scale to *d_ls.
// lut: 513 floats, lut[j + 256] = the level nearest to any u with ceil(2u) == j. Eight weights at a time (a
// gather of their levels), the tail of a group that is not a multiple of 8 one at a time.
static inline float codebook_candidate(const float* x, const float* imp, int g, float d, const float* lut,
                                       float* d_ls, float* v) {
  const float inv = 1.f / d;
  const int g8 = g & ~7;
  __m256 va = _mm256_setzero_ps(), vb = _mm256_setzero_ps();
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-256.f), hi = _mm256_set1_ps(256.f);
  for (int k = 0; k < g8; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    __m256 u2 = _mm256_mul_ps(_mm256_set1_ps(2.f), _mm256_mul_ps(xv, vinv));
    u2 = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(u2, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC)));
    const __m256i j = _mm256_add_epi32(_mm256_cvtps_epi32(u2), _mm256_set1_epi32(256));
    const __m256 lv = _mm256_i32gather_ps(lut, j, 4);
    _mm256_storeu_ps(v + k, lv);
    const __m256 wv = _mm256_mul_ps(_mm256_loadu_ps(imp + k), lv);
    va = _mm256_fmadd_ps(wv, xv, va);
    vb = _mm256_fmadd_ps(wv, lv, vb);
  }
  float a = hsum8(va), b = hsum8(vb);
  for (int k = g8; k < g; ++k) {
    float u2 = std::ceil(2.f * (x[k] * inv));
    u2 = std::min(256.f, std::max(-256.f, u2));
    const float lv = lut[(int)u2 + 256];
    v[k] = lv;
    const float wv = imp[k] * lv;
    a += wv * x[k];
    b += wv * lv;
  }
  float ls = a / std::max(b, 1e-20f);
  if (ls == 0.f) ls = d;
  __m256 ve = _mm256_setzero_ps();
  const __m256 vls = _mm256_set1_ps(ls);
  for (int k = 0; k < g8; k += 8) {
    const __m256 e = _mm256_fnmadd_ps(vls, _mm256_loadu_ps(v + k), _mm256_loadu_ps(x + k));
    ve = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(imp + k), e), e, ve);
  }
  float err = hsum8(ve);
  for (int k = g8; k < g; ++k) {
    const float e = x[k] - ls * v[k];
    err += imp[k] * e * e;
  }
  *d_ls = ls;
  return err;
}

// x: fp32 [R, g] (R = rows x groups, group-major within a row); imp: fp32 [G, g] (group r % G's input weights) or
// empty (uniform); levels: fp32 [L] (2 <= L <= 64), sorted integers in [-127, 127]. Returns fp32 [R]: each group's
// scale.
static Tensor codebook_search_scales(const Tensor& x, const Tensor& imp, const Tensor& levels, int64_t tries) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [R, g]");
  const int64_t L = levels.numel();
  TORCH_CHECK(L >= 2 && L <= 64 && levels.scalar_type() == at::kFloat, "levels: fp32 [L], 2 <= L <= 64");
  const int64_t R = x.size(0), g = x.size(1);
  TORCH_CHECK(g > 0 && g <= 1024, "group size in [1, 1024]");
  const bool weighted = imp.numel() > 0;
  int64_t G = 1;
  if (weighted) {
    TORCH_CHECK(imp.dim() == 2 && imp.size(1) == g && imp.scalar_type() == at::kFloat && imp.is_contiguous(),
                "imp: contiguous fp32 [G, g]");
    G = imp.size(0);
    TORCH_CHECK(R % G == 0, "x's groups are not a whole number of rows of imp's G groups");
  }
  float lv[64];
  auto lc = levels.contiguous();
  std::memcpy(lv, lc.data_ptr<float>(), L * sizeof(float));
  for (int i = 0; i < L; ++i)
    TORCH_CHECK(lv[i] == std::round(lv[i]) && std::fabs(lv[i]) <= 127.f && (i == 0 || lv[i] > lv[i - 1]),
                "levels must be sorted distinct integers in [-127, 127]");
  // lut[j + 256]: the nearest level to any u with ceil(2u) == j (its index: the count of midpoints m with 2m < j)
  float lut[513];
  for (int j = -256; j <= 256; ++j) {
    int idx = 0;
    for (int i = 0; i + 1 < L; ++i) idx += (lv[i] + lv[i + 1]) < (float)j;
    lut[j + 256] = lv[idx];
  }
  const float lo = lv[0], hi = lv[L - 1];
  auto out = at::empty({R}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* ip = weighted ? imp.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 256, [&](int64_t r0, int64_t r1) {
    std::vector<float> ones(g, 1.f), v(g), w(g);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * g;
      const float* wr = ones.data();
      if (weighted) {
        const float* src = ip + (r % G) * g;
        for (int64_t k = 0; k < g; ++k) w[k] = std::max(src[k], 1e-12f);
        wr = w.data();
      }
      int am = 0;  // first index of the largest magnitude (torch.argmax's tie rule)
      for (int k = 1; k < g; ++k)
        if (std::fabs(xr[k]) > std::fabs(xr[am])) am = k;
      float m = xr[am];
      if (m == 0.f) m = 1.f;
      float best_err = INFINITY, best = m / lo;
      for (int e = 0; e < 2; ++e) {
        const float end = e == 0 ? lo : hi;
        for (int t = -(int)tries; t <= (int)tries; ++t) {
          const float level = end + (end < 0 ? (float)t : -(float)t);
          if (level == 0.f || (level > 0.f) != (end > 0.f)) continue;
          float ls;
          const float err = codebook_candidate(xr, wr, (int)g, m / level, lut, &ls, v.data());
          if (err < best_err) {
            best_err = err;
            best = ls;
          }
        }
      }
      op[r] = best;
    }
  });
  return out;
}
