"""Fused decode step (1 to 8 new tokens): a block in one C++ call instead of ~55 torch ops.

Why: at batch-1 decode the GEMVs of SmolLM2-135M take ~20 ms per token at 2 threads in bf16,
but the Python block dispatches ~1,650 small ops per token around them (norms, RoPE, the cache
write, casts, residual adds), each costing microseconds on this CPU, and none of that shrinks
with more threads. Here the glue between the GEMVs is C++ over one row: RMSNorm, the residual
add fused with the next norm, (QK-norm +) RoPE + KV write + SDPA, and the gated activation.
When the block's four linears are plain dense weights, the whole block is one call (GEMVs via
ATen); otherwise the same C++ glue runs between the linear modules, so whatever a method put
there (quantized, sparse, packed) keeps working at a few calls per block.

Forwards of up to MAX_ROWS new tokens take this path (decode, and speculative verification of
a few drafted tokens); longer prefills stay in Python, where the big matmuls dominate anyway.

Numerics follow the Python path (runtime.Block): fp32 residual stream and norm math, every
intermediate rounded to the compute dtype where the Python path rounds it, so the two agree
to float rounding (tests/test_fused_decode.py). A block runs here when it is the stock Block
on CPU in fp32/bf16; a cache policy or a replaced attention/MLP runs its own forward inside
it. It is the runtime's default decode step (`Transformer.fused_decode`); LEANLM_NATIVE=0 or a
machine without a C++ compiler keeps the Python path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..native import build
from . import runtime as _rt  # runtime imports this module first; its classes are looked up at call time

MAX_ROWS = 8  # new positions per forward taken here: decode, and speculative verification of k <= 7 drafts

_SOURCE = r"""
#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <cmath>
#include <optional>
#include <vector>

using at::Tensor;

template <typename T> static inline T rnd(float v) { return static_cast<T>(v); }  // round to T (RNE for bf16)
template <typename T> static inline float f(T v) { return static_cast<float>(v); }

// out = T( (h * rsqrt(mean(h^2) + eps)) * w ), in transformers' order; h already fp32
template <typename T>
static void norm_row(const float* h, const float* w, int64_t D, float eps, bool plus_one, T* out) {
  float ss = 0.f;
  for (int64_t d = 0; d < D; ++d) ss += h[d] * h[d];
  const float r = 1.0f / std::sqrt(ss / (float)D + eps);
  for (int64_t d = 0; d < D; ++d) out[d] = rnd<T>((h[d] * r) * (plus_one ? 1.0f + w[d] : w[d]));
}

static Tensor as_float(const Tensor& t) { return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous(); }

// runtime.Linear's rule: multi-row bf16 products run widened to fp32 on CPU (much faster there)
static Tensor project(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  if (x.scalar_type() != at::kFloat && x.size(0) > 4) {
    std::optional<Tensor> bf = b ? std::optional<Tensor>(b->to(at::kFloat)) : std::nullopt;
    return at::linear(x.to(at::kFloat), w.to(at::kFloat), bf).to(x.scalar_type());
  }
  return at::linear(x, w, b);
}

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
static Tensor attend_impl(const Tensor& qkv_in, const std::optional<Tensor>& q_norm, const std::optional<Tensor>& k_norm,
                          Tensor cache_k, Tensor cache_v, const Tensor& cos, const Tensor& sin, int64_t pos,
                          int64_t nh, int64_t nkv, int64_t window, float eps, bool plus_one, double scale) {
  Tensor qkv = qkv_in.contiguous();  // [B, T, (nh + 2 nkv) * hd] for positions pos .. pos+T-1
  const int64_t B = qkv.size(0), Tn = qkv.size(1), hd = cache_k.size(3), L = cache_k.size(2), half = hd / 2;
  const at::ScalarType dt = qkv.scalar_type();
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
  const int64_t S = pos + Tn;
  int64_t lo = 0;
  std::optional<Tensor> mask;
  if (Tn == 1) {  // one query sees every cached key, except outside a window
    if (window > 0 && S > window) lo = S - window;
  } else {  // causal (and windowed) over the new rows, as runtime.attention_mask builds it
    Tensor qpos = at::arange(pos, S, at::kLong).unsqueeze(1), kpos = at::arange(0, S, at::kLong).unsqueeze(0);
    Tensor m = kpos.le(qpos);
    if (window > 0) m = m.logical_and(kpos.gt(qpos - window));
    mask = m;
  }
  Tensor k = cache_k.narrow(0, 0, B).narrow(2, lo, S - lo), vv = cache_v.narrow(0, 0, B).narrow(2, lo, S - lo);
  if (dt != at::kFloat && B * nh * Tn > 4) { q = q.to(at::kFloat); k = k.to(at::kFloat); vv = vv.to(at::kFloat); }
  Tensor att = at::scaled_dot_product_attention(q, k, vv, mask, 0.0, false, scale, nh != nkv);
  if (att.scalar_type() != dt) att = att.to(dt);
  return att.transpose(1, 2).reshape({B * Tn, nh * hd});
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

// T new positions pos..pos+T-1: (QK-norm) + RoPE of q and k, K/V written to the cache, SDPA over
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

// act(gate) * up of the fused gate/up output [B, 2F] -> [B, F] (SiLU, or GELU-tanh for Gemma)
Tensor glu(Tensor gu, bool gelu) {
  if (gu.scalar_type() == at::kBFloat16) return glu_impl<c10::BFloat16>(gu, gelu);
  TORCH_CHECK(gu.scalar_type() == at::kFloat, "fp32 or bf16");
  return glu_impl<float>(gu, gelu);
}

// the whole block in one call when its four linears are plain dense weights; x [B*T, D]
Tensor decode_layer(Tensor x, Tensor attn_norm, Tensor wqkv, std::optional<Tensor> bqkv, Tensor wo,
                    std::optional<Tensor> q_norm, std::optional<Tensor> k_norm, std::optional<Tensor> attn_post,
                    Tensor mlp_norm, Tensor w_gate_up, Tensor w_down, std::optional<Tensor> mlp_post,
                    Tensor cache_k, Tensor cache_v, Tensor cos, Tensor sin, int64_t pos, int64_t batch, int64_t nh,
                    int64_t nkv, int64_t window, double eps, bool plus_one, double scale, bool gelu) {
  const bool bf16 = wqkv.scalar_type() == at::kBFloat16;
  Tensor qkv = project(rms_norm(x, attn_norm, eps, plus_one, bf16), wqkv, bqkv);
  Tensor att = attend(qkv.view({batch, x.size(0) / batch, -1}), q_norm, k_norm, cache_k, cache_v, cos, sin, pos, nh,
                      nkv, window, eps, plus_one, scale);
  Tensor xn = residual_norm(x, project(att, wo, std::nullopt), attn_post, mlp_norm, eps, plus_one);
  residual_norm(x, project(glu(project(xn, w_gate_up, std::nullopt), gelu), w_down, std::nullopt), mlp_post,
                std::nullopt, eps, plus_one);
  return x;
}
"""


def _native():
    return build("leanlm_fused_decode", _SOURCE, ["rms_norm", "residual_norm", "attend", "glu", "decode_layer"],
                 fallback="the Python decode path")  # fmt: skip


def available() -> bool:
    return _native() is not None


def can_fuse(layer, dtype: torch.dtype) -> bool:
    """True for the stock Block on CPU in fp32/bf16 (its linears, attention or MLP may be replaced)."""
    return type(layer) is _rt.Block and dtype in (torch.float32, torch.bfloat16) and layer.attn_norm.weight.device.type == "cpu"


def _linear(mod, x: torch.Tensor) -> torch.Tensor:
    """x [rows, K] through a linear layer: plain ones as one GEMV call, replaced ones (quantized,
    sparse, packed) through their own forward."""
    if x.shape[0] <= 4 and _plain(mod, x.dtype):
        return F.linear(x, mod.weight, mod.bias)
    return mod(x.unsqueeze(0)).squeeze(0)


def _plain(mod, dtype) -> bool:
    return type(mod) is _rt.Linear and mod.weight.dtype == dtype and not (mod._forward_pre_hooks or mod._forward_hooks)


def _plain_cache(attn, dtype) -> bool:
    c = attn.cache
    return type(c) is _rt.KVCache and c.k.dtype == dtype and c.k.is_contiguous()


def decode_layer(layer, x: torch.Tensor, rope, start: int, dtype: torch.dtype) -> torch.Tensor:
    """One block for T <= MAX_ROWS new positions: x [B, T, D] fp32 (updated in place, returned)."""
    N = _native()
    B, T, D = x.shape
    x = x.contiguous()  # (a quantized embedding's rows may come strided)
    x2 = x.view(B * T, D)
    a, m = layer.attn, layer.mlp
    eps, plus_one = layer.attn_norm.eps, layer.attn_norm.plus_one
    bf16 = dtype == torch.bfloat16
    post = lambda norm: None if norm is None else norm.weight  # noqa: E731
    cos, sin = (t.reshape(T, -1) for t in rope)
    attn_ok = type(a) is _rt.Attention and _plain_cache(a, dtype)
    mlp_ok = type(m) is _rt.MLP
    if attn_ok and mlp_ok and all(_plain(mod, dtype) for mod in (a.wqkv, a.wo, m.w_gate_up, m.w_down)):
        N.decode_layer(x2, layer.attn_norm.weight, a.wqkv.weight, a.wqkv.bias, a.wo.weight, post(a.q_norm),
                       post(a.k_norm), post(layer.attn_post_norm), layer.mlp_norm.weight, m.w_gate_up.weight,
                       m.w_down.weight, post(layer.mlp_post_norm), a.cache.k, a.cache.v, cos, sin, start, B,
                       a.n_heads, a.n_kv_heads, a.window or 0, eps, plus_one, a.scale, m.act is not F.silu)  # fmt: skip
        return x
    # general path: the same C++ glue, with the linear layers called as modules
    if attn_ok:
        qkv = _linear(a.wqkv, N.rms_norm(x2, layer.attn_norm.weight, eps, plus_one, bf16))
        att = N.attend(qkv.to(dtype).view(B, T, -1), post(a.q_norm), post(a.k_norm), a.cache.k, a.cache.v, cos, sin,
                       start, a.n_heads, a.n_kv_heads, a.window or 0, eps, plus_one, a.scale)  # fmt: skip
        h = _linear(a.wo, att)
    else:  # a cache policy or replaced attention: its own forward
        h = a(layer.attn_norm(x, dtype), rope, start).view(B * T, D)
    xn = N.residual_norm(x2, h.to(dtype), post(layer.attn_post_norm), layer.mlp_norm.weight, eps, plus_one)
    if mlp_ok:
        h = _linear(m.w_down, N.glu(_linear(m.w_gate_up, xn).to(dtype), m.act is not F.silu))
    else:
        h = m(xn.view(B, T, D)).view(B * T, D)
    N.residual_norm(x2, h.to(dtype), post(layer.mlp_post_norm), None, eps, plus_one)
    return x
