"""The adaptive forward pass: per-token layer gating (early exit, layer skipping) and a FLOPs meter.

`make_adaptive(model)` swaps the model's class to AdaptiveTransformer (a subclass of the
runtime's Transformer, so nothing else changes and leanlm's runtime stays untouched). Its
`hidden()` asks `model.adaptive_gate` after every layer which tokens go on:

- decode (batch 1, one token, KV cache): a skipped layer costs only its K/V projection,
  which is written to the cache so later tokens attend to it as they would to a real one
  (CALM's "copy the state": the K/V come from the token's current hidden state);
- any other shape (prefill, perplexity scoring): every layer runs on all tokens and a
  skipped token keeps its input state (torch.where). A frozen token's K/V at a later layer
  are then computed from its frozen state, which is exactly what the decode path writes, so
  both paths give the same logits and quality is measured on the real policy.

The meter counts the weight-matmul FLOPs a token needs under the policy (input-sparse
matmuls count only their active inputs; skipped layers only their K/V projection; routers
and exit heads are added as overhead) against the dense model's. It is off unless enabled
(`with meter(model):`) so that timed runs pay nothing for it.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import LeanlmError
from ..model import runtime as _runtime
from ..model.runtime import Linear, Transformer, apply_rope


def gemv(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight^T at decode as the runtime's Linear computes it (runtime.linear: leanlm's
    native small-row kernel where it applies), so adaptive paths and the dense model share the kernel."""
    return _runtime.linear(x2, weight, bias)


class Meter:
    """Weight-matmul FLOPs used vs dense, summed over scored tokens."""

    def __init__(self):
        self.enabled = False
        self.reset()

    def reset(self) -> None:
        self.used = self.full = self.head = self.head_full = 0.0  # head: LM-head FLOPs used, head_full: dense
        self.tokens = 0
        self.skipped = 0.0  # layer-token pairs skipped (early exit or skip router)

    def summary(self) -> dict:
        if not self.tokens:
            return {"tokens": 0}
        return {
            "tokens": self.tokens,
            "flops_fraction_layers": self.used / self.full,  # decoder blocks only (what adaptivity acts on)
            "flops_fraction": (self.used + self.head) / (self.full + self.head_full),  # incl. one LM head per token
            "layers_skipped_fraction": self.skipped / self.tokens,
        }


def linear_flops(module) -> float:
    """Dense FLOPs per row: 2 * in * out (routed FFNs state theirs as `dense_flops`)."""
    dense = getattr(module, "dense_flops", None)
    return dense if dense is not None else 2.0 * module.in_features * module.out_features


def _parts(layer) -> list:
    m = layer.mlp
    return [layer.attn.wqkv, layer.attn.wo] + ([m] if hasattr(m, "dense_flops") else [m.w_gate_up, m.w_down])


def layer_flops(layer) -> tuple[float, float]:
    """(FLOPs of the block's weight matmuls per token, FLOPs of its K/V projection only)."""
    a = layer.attn
    return sum(linear_flops(x) for x in _parts(layer)), 2.0 * a.wqkv.in_features * 2 * a.n_kv_heads * a.head_dim


def layer_used_flops(layer) -> torch.Tensor | float:
    """FLOPs per token of the block's last forward (input-sparse / routed modules report `last_flops`)."""
    total = 0.0
    for mod in _parts(layer):
        used = getattr(mod, "last_flops", None)
        total = total + (used if used is not None else linear_flops(mod))
    return total


def kv_projection(attn, h: torch.Tensor) -> torch.Tensor:
    """[B, T, 2 * kv_dim]: only the K/V rows of the fused projection when it is a plain Linear."""
    q_dim = attn.split[0]
    w = attn.wqkv
    if type(w) in (Linear, torch.nn.Linear) and h.shape[1] == 1:
        b = None if w.bias is None else w.bias[q_dim:]
        return gemv(h.view(h.shape[0], -1), w.weight[q_dim:], b).unsqueeze(1)  # a view: reads 40% of wqkv
    return w(h)[..., q_dim:]


def write_kv(layer, x: torch.Tensor, rope, start: int, dtype) -> None:
    """Store the K/V a skipped layer would have produced from hidden state x (its input)."""
    a = layer.attn
    if a.cache is None:
        raise LeanlmError("the decode path of an adaptive model needs a KV cache (model.setup_cache)")
    if a.cache.custom_attention:
        raise LeanlmError("early exit / layer skipping cannot be combined with a KV policy (--kv); drop one of them")
    B, T, _ = x.shape
    kv = kv_projection(a, layer.attn_norm(x, dtype)).view(B, T, 2 * a.n_kv_heads, a.head_dim)
    k, v = kv[:, :, : a.n_kv_heads], kv[:, :, a.n_kv_heads :]
    if a.k_norm is not None:
        k = a.k_norm(k)
    k = apply_rope(k, *rope).transpose(1, 2)
    a.cache.update(k, v.transpose(1, 2), start)


class AdaptiveTransformer(Transformer):
    """Transformer whose layers may be skipped per token (see the module docstring)."""

    adaptive_gate = None  # a Gate (below): which tokens skip / leave at each layer

    def forward(self, tokens: torch.Tensor, start: int = 0, last_only: bool = False) -> torch.Tensor:
        self._exit_logits = None
        x = self.hidden(tokens, start)
        if last_only:
            x = x[:, -1:]
        if self._exit_logits is not None and x.shape[1] == 1:  # the exit test already ran the head
            return self._exit_logits
        out = self.logits(x)
        m, used = self.adaptive_meter, getattr(self.lm_head, "last_flops", None)
        if m.enabled and used is not None:  # an input-sparse head: count its active inputs, not the dense head
            rows = x.shape[0] * x.shape[1]
            m.head += float(used.sum() if torch.is_tensor(used) else used * rows) - \
                2.0 * self.config.hidden_size * self.config.vocab_size * rows  # fmt: skip
        return out

    def hidden(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        gate, m = self.adaptive_gate, self.adaptive_meter
        if gate is None and not m.enabled:
            return super().hidden(tokens, start)
        B, T = tokens.shape
        dtype = self.dtype
        x = self.embed(tokens)
        ropes = {name: table.get(start, T, dtype) for name, table in self.rope.items()}
        fast = gate is not None and B == 1 and T == 1 and self.layers[0].attn.cache is not None
        if fast:
            return self._decode(x, ropes, start, gate, m)
        active = None  # [B, T, 1] bool: tokens still running (None: all)
        exit_layer = None  # [B, T] long: layer after which a token left (-1: none)
        for i, (layer, rope_name) in enumerate(zip(self.layers, self._rope_names)):
            run = active
            if gate is not None:
                skip = gate.mask_skip(i, x)
                if skip is not None:
                    run = ~skip if run is None else run & ~skip
            out = layer(x, ropes[rope_name], start, dtype)
            if m.enabled:
                full, kv = self._flops[i]
                used = layer_used_flops(layer)
                if not isinstance(used, torch.Tensor):
                    used = torch.full((B * T,), used)
                r = torch.ones(B * T, dtype=torch.bool) if run is None else run.reshape(-1)
                m.used += float(torch.where(r, used.reshape(-1).float(), torch.tensor(kv)).sum())
                m.skipped += float((~r).sum())
            new = out if run is None else torch.where(run, out, x)
            if gate is not None:
                ex = gate.mask_exit(i, x, new, self, run)
                if ex is not None:
                    leaving = ex if run is None else ex & run  # only tokens that ran the layer may leave after it
                    if exit_layer is None:
                        exit_layer = torch.full((B, T), -1, dtype=torch.long, device=x.device)
                    exit_layer = exit_layer.masked_fill(leaving[..., 0], i)
                    active = ~ex if active is None else active & ~ex
            x = new
        if exit_layer is not None:
            x = gate.exit_state(x, exit_layer)
        if m.enabled:
            m.full += sum(f for f, _ in self._flops) * B * T
            m.head += 2.0 * self.config.hidden_size * self.config.vocab_size * B * T
            m.head_full += 2.0 * self.config.hidden_size * self.config.vocab_size * B * T
            m.tokens += B * T
            if gate is not None:
                m.used += gate.take_overhead()
        return x

    def _decode(self, x, ropes, start, gate, m):
        """One token through the layers: skipped layers only write their K/V."""
        dtype = self.dtype
        exited = -1
        used = skipped = 0.0
        for i, (layer, rope_name) in enumerate(zip(self.layers, self._rope_names)):
            rope = ropes[rope_name]
            if exited >= 0 or gate.decode_skip(i, x):
                write_kv(layer, x, rope, start, dtype)
                skipped += 1
                used += self._flops[i][1]
                continue
            new = layer(x, rope, start, dtype)
            if m.enabled:
                u = layer_used_flops(layer)
                used += float(u.sum()) if isinstance(u, torch.Tensor) else u
            if gate.decode_exit(i, x, new, self):
                exited = i
            x = new
        if exited >= 0:
            x = gate.exit_state(x, torch.tensor([[exited]]))
        if m.enabled:
            m.used += used + gate.take_overhead()
            m.full += sum(f for f, _ in self._flops)
            m.head += 2.0 * self.config.hidden_size * self.config.vocab_size
            m.head_full += 2.0 * self.config.hidden_size * self.config.vocab_size
            m.tokens += 1
            m.skipped += skipped
        return x


class Gate:
    """Per-token layer decisions. Subclasses override what they decide; the defaults run every layer.

    decode_*: batch 1, one token, return a Python bool. mask_*: any shape, return a [B, T, 1]
    bool tensor or None (= nobody). `take_overhead()` returns (and resets) the FLOPs the gate
    itself spent since it was last asked, for the meter."""

    def decode_skip(self, i: int, x: torch.Tensor) -> bool:
        return False

    def decode_exit(self, i: int, x: torch.Tensor, new: torch.Tensor, model) -> bool:
        return False

    def mask_skip(self, i: int, x: torch.Tensor):
        return None

    def mask_exit(self, i: int, x: torch.Tensor, new: torch.Tensor, model, active):
        return None

    def exit_state(self, x: torch.Tensor, exit_layer: torch.Tensor):
        """The output state of tokens that left early (exit_layer [B, T], -1 = ran every layer)."""
        return x

    def take_overhead(self) -> float:
        return 0.0


class Gates(Gate):
    """Several gates at once (e.g. layer skipping and early exit): skip if any says skip."""

    def __init__(self, *gates: Gate):
        self.gates = [g for g in gates if g is not None]

    def decode_skip(self, i, x):
        return any(g.decode_skip(i, x) for g in self.gates)

    def decode_exit(self, i, x, new, model):
        return any(g.decode_exit(i, x, new, model) for g in self.gates)

    def mask_skip(self, i, x):
        return _any([g.mask_skip(i, x) for g in self.gates])

    def mask_exit(self, i, x, new, model, active):
        return _any([g.mask_exit(i, x, new, model, active) for g in self.gates])

    def exit_state(self, x, exit_layer):
        for g in self.gates:
            x = g.exit_state(x, exit_layer)
        return x

    def take_overhead(self):
        return sum(g.take_overhead() for g in self.gates)


def _any(masks):
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out | m
    return out


def add_gate(model, gate: Gate) -> None:
    """Install `gate` next to any gate the model already has."""
    make_adaptive(model)
    old = model.adaptive_gate
    if old is None:
        model.adaptive_gate = gate
    else:
        model.adaptive_gate = Gates(*(old.gates if isinstance(old, Gates) else [old]), gate)


def make_adaptive(model) -> AdaptiveTransformer:
    """Turn a loaded Transformer into an AdaptiveTransformer in place (idempotent)."""
    if not isinstance(model, Transformer):
        raise LeanlmError("adaptive methods need a leanlm model (leanlm.load), not a transformers model")
    if not isinstance(model, AdaptiveTransformer):
        model.__class__ = AdaptiveTransformer
        model.adaptive_meter = Meter()
        model._exit_logits = None
    model._flops = [layer_flops(l) for l in model.layers]
    return model


@contextlib.contextmanager
def meter(model):
    """Count FLOPs inside the block: `with meter(model) as m: ...; m.summary()`."""
    make_adaptive(model)
    m = model.adaptive_meter
    m.reset()
    if model.adaptive_gate is not None:
        model.adaptive_gate.take_overhead()  # drop what the gate spent while nobody was counting
    m.enabled = True
    try:
        yield m
    finally:
        m.enabled = False
