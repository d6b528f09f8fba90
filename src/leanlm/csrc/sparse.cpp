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

// y [M, N] fp32 = (x * (|x| > threshold)) [M, K] . wt [K, N], one sweep per row: a row's result
// does not depend on M (batch-invariant). With several threads the active rows are split between
// them, each sweeping whole rows into its own partial output, summed in thread order (splitting the
// outputs instead left each thread short runs of every row: at 2 threads in bf16 that was no faster
// than the dense product at 30% sparsity). Returns the active inputs summed over the rows.
static int64_t sparse_rows(const at::Tensor& x, const at::Tensor& wt, double threshold, float* y) {
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = wt.size(0), N = wt.size(1);
  const bool bf16 = wt.scalar_type() == at::kBFloat16;
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
      if (bf16) sweep<true>(idx.data() + a, val.data() + a, b - a, wp, dst, N, 0, N);
      else sweep<false>(idx.data() + a, val.data() + a, b - a, wp, dst, N, 0, N);
    };
    if (parts == 1) {
      run(0);
      continue;
    }
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) run(p);
    });
    for (int64_t p = 1; p < parts; ++p) {
      const float* src = part.data() + (p - 1) * N;
      for (int64_t j = 0; j < N; ++j) ym[j] += src[j];
    }
  }
  return active;
}

// x [M, K] (or [K]; any float dtype), wt [K, N] fp32 or bf16, contiguous, N % 8 == 0
// -> (y [M, N] fp32, active inputs summed over the rows)
std::tuple<at::Tensor, int64_t> sparse_linear(at::Tensor x, at::Tensor wt, double threshold) {
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous() && wt.size(1) % 8 == 0 &&
              (wt.scalar_type() == at::kFloat || wt.scalar_type() == at::kBFloat16), "sparse_linear: wt [K, N % 8 == 0] fp32/bf16");
  TORCH_CHECK(x.size(-1) == wt.size(0), "sparse_linear: x [.., K] does not match wt [K, N]");
  at::Tensor x2 = x.reshape({-1, wt.size(0)});
  auto y = at::empty({x2.size(0), wt.size(1)}, x.options().dtype(at::kFloat));
  const int64_t n = sparse_rows(x2, wt, threshold, y.data_ptr<float>());
  return {y, n};
}
