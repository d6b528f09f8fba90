"""Fused decode step (1 to 16 new tokens): a block in one C++ call instead of ~55 torch ops.

Why: at batch-1 decode the GEMVs of SmolLM2-135M take ~20 ms per token at 2 threads in bf16,
but the Python block dispatches ~1,650 small ops per token around them (norms, RoPE, the cache
write, casts, residual adds), each costing microseconds on this CPU, and none of that shrinks
with more threads. Here the glue between the GEMVs is C++ over one row: RMSNorm, the residual
add fused with the next norm, (QK-norm +) RoPE + KV write + attention, and the gated activation
(leanlm.ops; the kernels are in src/leanlm/csrc).

When each of the block's four linears implements the fused-linear protocol (leanlm.ops' module
docstring: `fused_linear_args(dtype, rows) -> FusedLinear | None`) and answers, the whole block
is one `ops.decode_layer` call: dense weights run on `small_linear`, leanlm.quant's packed weights
on `q_linear`, 2:4 int8 ones (quant.nm) on `q_linear_nm`, leanlm.adaptive's input-sparse linears on
`sparse_linear`. Otherwise the same C++
glue runs between the linear modules, so whatever a method put there (pruned, routed, hooked)
keeps working at a few calls per block.

The products and the attention are leanlm's own loops (`small_linear`, `attend`), not ATen:
- ATen's fp32 GEMV runs on one thread here, its 2..16-row products repack the weight, and its
  bf16 products have no native kernel (they scale with the rows). `small_linear` streams each
  weight row once for all rows: benchmarks/bench_speculative.py's v(k) (results/speculative.json)
  has a SmolLM2 bf16 step at 22.4 vs 36.2 ms with ATen, and a 4-token forward at 1.57x one token
  vs 3.36x (1 thread).
- Both are batch-invariant: each row's result is computed in the same order whatever the number
  of rows, so a k-token speculative verification reproduces k one-token steps bit for bit
  (tests/test_fused_decode.py). ATen's SDPA and GEMMs are not (their blocking depends on the
  shape), which flipped near-tied greedy choices in bf16.

Forwards of up to MAX_ROWS new tokens take this path (decode, and speculative verification of
drafted tokens); longer prefills stay in Python, where ATen's big GEMMs win.

Numerics follow the Python path (runtime.Block): fp32 residual stream and norm math, every
intermediate rounded to the compute dtype where the Python path rounds it, so the two agree
to float rounding (tests/test_fused_decode.py). A block runs here when it is the stock Block
on CPU in fp32/bf16 (the step re-implements exactly runtime.Block, Attention and MLP, so a
subclass, which may override forward, runs its own); its cache runs inside when it answers
`fused_kv` (or, an int8 / int4 cache policy, `fused_store`; or, query-aware sparse attention, `fused_sparse`:
attention/sparse.py), else the attention's own forward runs between the C++ glue. It is the runtime's
default decode step (`Transformer.fused_decode`); LEANLM_NATIVE=0 or a machine without a C++
compiler keeps the Python path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..ops import MAX_ROWS, FusedLinear
from . import runtime as _rt  # runtime imports this module first; its classes are looked up at call time

__all__ = ["MAX_ROWS", "available", "can_fuse", "decode_layer", "decode_rows", "rows_plan"]


def available() -> bool:
    return ops.available()


def can_fuse(layer, dtype: torch.dtype) -> bool:
    """True for the stock Block on CPU in fp32/bf16 (its linears, attention or MLP may be replaced)."""
    return type(layer) is _rt.Block and dtype in (torch.float32, torch.bfloat16) and layer.attn_norm.weight.device.type == "cpu"


def _hooked(mod) -> bool:
    return bool(mod._forward_pre_hooks or mod._forward_hooks)


def fused_args(mod, dtype: torch.dtype, rows: int) -> FusedLinear | None:
    """The module's answer to the fused-linear protocol (None: it runs its own forward)."""
    ask = getattr(mod, "fused_linear_args", None)
    if ask is None or _hooked(mod):
        return None
    return ask(dtype, rows)


def _linear(mod, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [rows, K] through a linear layer: dense ones as one native call (runtime.linear), others
    (quantized, sparse, packed) through their own forward."""
    args = fused_args(mod, dtype, x.shape[0])
    if args is not None and args.kind is ops.LinearKind.DENSE:
        return _rt.linear(x, args.weight, args.bias)
    return mod(x.unsqueeze(0)).squeeze(0)


def _fused_kv(attn, dtype):
    cache = attn.cache
    ask = getattr(cache, "fused_kv", None)
    return None if ask is None else ask(dtype)


def _fused_store(attn, dtype, start, rows, window):
    ask = getattr(attn.cache, "fused_store", None)
    return None if ask is None else ask(dtype, start, rows, window)


def _fused_sparse(attn, dtype):
    ask = getattr(attn.cache, "fused_sparse", None)
    return None if ask is None else ask(dtype)


class _Reads:
    """Module attributes read without nn.Module.__getattr__, each remembered by identity, so a
    cached layer plan can tell cheaply whether anything it holds was replaced since."""

    def __init__(self):
        self.seen: list = []

    def get(self, mod, name):
        for d in (mod._parameters, mod._buffers, mod._modules, mod.__dict__):
            if name in d:
                self.seen.append((d, name, d[name]))
                return d[name]
        return getattr(mod, name)  # a property or class attribute: not something a method replaces

    def state_of(self, mod) -> None:
        """Every parameter and buffer of a linear, and the attributes it names in `fused_state`."""
        for name in (*mod._parameters, *mod._buffers, *getattr(mod, "fused_state", ())):
            if name in mod._parameters or name in mod._buffers or name in mod.__dict__:
                self.get(mod, name)


def _plan_fresh(plan, dtype) -> bool:
    if plan is None or plan[0] is not dtype:
        return False
    if not all(d.get(name) is obj for d, name, obj in plan[1]):
        return False
    return all(not _hooked(m) and (w is None or w.is_contiguous() == contiguous) for m, w, contiguous in plan[2])


def _layer_plan(layer, dtype):
    """decode_layer's per-layer arguments, less the cache's, when the whole block runs as one C++ call
    (its attention and MLP are the stock ones and its four linears answer the protocol), else None.

    Why cached: rebuilding them (module attribute reads, protocol calls) every step cost about as
    much as the LM head's product in a profile of a bf16 step. The plan is kept on the layer and
    reused while every module, weight, buffer and `fused_state` attribute it read is the same
    object, no hook was added and no weight's layout changed (checked by identity each step, a few
    us per layer). The cache is asked each call (`_fused_kv`): a batched step passes each sequence's own."""
    plan = layer.__dict__.get("_fused_plan")
    if _plan_fresh(plan, dtype):
        return plan[3]
    r = _Reads()
    a, m = r.get(layer, "attn"), r.get(layer, "mlp")
    args, watch = None, []
    if type(a) is _rt.Attention and type(m) is _rt.MLP:
        mods = [r.get(a, "wqkv"), r.get(a, "wo"), r.get(m, "w_gate_up"), r.get(m, "w_down")]
        for mod in mods:
            r.state_of(mod)
        linears = [fused_args(mod, dtype, MAX_ROWS) for mod in mods]
        if all(fl is not None for fl in linears):
            def norm(mod, name):  # a norm's weight, None where the block has no such norm
                n = r.get(mod, name)
                return None if n is None else r.get(n, "weight")

            lins, meta, thresholds = ops.block_args(linears)
            head = (norm(layer, "attn_norm"), lins, meta, thresholds, norm(a, "q_norm"), norm(a, "k_norm"),
                    norm(layer, "attn_post_norm"), norm(layer, "mlp_norm"), norm(layer, "mlp_post_norm"))
            an = r.get(layer, "attn_norm")
            tail = (a.n_heads, a.n_kv_heads, a.window or 0, an.eps, an.plus_one, a.scale, m.act is not F.silu)
            args = (head, tail)
        weights = [mod._parameters.get("weight", mod._buffers.get("weight")) for mod in mods]
        watch = [(mod, w, w is not None and w.is_contiguous()) for mod, w in zip(mods, weights)]
    layer.__dict__["_fused_plan"] = (dtype, r.seen, watch, args)
    return args


def decode_layer(layer, x: torch.Tensor, rope, start: int, dtype: torch.dtype) -> torch.Tensor:
    """One block for T <= MAX_ROWS new positions: x [B, T, D] fp32 (updated in place, returned)."""
    B, T, D = x.shape
    x = x.contiguous()  # (a quantized embedding's rows may come strided)
    x2 = x.view(B * T, D)
    cos, sin = (t.reshape(T, -1) for t in rope)
    whole = _rt.Linear.fused_small and B * T <= MAX_ROWS  # (fused_small False: ATen GEMVs, general path)
    plan = _layer_plan(layer, dtype) if whole else None
    a, m = layer.attn, layer.mlp
    kv = None if plan is None else _fused_kv(a, dtype)
    if kv is not None:
        ops.decode_layer(x2, *plan[0], *kv, cos, sin, start, B, *plan[1])
        return x
    st = None if plan is None else _fused_store(a, dtype, start, T, plan[1][2])
    if st is not None:  # an int8 / int4 cache policy: the whole block too, attention read from the codes
        ops.decode_layer_kvquant(x2, *plan[0], *st, cos, sin, start, B, *plan[1])
        return x
    sp = None if plan is None else _fused_sparse(a, dtype)
    if sp is not None:  # a cache with query-aware sparse attention (attention/sparse.py): still one call
        ops.decode_layer_sparse(x2, *plan[0], *sp[:4], cos, sin, start, B, *plan[1], *sp[4:])
        return x
    eps, plus_one = layer.attn_norm.eps, layer.attn_norm.plus_one
    bf16 = dtype == torch.bfloat16
    post = lambda norm: None if norm is None else norm.weight  # noqa: E731
    kv = _fused_kv(a, dtype) if type(a) is _rt.Attention else None
    # general path: the same C++ glue, with the linear layers called as modules
    if kv is not None:
        qkv = _linear(a.wqkv, ops.rms_norm(x2, layer.attn_norm.weight, eps, plus_one, bf16), dtype)
        att = ops.attend(qkv.to(dtype).view(B, T, -1), post(a.q_norm), post(a.k_norm), *kv, cos, sin,
                         start, a.n_heads, a.n_kv_heads, a.window or 0, eps, plus_one, a.scale)  # fmt: skip
        h = _linear(a.wo, att, dtype)
    else:  # a cache policy or replaced attention: its own forward
        h = a(layer.attn_norm(x, dtype), rope, start).view(B * T, D)
    xn = ops.residual_norm(x2, h.to(dtype), post(layer.attn_post_norm), layer.mlp_norm.weight, eps, plus_one)
    if type(m) is _rt.MLP:
        h = _linear(m.w_down, ops.glu(_linear(m.w_gate_up, xn, dtype).to(dtype), m.act is not F.silu), dtype)
    else:
        h = m(xn.view(B, T, D)).view(B * T, D)
    ops.residual_norm(x2, h.to(dtype), post(layer.mlp_post_norm), None, eps, plus_one)
    return x


def rows_plan(layer, dtype: torch.dtype) -> bool:
    """Can `decode_rows` run this block (the stock block, its whole body one C++ call)?"""
    return can_fuse(layer, dtype) and _rt.Linear.fused_small and _layer_plan(layer, dtype) is not None


def decode_rows(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: list[int], caches: list,
                dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """One block for B <= MAX_ROWS sequences, one new token each (continuous batching): x [B, D] fp32 (updated
    in place, returned), row b at positions[b] of sequence b whose cache of this layer is caches[b]
    (answering `fused_kv`); cos / sin [B, head_dim]. Needs rows_plan(layer, dtype)."""
    plan = _layer_plan(layer, dtype)
    kvs = [c.fused_kv(dtype) for c in caches]
    if plan is None or any(kv is None for kv in kvs):
        raise ValueError("decode_rows needs the stock block with fused linears and caches that answer fused_kv")
    ops.decode_rows(x, *plan[0], [k for k, _ in kvs], [v for _, v in kvs], cos, sin, positions, *plan[1])
    return x
