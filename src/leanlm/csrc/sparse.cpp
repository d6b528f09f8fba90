// Input-sparse products (sparse): y = sum over |x_i| > t of x_i * W^T[i, :], for leanlm.adaptive's
// activation sparsity at decode.
//
// Why: with the weight stored transposed ([in, out]) every input owns one contiguous row, so an
// input-sparse product streams only the rows of the active inputs. `F.embedding_bag` does that but
// spends ~7 dispatched ops (abs, compare, nonzero, gather, ...) and reads a row slower than a dense
// GEMV streams; this loop does the thresholding, index list and row sweep in one call, keeping the
// output slice in L1 while each active row streams through once (fp32 accumulation; bf16 weights
// widened by a shift). With several threads each sweeps its share of the active rows.
// benchmarks/bench_adaptive.py times it per shape ("kernel_us"): gathering rows is dearer than
// streaming them, so sparsity pays back well below its fraction of skipped weights.
//
// int8 weights (leanlm.quant's int8 per-output-channel grid, codes stored transposed [K, N] as int8):
// y_j = s_j * sum_{active i} x_i * q[i, j] (+ z_j * sum_{active i} x_i when asymmetric); the codes are
// widened to fp32 and accumulated in fp32 as above, the scale applied once at the end. A quarter of the
// bf16 bytes per row, so the gaps between active rows matter more: see sweep_i8.
#include "leanlm.h"

template <bool BF16>
static inline __m256 load8(const void* w, int64_t j) {
  return BF16 ? bf16x8((const uint16_t*)w + j) : _mm256_loadu_ps((const float*)w + j);
}

// y[j0, j1) = sum_t val[t] * W^T[idx[t], j0:j1). Eight active rows per sweep over the output slice
// (one load and store of y per 8 FMAs, not per FMA), and the rows SPARSE_PD ahead are prefetched: the
// active rows are known up front, and their gaps otherwise stall the hardware prefetcher (at 30%
// sparsity one row at a time took as long as the dense product).
constexpr int SPARSE_RB = 8, SPARSE_PD = 8;

template <bool BF16>
static void sweep(const int* idx, const float* val, int64_t T, const void* wt, float* y, int64_t N, int64_t j0,
                  int64_t j1) {
  for (int64_t j = j0; j < j1; j += 8) _mm256_storeu_ps(y + j, _mm256_setzero_ps());
  const int64_t esz = BF16 ? 2 : 4;
  auto row = [&](int64_t t) { return (const char*)wt + (int64_t)idx[t] * N * esz; };
  auto prefetch = [&](int64_t t) {
    if (t >= T) return;
    const char* r = row(t) + j0 * esz;
    for (int64_t o = 0; o < (j1 - j0) * esz; o += 64) _mm_prefetch(r + o, _MM_HINT_T0);
  };
  for (int64_t t = 0; t < SPARSE_PD; ++t) prefetch(t);
  int64_t t = 0;
  for (; t + SPARSE_RB <= T; t += SPARSE_RB) {
    for (int u = 0; u < SPARSE_RB; ++u) prefetch(t + SPARSE_PD + u);
    __m256 v[SPARSE_RB];
    const char* r[SPARSE_RB];
    for (int u = 0; u < SPARSE_RB; ++u) v[u] = _mm256_set1_ps(val[t + u]), r[u] = row(t + u);
    for (int64_t j = j0; j < j1; j += 8) {
      __m256 a = _mm256_loadu_ps(y + j);
      for (int u = 0; u < SPARSE_RB; ++u) a = _mm256_fmadd_ps(v[u], load8<BF16>(r[u], j), a);
      _mm256_storeu_ps(y + j, a);
    }
  }
  for (; t < T; ++t) {
    const __m256 v = _mm256_set1_ps(val[t]);
    const char* r = row(t);
    for (int64_t j = j0; j < j1; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(v, load8<BF16>(r, j), _mm256_loadu_ps(y + j)));
  }
}

// AVX-512 copy of the int8 sweep whatever the build's level (run only where the CPU has it)
#define LEANLM_SPARSE512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))
static inline bool sparse_cpu_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

// eight / sixteen int8 codes widened to fp32
static inline __m256 i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
LEANLM_SPARSE512 static inline __m512 i8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

// y[0, N) = sum_t val[t] * q[idx[t], :] (int8 codes; the caller applies the scales). Eight active rows per
// sweep as above, but the next eight rows are prefetched one line each per 64 columns inside the sweep, not
// all up front: an int8 row of a down projection is only ~14 lines, too short for the hardware prefetcher,
// and a burst of prefetches at each group's start left the loop waiting on them (Qwen2.5-0.5B's down,
// 4864 x 896 at 50%, one thread, a standalone microbenchmark: 10 vs 6 GB/s of active rows). Each column
// sums its rows in the same order in both copies (AVX2: 8 columns a vector; AVX-512: 16), so they give the
// same numbers bit for bit.
struct I8Rows {  // the active rows' pointers; past the end, the last row (prefetched for nothing, never read)
  const int* idx;
  int64_t T, N;
  const int8_t* wt;
  const int8_t* operator()(int64_t t) const { return wt + (int64_t)idx[std::min(t, T - 1)] * N; }
};

// the first group's rows, up front
static inline void i8_prefetch_first(const I8Rows& row) {
  for (int64_t t = 0; t < std::min<int64_t>(row.T, SPARSE_RB); ++t)
    for (int64_t o = 0; o < row.N; o += 64) _mm_prefetch((const char*)row(t) + o, _MM_HINT_T0);
}

// columns [j, N) of one group of SPARSE_RB rows (N % 64 of them), then the rows after the last whole group
static inline void i8_group_tail(const int8_t* const* r, const float* val, float* y, int64_t j, int64_t N) {
  for (; j < N; j += 8) {
    __m256 a = _mm256_loadu_ps(y + j);
    for (int u = 0; u < SPARSE_RB; ++u) a = _mm256_fmadd_ps(_mm256_set1_ps(val[u]), i8x8(r[u] + j), a);
    _mm256_storeu_ps(y + j, a);
  }
}
static inline void i8_row_tail(const I8Rows& row, const float* val, int64_t t, float* y) {
  for (; t < row.T; ++t) {
    const __m256 v = _mm256_set1_ps(val[t]);
    const int8_t* r = row(t);
    for (int64_t j = 0; j < row.N; j += 8)
      _mm256_storeu_ps(y + j, _mm256_fmadd_ps(v, i8x8(r + j), _mm256_loadu_ps(y + j)));
  }
}

static void sweep_i8(const int* idx, const float* val, int64_t T, const int8_t* wt, float* y, int64_t N) {
  std::memset(y, 0, N * sizeof(float));
  if (T == 0) return;
  const I8Rows row{idx, T, N, wt};
  i8_prefetch_first(row);
  int64_t t = 0;
  for (; t + SPARSE_RB <= T; t += SPARSE_RB) {
    const int8_t *r[SPARSE_RB], *p[SPARSE_RB];
    __m256 v[SPARSE_RB];
    for (int u = 0; u < SPARSE_RB; ++u)
      r[u] = row(t + u), p[u] = row(t + SPARSE_RB + u), v[u] = _mm256_set1_ps(val[t + u]);
    int64_t j = 0;
    for (; j + 64 <= N; j += 64) {
      for (int u = 0; u < SPARSE_RB; ++u) _mm_prefetch((const char*)p[u] + j, _MM_HINT_T0);
      for (int64_t h = j; h < j + 64; h += 32) {  // four accumulators: 16 ymm registers hold no more
        __m256 a0 = _mm256_loadu_ps(y + h), a1 = _mm256_loadu_ps(y + h + 8), a2 = _mm256_loadu_ps(y + h + 16),
               a3 = _mm256_loadu_ps(y + h + 24);
        for (int u = 0; u < SPARSE_RB; ++u) {
          a0 = _mm256_fmadd_ps(v[u], i8x8(r[u] + h), a0);
          a1 = _mm256_fmadd_ps(v[u], i8x8(r[u] + h + 8), a1);
          a2 = _mm256_fmadd_ps(v[u], i8x8(r[u] + h + 16), a2);
          a3 = _mm256_fmadd_ps(v[u], i8x8(r[u] + h + 24), a3);
        }
        _mm256_storeu_ps(y + h, a0), _mm256_storeu_ps(y + h + 8, a1);
        _mm256_storeu_ps(y + h + 16, a2), _mm256_storeu_ps(y + h + 24, a3);
      }
    }
    i8_group_tail(r, val + t, y, j, N);
  }
  i8_row_tail(row, val, t, y);
}

LEANLM_SPARSE512 static void sweep_i8_avx512(const int* idx, const float* val, int64_t T, const int8_t* wt, float* y,
                                          int64_t N) {
  std::memset(y, 0, N * sizeof(float));
  if (T == 0) return;
  const I8Rows row{idx, T, N, wt};
  i8_prefetch_first(row);
  int64_t t = 0;
  for (; t + SPARSE_RB <= T; t += SPARSE_RB) {
    const int8_t *r[SPARSE_RB], *p[SPARSE_RB];
    __m512 v[SPARSE_RB];
    for (int u = 0; u < SPARSE_RB; ++u)
      r[u] = row(t + u), p[u] = row(t + SPARSE_RB + u), v[u] = _mm512_set1_ps(val[t + u]);
    int64_t j = 0;
    for (; j + 64 <= N; j += 64) {
      for (int u = 0; u < SPARSE_RB; ++u) _mm_prefetch((const char*)p[u] + j, _MM_HINT_T0);
      __m512 a0 = _mm512_loadu_ps(y + j), a1 = _mm512_loadu_ps(y + j + 16), a2 = _mm512_loadu_ps(y + j + 32),
             a3 = _mm512_loadu_ps(y + j + 48);
      for (int u = 0; u < SPARSE_RB; ++u) {
        a0 = _mm512_fmadd_ps(v[u], i8x16(r[u] + j), a0);
        a1 = _mm512_fmadd_ps(v[u], i8x16(r[u] + j + 16), a1);
        a2 = _mm512_fmadd_ps(v[u], i8x16(r[u] + j + 32), a2);
        a3 = _mm512_fmadd_ps(v[u], i8x16(r[u] + j + 48), a3);
      }
      _mm512_storeu_ps(y + j, a0), _mm512_storeu_ps(y + j + 16, a1);
      _mm512_storeu_ps(y + j + 32, a2), _mm512_storeu_ps(y + j + 48, a3);
    }
    i8_group_tail(r, val + t, y, j, N);
  }
  i8_row_tail(row, val, t, y);
}

// the AVX-512 copy where the CPU has it, for rows under 2048 columns: it was ~10% faster on the short rows of a
// down projection and no faster on long ones (one thread, Zen 4); set_sparse_avx512(false) keeps the AVX2 copy
static bool sparse_avx512_allowed = true;
static bool set_sparse_avx512(bool allowed) {
  const bool before = sparse_avx512_allowed;
  sparse_avx512_allowed = allowed;
  return before;
}
static void sweep_i8_any(const int* idx, const float* val, int64_t T, const int8_t* wt, float* y, int64_t N) {
  static const bool cpu = sparse_cpu_avx512();
  if (cpu && sparse_avx512_allowed && N < 2048) sweep_i8_avx512(idx, val, T, wt, y, N);
  else sweep_i8(idx, val, T, wt, y, N);
}

// y [M, N] fp32 = (x * (|x| > threshold)) [M, K] . wt [K, N], one sweep per row: a row's result
// does not depend on M (batch-invariant). With several threads the active rows are split between
// them, each sweeping whole rows into its own partial output, summed in thread order (splitting the
// outputs instead left each thread short runs of every row: at 2 threads in bf16 that was no faster
// than the dense product at 30% sparsity). Returns the active inputs summed over the rows.
// int8 wt: the sum of every row is then scaled per output (fp32 `scales` [N]) and, with `zeros` [N], gets
// zeros * (the active inputs' sum).
static int64_t sparse_rows(const at::Tensor& x, const at::Tensor& wt, double threshold, float* y,
                           const float* scales = nullptr, const float* zeros = nullptr) {
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = wt.size(0), N = wt.size(1);
  const bool bf16 = wt.scalar_type() == at::kBFloat16, i8 = wt.scalar_type() == at::kChar;
  const void* wp = wt.data_ptr();
  const float t = (float)threshold;
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  std::vector<int> idx(K);
  std::vector<float> val(K), part(nt > 1 ? (nt - 1) * N : 0);
  int64_t active = 0;
  for (int64_t m = 0; m < M; ++m) {
    const float* xp = xf.data_ptr<float>() + m * K;
    float* ym = y + m * N;
    int64_t T = 0;
    for (int64_t k = 0; k < K; ++k)
      if (std::fabs(xp[k]) > t) idx[T] = (int)k, val[T++] = xp[k];
    active += T;
    const int64_t parts = T >= 64 ? nt : 1;  // (a few rows are not worth waking threads for)
    auto run = [&](int64_t p) {
      const int64_t a = T * p / parts, b = T * (p + 1) / parts;
      float* dst = p == 0 ? ym : part.data() + (p - 1) * N;
      if (i8) sweep_i8_any(idx.data() + a, val.data() + a, b - a, (const int8_t*)wp, dst, N);
      else if (bf16) sweep<true>(idx.data() + a, val.data() + a, b - a, wp, dst, N, 0, N);
      else sweep<false>(idx.data() + a, val.data() + a, b - a, wp, dst, N, 0, N);
    };
    if (parts == 1) {
      run(0);
    } else {
      at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) run(p);
      });
      for (int64_t p = 1; p < parts; ++p) {
        const float* src = part.data() + (p - 1) * N;
        for (int64_t j = 0; j < N; ++j) ym[j] += src[j];
      }
    }
    if (scales) {
      float xsum = 0.f;
      if (zeros)
        for (int64_t t = 0; t < T; ++t) xsum += val[t];
      for (int64_t j = 0; j < N; ++j) ym[j] = zeros ? ym[j] * scales[j] + zeros[j] * xsum : ym[j] * scales[j];
    }
  }
  return active;
}

// int8 wt's per-output scales (and zeros): contiguous fp32 [N] (the zeros may be empty)
static std::pair<const float*, const float*> i8_scales(const at::Tensor& wt, const at::Tensor& scales,
                                                       const at::Tensor& zeros) {
  if (wt.scalar_type() != at::kChar) return {nullptr, nullptr};
  const int64_t N = wt.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N,
              "sparse_linear: int8 wt needs fp32 scales [N]");
  TORCH_CHECK(!zeros.numel() || (zeros.scalar_type() == at::kFloat && zeros.is_contiguous() && zeros.numel() == N),
              "sparse_linear: zeros must be fp32 [N] or empty");
  return {scales.data_ptr<float>(), zeros.numel() ? zeros.data_ptr<float>() : nullptr};
}

// x [M, K] (or [K]; any float dtype), wt [K, N] fp32, bf16 or int8 (with scales [N], optional zeros [N]),
// contiguous, N % 8 == 0 -> (y [M, N] fp32, active inputs summed over the rows)
std::tuple<at::Tensor, int64_t> sparse_linear(at::Tensor x, at::Tensor wt, double threshold, at::Tensor scales,
                                              at::Tensor zeros) {
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous() && wt.size(1) % 8 == 0 &&
              (wt.scalar_type() == at::kFloat || wt.scalar_type() == at::kBFloat16 || wt.scalar_type() == at::kChar),
              "sparse_linear: wt [K, N % 8 == 0] fp32/bf16/int8");
  TORCH_CHECK(x.size(-1) == wt.size(0), "sparse_linear: x [.., K] does not match wt [K, N]");
  const auto sz = i8_scales(wt, scales, zeros);
  at::Tensor x2 = x.reshape({-1, wt.size(0)});
  auto y = at::empty({x2.size(0), wt.size(1)}, x.options().dtype(at::kFloat));
  const int64_t n = sparse_rows(x2, wt, threshold, y.data_ptr<float>(), sz.first, sz.second);
  return {y, n};
}
