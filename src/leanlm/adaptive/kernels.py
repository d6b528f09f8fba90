"""A native input-sparse GEMV for batch-1 decode: y = sum over |x_i| > t of x_i * W^T[i, :].

Why: with the weight stored transposed ([in, out]) every input owns one contiguous row, so an
input-sparse product streams only the rows of the active inputs. `F.embedding_bag` does that
but spends ~7 dispatched ops (abs, compare, nonzero, gather, ...) and reads a row slower than a
dense GEMV streams; this AVX2 loop does the thresholding, index list and row sweep in one call,
keeping the output slice in L1 while each active row streams through once (fp32 accumulation;
bf16 weights widened by a shift). With several threads each takes a contiguous output slice.
Built once with the system compiler (cached by torch) like leanlm.model.gemv; LEANLM_NATIVE=0,
no compiler or no AVX2 -> None, and SparseInputLinear uses embedding_bag instead.
"""

from __future__ import annotations

import torch

from ..native import build

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

template <bool BF16>
static inline __m256 load8(const void* w, int64_t j) {
  if (BF16) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)((const uint16_t*)w + j));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  return _mm256_loadu_ps((const float*)w + j);
}

template <bool BF16>
static void sweep(const std::vector<int>& idx, const std::vector<float>& val, const void* wt, float* y,
                  int64_t N, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; j += 8) _mm256_storeu_ps(y + j, _mm256_setzero_ps());
  const int64_t esz = BF16 ? 2 : 4;
  for (size_t t = 0; t < idx.size(); ++t) {
    const __m256 v = _mm256_set1_ps(val[t]);
    const char* row = (const char*)wt + (int64_t)idx[t] * N * esz;
    int64_t j = j0;
    for (; j + 32 <= j1; j += 32) {
      __m256 a0 = _mm256_fmadd_ps(v, load8<BF16>(row, j), _mm256_loadu_ps(y + j));
      __m256 a1 = _mm256_fmadd_ps(v, load8<BF16>(row, j + 8), _mm256_loadu_ps(y + j + 8));
      __m256 a2 = _mm256_fmadd_ps(v, load8<BF16>(row, j + 16), _mm256_loadu_ps(y + j + 16));
      __m256 a3 = _mm256_fmadd_ps(v, load8<BF16>(row, j + 24), _mm256_loadu_ps(y + j + 24));
      _mm256_storeu_ps(y + j, a0);
      _mm256_storeu_ps(y + j + 8, a1);
      _mm256_storeu_ps(y + j + 16, a2);
      _mm256_storeu_ps(y + j + 24, a3);
    }
    for (; j < j1; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(v, load8<BF16>(row, j), _mm256_loadu_ps(y + j)));
  }
}

std::tuple<torch::Tensor, int64_t> sparse_gemv(torch::Tensor x, torch::Tensor wt, double threshold) {
  // x: [K] (any float dtype), wt: [K, N] fp32 or bf16, contiguous, N % 8 == 0. Returns ([1, N] fp32, active count).
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t K = wt.size(0), N = wt.size(1);
  const float* xp = xf.data_ptr<float>();
  std::vector<int> idx;
  std::vector<float> val;
  idx.reserve(K);
  val.reserve(K);
  const float t = (float)threshold;
  for (int64_t k = 0; k < K; ++k)
    if (std::fabs(xp[k]) > t) { idx.push_back((int)k); val.push_back(xp[k]); }
  auto y = torch::empty({1, N}, xf.options());
  float* yp = y.data_ptr<float>();
  const bool bf16 = wt.scalar_type() == at::kBFloat16;
  const void* wp = wt.data_ptr();
  const int64_t blocks = N / 8;
  const int64_t grain = std::max<int64_t>(1, blocks / std::max<int64_t>(1, at::get_num_threads()));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    if (bf16) sweep<true>(idx, val, wp, yp, N, b0 * 8, b1 * 8);
    else sweep<false>(idx, val, wp, yp, N, b0 * 8, b1 * 8);
  });
  return {y, (int64_t)idx.size()};
}
"""

def native():
    """The compiled extension, or None (LEANLM_NATIVE=0, no AVX2/FMA, no compiler)."""
    return build("leanlm_sparse_gemv_v1", _SOURCE, ["sparse_gemv"], fallback="embedding_bag")


def usable(wt: torch.Tensor) -> bool:
    """Can the native kernel run on this transposed weight [K, N]?"""
    return (wt.device.type == "cpu" and wt.dtype in (torch.float32, torch.bfloat16) and wt.shape[1] % 8 == 0
            and wt.is_contiguous() and native() is not None)  # fmt: skip
