// The glue of a decoder block and the whole block in one call (fused_block): RMSNorm of the fp32
// residual, the residual add fused with the next norm (and Gemma's sandwich norms), the gated
// activation, and decode_layer, which runs a block for 1..16 new positions: norm, the qkv linear,
// attention (attention.cpp), wo, residual + norm, gate/up, GLU, down, residual, and decode_rows, the same for
// a batch of sequences each at its own position with its own cache. Numerics follow the
// Python block (runtime.Block): fp32 residual and norm math, every intermediate rounded to the compute
// dtype where the Python path rounds it (tests/test_fused_decode.py).
#include "leanlm.h"

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

// act(gate) * up of the fused gate/up output [B, 2F] -> [B, F] (SiLU, or GELU-tanh for Gemma)
Tensor glu(Tensor gu, bool gelu) {
  if (gu.scalar_type() == at::kBFloat16) return glu_impl<c10::BFloat16>(gu, gelu);
  TORCH_CHECK(gu.scalar_type() == at::kFloat, "fp32 or bf16");
  return glu_impl<float>(gu, gelu);
}

// The fused step's protocol with replaced linears (leanlm/ops.py, LinearKind): each of the block's four
// linears comes as lins[4i .. 4i+3] = {weight, bias, scales, zeros} (empty tensors where absent),
// meta[3i .. 3i+2] = {kind, bits, group} and thresholds[i]. Every kind keeps its Python module's numerics.
enum LinearKind : int64_t {
  LINEAR_DENSE = 0,         // runtime.Linear: fp32/bf16 weight [N, K], small_linear (project)
  LINEAR_QUANT = 1,         // leanlm.quant's packed int4/int8 weight: q_linear, fp32 + fp32 bias, rounded to x's dtype
  LINEAR_SPARSE_INPUT = 2,  // leanlm.adaptive's input-sparse linear: weight W^T [K, N], inputs |x| <= threshold dropped
                           // (int8 W^T: fp32 per-output scales / zeros [N] in the scales / zeros slots)
  LINEAR_CODEBOOK = 3,      // leanlm.quant's table-coded weight, the table in the zeros slot: q_linear_codebook
                           // (bits 4) or q_linear_codebook3 (bits 3); bits 5 / 6: the signed integer grids of
                           // q_linear_wide (their table, the levels -2^(bits-1) .. 2^(bits-1) - 1, goes unread)
  LINEAR_NM = 4,            // leanlm.quant.nm's 2:4 sparse int8 weight: q_linear_nm
};

static Tensor lin_forward(const Tensor& x, const std::vector<Tensor>& lins, int64_t i, const std::vector<int64_t>& meta,
                          const std::vector<double>& thresholds) {
  const Tensor &w = lins[4 * i], &b = lins[4 * i + 1];
  const int64_t kind = meta[3 * i], bits = meta[3 * i + 1], group = meta[3 * i + 2];
  std::optional<Tensor> bias = b.numel() ? std::optional<Tensor>(b) : std::nullopt;
  Tensor y;
  switch (kind) {
    case LINEAR_DENSE:
      return project(x, w, bias);
    case LINEAR_QUANT:
      y = q_linear(x, w, lins[4 * i + 2], lins[4 * i + 3], bits, group);
      break;
    case LINEAR_CODEBOOK:
      if (bits == 5 || bits == 6) y = q_linear_wide(x, w, lins[4 * i + 2], bits, group);
      else if (bits == 3) y = q_linear_codebook3(x, w, lins[4 * i + 2], lins[4 * i + 3], group);
      else y = q_linear_codebook(x, w, lins[4 * i + 2], lins[4 * i + 3], group);
      break;
    case LINEAR_NM:
      y = q_linear_nm(x, w, lins[4 * i + 2], group);
      break;
    case LINEAR_SPARSE_INPUT:
      {
        const auto sz = i8_scales(w, lins[4 * i + 2], lins[4 * i + 3]);
        y = at::empty({x.size(0), w.size(1)}, x.options().dtype(at::kFloat));
        sparse_rows(x, w, thresholds[i], y.data_ptr<float>(), sz.first, sz.second);
      }
      break;
    default:
      TORCH_CHECK(false, "decode_layer: unknown linear kind ", kind);
  }
  if (bias) y.add_(*bias);
  return y.to(x.scalar_type());
}

// the block around its attention: norm, qkv, attend_fn(qkv) -> attention output rows, wo, residual + norm,
// gate/up, GLU, down, residual
template <typename Attend>
static Tensor block(Tensor x, const Tensor& attn_norm, const std::vector<Tensor>& lins, const std::vector<int64_t>& meta,
                    const std::vector<double>& thresholds, const std::optional<Tensor>& attn_post, const Tensor& mlp_norm,
                    const std::optional<Tensor>& mlp_post, bool bf16, double eps, bool plus_one, bool gelu,
                    Attend attend_fn) {
  TORCH_CHECK(lins.size() == 16 && meta.size() == 12 && thresholds.size() == 4, "decode_layer: 4 linears");
  auto lin = [&](const Tensor& in, int64_t i) { return lin_forward(in, lins, i, meta, thresholds); };
  Tensor att = attend_fn(lin(rms_norm(x, attn_norm, eps, plus_one, bf16), 0));
  Tensor xn = residual_norm(x, lin(att, 1), attn_post, mlp_norm, eps, plus_one);
  residual_norm(x, lin(glu(lin(xn, 2), gelu), 3), mlp_post, std::nullopt, eps, plus_one);
  return x;
}

// the whole block in one call when each of its four linears is of a kind above; x [B*T, D];
// lins/meta/thresholds: wqkv, wo, w_gate_up, w_down as lin_forward takes them
Tensor decode_layer(Tensor x, Tensor attn_norm, std::vector<Tensor> lins, std::vector<int64_t> meta,
                    std::vector<double> thresholds,
                    std::optional<Tensor> q_norm, std::optional<Tensor> k_norm, std::optional<Tensor> attn_post,
                    Tensor mlp_norm, std::optional<Tensor> mlp_post,
                    Tensor cache_k, Tensor cache_v, Tensor cos, Tensor sin, int64_t pos, int64_t batch, int64_t nh,
                    int64_t nkv, int64_t window, double eps, bool plus_one, double scale, bool gelu) {
  const bool bf16 = cache_k.scalar_type() == at::kBFloat16;
  return block(x, attn_norm, lins, meta, thresholds, attn_post, mlp_norm, mlp_post, bf16, eps, plus_one, gelu,
               [&](const Tensor& qkv) {
                 return attend(qkv.view({batch, x.size(0) / batch, -1}), q_norm, k_norm, cache_k, cache_v, cos, sin,
                               pos, nh, nkv, window, eps, plus_one, scale);
               });
}

// the whole block for B sequences, one new position each, every sequence with its own caches and position
// (continuous batching: the linears read their weights once for all rows); x [B, D]; cos / sin [B, hd]
Tensor decode_rows(Tensor x, Tensor attn_norm, std::vector<Tensor> lins, std::vector<int64_t> meta,
                   std::vector<double> thresholds,
                   std::optional<Tensor> q_norm, std::optional<Tensor> k_norm, std::optional<Tensor> attn_post,
                   Tensor mlp_norm, std::optional<Tensor> mlp_post,
                   std::vector<Tensor> cache_k, std::vector<Tensor> cache_v, Tensor cos, Tensor sin,
                   std::vector<int64_t> positions, int64_t nh, int64_t nkv, int64_t window, double eps, bool plus_one,
                   double scale, bool gelu) {
  TORCH_CHECK(!cache_k.empty() && x.size(0) == (int64_t)cache_k.size(), "decode_rows: one row per sequence");
  const bool bf16 = cache_k[0].scalar_type() == at::kBFloat16;
  return block(x, attn_norm, lins, meta, thresholds, attn_post, mlp_norm, mlp_post, bf16, eps, plus_one, gelu,
               [&](const Tensor& qkv) {
                 return attend_rows(qkv.view({x.size(0), 1, -1}), q_norm, k_norm, cache_k, cache_v, cos, sin,
                                    positions, nh, nkv, window, eps, plus_one, scale);
               });
}
