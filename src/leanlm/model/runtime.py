"""The leanlm runtime: a compact Llama-family decoder every efficiency method plugs into.

Design points (why it is not transformers' modeling code):
- every layer has its own LayerSpec, so pruned layers may have different widths;
- q/k/v and gate/up are fused (one GEMV instead of three / two at decode);
- Linear modules (`attn.wqkv`, `attn.wo`, `mlp.w_gate_up`, `mlp.w_down`) and the KV cache
  (`attn.cache`) are plain attributes that later methods replace per layer;
- the residual stream stays in fp32 while weights, matmuls and the KV cache use the
  model's compute dtype (bf16 halves weight traffic; the fp32 residual keeps quality);
- the cache is pre-allocated, and the LM head runs only on the positions asked for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import native, ops
from ..ops import FusedLinear, LinearKind
from . import fused as _fused
from .config import LayerSpec, ModelConfig


def _native_rows(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Does a prefill's glue (more than ops.MAX_ROWS rows of fp32 x, or x in its dtype for the GLU) take leanlm's
    AVX-512 kernels (csrc/prefill_glue.cpp)? Forwards of <= MAX_ROWS rows keep their path (the fused decode
    step's numerics); so does autograd (the kernels have no backward)."""
    if not Attention.native_prefill or x.device.type != "cpu" or x.shape[-1] % 16 or not x.is_contiguous():
        return False
    if x.numel() <= ops.MAX_ROWS * x.shape[-1] or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    return ops.prefill_attention_usable()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        out_dtype = out_dtype or x.dtype
        if x.dtype == torch.float32 and out_dtype in (torch.float32, torch.bfloat16) and _native_rows(x, self.weight):  # prefill: one AVX-512 pass
            y = ops.norm_rows(x.reshape(-1, x.shape[-1]), self.weight, self.eps, self.plus_one, out_dtype == torch.bfloat16)
            return y.view(x.shape)
        # fp32 math in transformers' order (bitwise equal to it); written out because
        # F.rms_norm dispatches ~3x more ops, which dominates at batch-1 decode
        h = x if x.dtype == torch.float32 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        h = h * (1.0 + w) if self.plus_one else h * w
        return h if h.dtype == out_dtype else h.to(out_dtype)


class RotaryTable(nn.Module):
    """cos/sin for positions [0, n), grown on demand (long-context models need no huge table).

    Rotation uses transformers' half-split layout: x*cos + rotate_half(x)*sin, where
    rotate_half(x) = cat(-x2, x1) = roll(x, d/2) * [-1.., +1..]; the sign is folded into
    the stored sin, so applying RoPE costs a roll and a multiply-add.
    """

    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.scaling = scaling
        self.cos = self.sin = torch.empty(0, inv_freq.numel() * 2, device=inv_freq.device)
        self._cast: dict = {}

    def get(self, start: int, length: int, dtype: torch.dtype):
        """(cos, signed sin), each [length, 1, head_dim] to broadcast over [B, T, H, D]."""
        end = start + length
        if end > self.cos.shape[0]:
            n = max(end, 2 * self.cos.shape[0], 256)
            t = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            half = self.inv_freq.numel()
            sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(emb.device)
            self.cos, self.sin = emb.cos() * self.scaling, emb.sin() * self.scaling * sign
            self._cast = {}
        key = (dtype, self.cos.device)
        if key not in self._cast:  # cache the cast tables: no per-step conversion
            self._cast[key] = (self.cos.to(dtype)[:, None], self.sin.to(dtype)[:, None])
        cos, sin = self._cast[key]
        return cos[start:end], sin[start:end]

    def rows(self, positions: torch.Tensor, dtype: torch.dtype):
        """(cos, signed sin) at one position per sequence, each [B, head_dim] (the same values `get` slices)."""
        self.get(int(positions.max()), 1, dtype)  # grow the table and cache its cast
        cos, sin = self._cast[(dtype, self.cos.device)]
        return cos[positions, 0], sin[positions, 0]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; same values as transformers' apply_rotary_pos_emb."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # cheaper to dispatch than roll
    return torch.addcmul(x * cos, swapped, signed_sin)


def upcast_for_matmul(x: torch.Tensor) -> bool:
    """On CPUs without native bf16 matmul, multi-row products are far faster in fp32.

    Measured on an AVX2 CPU without AVX512-BF16: a 512x576 @ 576x1536 bf16 GEMM took 46 ms vs
    5.4 ms in fp32, while bf16 GEMV (one row) is faster than fp32 as it moves half the bytes.
    So low-precision weights stay low-precision in memory and are widened only for prefill.
    Where the CPU has bf16 dot products (AVX512-BF16 / AMX, native.bf16_matmul), oneDNN's bf16 GEMM
    beats widening + the fp32 GEMM (3-5x on SmolLM2's prefill shapes, AVX-512 EPYC): bf16 stays bf16.
    """
    if x.device.type != "cpu" or x.numel() // x.shape[-1] <= 4:
        return False
    return x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and not native.bf16_matmul())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias as the runtime's Linear computes it: products of at most ops.MAX_ROWS rows
    (decode, verification) on leanlm's native small-row kernel (ops.small_linear) where it applies,
    multi-row bf16 products widened to fp32 on CPU, and ATen otherwise."""
    if Linear.fused_small and x.shape[-1] * ops.MAX_ROWS >= x.numel():  # decode / verification rows
        y = ops.small_linear(x, weight, bias)
        if y is not None:
            return y
    if upcast_for_matmul(x):
        b = None if bias is None else bias.float()
        return F.linear(x.float(), weight.float(), b).to(x.dtype)
    if x.dim() == 3 and x.shape[1] == 1:  # decode: a 2-D GEMV skips matmul's reshaping
        return F.linear(x.view(x.shape[0], -1), weight, bias).unsqueeze(1)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear that keeps bf16 weights but runs multi-row products in fp32 on CPU, and runs
    products of at most ops.MAX_ROWS rows (decode, verification) through leanlm's native kernel
    there (`linear`). Implements the fused-linear protocol (leanlm.ops) as a DENSE linear."""

    fused_small = True  # class-wide switch; False: ATen for every product (A/B measurements)
    fused_state = ()  # the protocol's answer depends on the weight and bias only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def fused_linear_args(self, dtype: torch.dtype, rows: int) -> FusedLinear | None:
        """DENSE when the weight is in the compute dtype and row-major (the small-row kernel's layout)."""
        w = self.weight
        if w.dtype != dtype or not w.is_contiguous():
            return None
        return FusedLinear(LinearKind.DENSE, w, self.bias)


class KVCache(nn.Module):
    """Pre-allocated key/value cache of one layer: [batch, kv_heads, max_len, head_dim].

    `update` writes the new keys/values at [start, start+T) and returns everything up to
    start+T. Cache policies (windows, eviction, quantized caches) subclass this.

    Hook for policies that keep only some tokens (leanlm.attention): a subclass that sets
    `custom_attention = True` gets `attend(attn, q, k, v, start)` called instead of
    update + the positional masks below (which assume key index == position); it attends
    q over its kept keys (masked by their original positions) plus the new ones, then stores.
    """

    custom_attention = False

    def fused_kv(self, dtype: torch.dtype):
        """The (k, v) buffers the fused decode step writes and attends over in C++ (model/fused.py), or
        None where this cache runs its own attention or storage (a subclass that changes how keys are
        kept must answer None)."""
        if self.custom_attention or self.k.dtype != dtype or not (self.k.is_contiguous() and self.v.is_contiguous()):
            return None
        return self.k, self.v

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int):
        T, end = k.shape[2], start + k.shape[2]
        ck, cv = self.k, self.v
        if k.shape[0] != ck.shape[0]:
            ck, cv = ck[: k.shape[0]], cv[: k.shape[0]]
        ck.narrow(2, start, T).copy_(k)
        cv.narrow(2, start, T).copy_(v)
        return ck.narrow(2, 0, end), cv.narrow(2, 0, end)


def attention_mask(start: int, q_len: int, kv_len: int, window: int | None, device) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask: causal, and within `window` keys when set."""
    q_pos = torch.arange(start, start + q_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.window = spec.sliding_window
        q_dim, kv_dim = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        self.wqkv = Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.wo = Linear(q_dim, cfg.hidden_size, bias=False)
        self.split = (q_dim, kv_dim, kv_dim)
        self.q_norm = RMSNorm(spec.head_dim, cfg.norm_eps, cfg.norm_plus_one) if cfg.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, cfg.norm_eps, cfg.norm_plus_one) if cfg.qk_norm else None
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(spec.head_dim)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], start: int) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(B, T, nh + 2 * nkv, self.head_dim)
        if self.q_norm is not None:
            q, k, v = qkv.split((nh, nkv, nkv), dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        else:
            qk, v = qkv[:, :, : nh + nkv], qkv[:, :, nh + nkv :]
        qk = apply_rope(qk, *rope).transpose(1, 2)  # q and k rotated in one pass
        q, k, v = qk[:, :nh], qk[:, nh:], v.transpose(1, 2)
        if self.cache is not None and self.cache.custom_attention:  # cache policy hook (see KVCache)
            out = self.cache.attend(self, q, k, v, start)
            return self.wo(out.transpose(1, 2).reshape(B, T, -1))
        if self.cache is not None:
            k_all, v_all = self.cache.update(k, v, start)
            if start != 0:  # a fresh prefill attends to its own (contiguous) keys: faster SDPA
                k, v = k_all, v_all
        elif start != 0:
            raise ValueError("start > 0 needs a KV cache (call model.setup_cache)")
        out = self.attend(q, k, v, start)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    native_prefill = True  # class-wide switch; False: SDPA and ATen's glue for every forward (A/B measurements)

    def attend(self, q, k, v, start: int) -> torch.Tensor:
        T, S = q.shape[2], k.shape[2]
        if T > ops.MAX_ROWS and self.native_prefill and self._native_prefill_ok(q):
            # prefill: leanlm's kernel (csrc/attention_prefill.cpp, ~1.45x SDPA's on SmolLM2 at 512, one core);
            # forwards of <= MAX_ROWS positions keep their path (the fused step's batch invariance)
            out = ops.prefill_attention(q, k, v, self.scale, start, self.window or 0)
            return out.view(q.shape[0], T, self.n_heads, self.head_dim).transpose(1, 2)
        mask, causal = None, False
        if T == 1:  # decode: every cached key is visible, except outside a window
            if self.window is not None and S > self.window:
                k, v = k[:, :, S - self.window :], v[:, :, S - self.window :]
        elif start == 0 and self.window is None:
            causal = True
        else:
            mask = attention_mask(start, T, S, self.window, q.device)
        gqa = self.n_heads != self.n_kv_heads
        dtype = q.dtype
        if upcast_for_matmul(q):  # same reason as Linear: bf16 attention over many rows is slow on CPU
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=gqa)
        return out if out.dtype == dtype else out.to(dtype)


    def _native_prefill_ok(self, q: torch.Tensor) -> bool:
        if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16) or self.head_dim % 16:
            return False
        if torch.is_grad_enabled() and q.requires_grad:  # the kernel has no backward
            return False
        return ops.prefill_attention_usable()


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.ffn_dim = spec.ffn_dim
        self.w_gate_up = Linear(cfg.hidden_size, 2 * spec.ffn_dim, bias=False)
        self.w_down = Linear(spec.ffn_dim, cfg.hidden_size, bias=False)
        self.gelu = cfg.activation != "silu"
        self.act = F.silu if cfg.activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w_gate_up(x)
        f = gate_up.shape[-1] // 2
        if _native_rows(gate_up) and f % 16 == 0:  # prefill: act(gate) * up in one AVX-512 pass
            return self.w_down(ops.glu_rows(gate_up.reshape(-1, 2 * f), self.gelu).view(*gate_up.shape[:-1], f))
        return self.w_down(self.act(gate_up[..., :f]) * gate_up[..., f:])


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_plus_one)  # noqa: E731
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = norm(), Attention(cfg, spec), norm(), MLP(cfg, spec)
        self.attn_post_norm = norm() if cfg.sandwich_norms else None
        self.mlp_post_norm = norm() if cfg.sandwich_norms else None
        self.rope_key = spec.rope_key

    def forward(self, x: torch.Tensor, rope, start: int, dtype: torch.dtype) -> torch.Tensor:
        h = self.attn(self.attn_norm(x, dtype), rope, start)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + h  # fp32 residual + compute-dtype branch -> fp32
        h = self.mlp(self.mlp_norm(x, dtype))
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        return x + h


def rope_inv_freq(cfg: ModelConfig, key: str, head_dim: int) -> tuple[torch.Tensor, float]:
    params = cfg.rope[key]
    if params["rope_type"] == "default":
        theta = params.get("rope_theta", 10000.0)
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0
    # scaled variants: reuse transformers' reference implementations
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = AutoConfig.for_model(**cfg.hf_config)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu", layer_type=params.get("layer_type"))
    return inv_freq.float(), float(scaling)


class Transformer(nn.Module):
    """The decoder. Besides its modules it carries, in these attributes only:

    applied       list of {"type", "config", "result"}: every method leanlm.apply applied, in order
                  (configuration; saved in config.json by leanlm.save / quant.save_quantized, restored by
                  leanlm.load; a KV policy in it sets up the decode cache, decode/generate.py)
    quantization  the packed storage of a quantized model (layers, specs, dtype), what quant/save.py writes
    source, directory   where leanlm.load found it
    fused_decode  whether forwards of few rows may take the C++ path (model/fused.py)
    Runtime state of adaptive computation (adaptive/runtime.py, on AdaptiveTransformer):
    adaptive_gate (which tokens skip / leave at each layer), adaptive_meter and _flops (FLOPs counting),
    _exit_logits (an early exit's logits, reused as the output).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.applied: list[dict] = []
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, spec) for spec in cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_plus_one)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.fused_decode = True  # forwards of <= ops.MAX_ROWS new tokens through model/fused.py where it builds
        self.init_rope()

    def init_rope(self, device=None) -> None:
        """One rotary table per distinct (rope config, head_dim); layers share them."""
        self._rope_names = [f"{s.rope_key}_{s.head_dim}" for s in self.config.layers]
        self.rope = nn.ModuleDict()
        for spec, name in zip(self.config.layers, self._rope_names):
            if name not in self.rope:
                with torch.device("cpu"):  # real numbers even while the model is built on "meta"
                    inv_freq, scaling = rope_inv_freq(self.config, spec.rope_key, spec.head_dim)
                self.rope[name] = RotaryTable(inv_freq.to(device), scaling)

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def prepare_decode(self) -> int:
        """Store weights the way batch-1 decoding streams them fastest: row-major for leanlm's
        native small-row kernel (model/fused.py), column-major fp32 when only ATen's GEMV runs, and
        large ones in transparent huge pages (model/hugepages.py). Returns the number of weights moved."""
        from .hugepages import place_in_hugepages

        return self.set_decode_layout(column_major=not ops.available()) + place_in_hugepages(self)

    def set_decode_layout(self, column_major: bool = True) -> int:
        """Store fp32 CPU weights column-major (a transposed copy viewed back), or row-major again.

        Batch-1 decode is a chain of GEMVs bound by how fast they stream the weight; with MKL (and no
        native kernel: `prepare_decode` picks) a GEMV over a column-major fp32 weight streamed faster
        than over the row-major one on the AVX2 CPU measured (benchmarks/bench_runtime.py measures both
        layouts side by side), while 512-row prefill GEMMs ran at the same speed and 2..16-row products
        got slower (without the native kernel,
        speculative verification packs its own copy, decode/kernels.py). bf16 weights are left
        alone: there it is the reverse.
        The values and `weight.shape` are unchanged; code that needs contiguous rows (quantizers,
        pruners, export) should call this with False first. Returns the number of weights moved.
        """
        n = 0
        mats = [m.weight for m in self.modules() if type(m) is Linear]
        if self.lm_head is None:
            mats.append(self.tok_embeddings.weight)  # the tied head: the biggest GEMV of all
        for w in mats:
            if w.dtype != torch.float32 or w.device.type != "cpu" or w.dim() != 2:
                continue
            is_cm = w.stride() == (1, w.shape[0])
            if column_major and not is_cm:
                w.data = w.data.t().contiguous().t()
                n += 1
            elif not column_major and is_cm:
                w.data = w.data.contiguous()
                n += 1
        return n

    def output_weight(self) -> torch.Tensor:
        """The LM head's [vocab, hidden] weight (an input-sparse head stores it transposed)."""
        if self.lm_head is None:
            return self.tok_embeddings.weight
        dense = getattr(self.lm_head, "dense_weight", None)
        return self.lm_head.weight if dense is None else dense()

    # ---- cache --------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int, cache_cls=KVCache) -> None:
        """Allocate a KV cache for `batch` sequences of up to `max_len` tokens."""
        for layer in self.layers:
            a = layer.attn
            a.cache = cache_cls(batch, a.n_kv_heads, max_len, a.head_dim, self.dtype, self.device)

    def new_cache(self, max_len: int, cache_cls=KVCache) -> list[KVCache]:
        """One sequence's KV caches (one per layer, batch 1), not installed on the layers: what a sequence of
        `decode_rows` keeps as its own."""
        return [cache_cls(1, layer.attn.n_kv_heads, max_len, layer.attn.head_dim, self.dtype, self.device)
                for layer in self.layers]  # fmt: skip

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attn.cache = None

    @property
    def cache_len(self) -> int:
        c = self.layers[0].attn.cache
        return 0 if c is None else c.max_len

    # ---- forward ------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)
        if self.config.embed_scale is not None:  # Gemma: scale rounded to the weight dtype, as in HF
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        return x.float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h, self.dtype)
        if self.lm_head is not None:
            out = self.lm_head(h)
        else:
            out = linear(h, self.tok_embeddings.weight)  # the tied head: the biggest GEMV of a decode step
        out = out.float()
        cap = self.config.final_logit_softcap
        return torch.tanh(out / cap) * cap if cap else out

    def forward(self, tokens: torch.Tensor, start: int = 0, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] for `tokens` [B, T] at positions start..start+T-1.

        With a cache set up, keys/values are written to it and earlier positions are
        attended to; without one, `start` must be 0 (whole-sequence scoring).
        `last_only` computes the LM head for the last position only (prefill).
        """
        x = self.hidden(tokens, start)
        if last_only:
            x = x[:, -1:]
        return self.logits(x)

    def hidden(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Final hidden states [B, T, D] before the output norm (score only what you need)."""
        return self.run_layers(self.embed(tokens), start)

    def rows_supported(self) -> bool:
        """Can `decode_rows` decode sequences together: leanlm's kernels are there and every block runs as one
        fused call (the stock blocks with fused-protocol linears, fp32/bf16 on CPU); a subclass that changes
        the forward (adaptive computation) cannot."""
        stock = all(getattr(type(self), n) is getattr(Transformer, n) for n in ("forward", "hidden", "run_layers", "embed", "logits"))
        return (stock and self.fused_decode and ops.available() and self.device.type == "cpu"
                and all(_fused.rows_plan(layer, self.dtype) for layer in self.layers))  # fmt: skip

    @torch.inference_mode()
    def decode_rows(self, tokens: list[int], positions: list[int], caches: list[list[KVCache]]) -> torch.Tensor:
        """fp32 logits [B, V] of one new token for each of B sequences decoded together (continuous batching):
        tokens[b] goes at positions[b] of sequence b, whose per-layer KV caches are caches[b] (`new_cache`, filled
        by its prefill). Every linear reads its weights once per ops.MAX_ROWS sequences; attention runs per
        sequence over its own cache. Each row equals what `forward` gives that sequence alone, bit for bit (the
        kernels are batch-invariant; tests/test_batch_decode.py). Needs `rows_supported()`."""
        dtype, out = self.dtype, []
        for i in range(0, len(tokens), ops.MAX_ROWS):
            toks, pos = tokens[i : i + ops.MAX_ROWS], positions[i : i + ops.MAX_ROWS]
            seq_caches = caches[i : i + ops.MAX_ROWS]
            x = self.embed(torch.tensor(toks, device=self.device).view(-1, 1))  # [B, 1, D] fp32
            x2 = x.reshape(len(toks), -1).contiguous()
            where = torch.tensor(pos, device=self.device)
            ropes: dict = {}
            for j, layer in enumerate(self.layers):
                name = self._rope_names[j]
                if name not in ropes:
                    ropes[name] = self.rope[name].rows(where, dtype)
                _fused.decode_rows(layer, x2, *ropes[name], pos, [c[j] for c in seq_caches], dtype)
            out.append(self.logits(x2.view(len(toks), 1, -1))[:, 0])
        return out[0] if len(out) == 1 else torch.cat(out)

    def run_layers(self, x: torch.Tensor, start: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Residual stream x [B, T, D] (fp32) through layers lo..hi-1 at positions start.. (a
        self-draft runs the first layers, its verification the rest, on the same kernels)."""
        T, dtype = x.shape[1], self.dtype
        hi = len(self.layers) if hi is None else hi
        ropes: dict = {}
        fused = T <= ops.MAX_ROWS and self.fused_decode and ops.available()
        if fused and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            fused = False  # training (healing, distillation): the C++ step has no backward
        for i in range(lo, hi):
            layer, name = self.layers[i], self._rope_names[i]
            if name not in ropes:
                ropes[name] = self.rope[name].get(start, T, dtype)
            if fused and _fused.can_fuse(layer, dtype):  # norms, RoPE, KV write, GLU in C++ (model/fused.py)
                x = _fused.decode_layer(layer, x, ropes[name], start, dtype)
            else:
                x = layer(x, ropes[name], start, dtype)
        return x
