"""Pooled-global attention (TGA, the Transient Global Attention of LongT5, Guo et al. 2022) as a KV policy.

Each layer attends to
- a local window: the last `window` positions (the query's own included), at full resolution,
- sinks: the first `sinks` positions (default 4) as they are, once they have left the window, and
- pooled "global" tokens: every complete group of `group` tokens after the sinks, [S + jG, S + (j+1)G),
  averaged into one key and one value per KV head (keys after RoPE, so a pooled key is the mean of rotated
  keys).
A query at position p sees pooled group j only when the whole group lies before its local window
(S + (j+1)G - 1 <= p - window); the tokens of a group that straddles the window's edge are seen by neither
part (at most G - 1 tokens). Unlike LongT5 (an encoder trained with it, where every token sees every block),
this is causal and retrofitted to a model trained with full attention.

Why sinks: pooling the first token (which these models use as an attention sink) into a group wrecks
perplexity; with 4 sinks it is near the window policy (docs/attention-and-kv.md, benchmarks/results/archive/
2026-12-07/kv_tga.json).

`log_bias` (spec `logg=1`) adds log(G) to each pooled key's logit: a pooled key stands for G tokens, so
under softmax it then weighs like G copies of the mean key (the attention a group of similar keys would
have received together).

Memory: the cache stores only the window (a ring of `window` slots), the sinks and the pooled tokens
((max_len - sinks) // group slots), so window + sinks + L / G keys per layer instead of L, and a decode step
reads the window and the sinks and groups before it. Layers with their own sliding window (Gemma 3's local
layers) keep just
min(window, their window) recent keys and no pooled tokens: they were trained never to see far context.

Use: `KVPolicy.parse("tga:group=16,window=512[,sinks=4][,logg=1]")` (also `--kv`, recipes' `kv:` step,
`leanlm.apply`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import LeanlmError
from ..model.runtime import KVCache, upcast_for_matmul
from .policies import KVPolicy


@dataclass
class TGAPolicy(KVPolicy):
    method: str = "tga"
    window: int = 512             # recent tokens at full resolution
    pool: int = 16                # tokens per pooled group (spec: group=)
    log_bias: bool = False        # add log(pool) to the pooled keys' logits (spec: logg=1)
    sinks: int = 4                # first tokens kept as they are (attention sinks), not pooled (spec: sinks=N)

    def validate(self) -> "TGAPolicy":
        if self.method != "tga":
            raise LeanlmError(f"TGAPolicy has method 'tga', got '{self.method}'")
        if self.pool < 2:
            raise LeanlmError(f"tga group must be >= 2 tokens (1 is the full cache), got {self.pool}")
        if self.window < self.pool:
            raise LeanlmError(f"tga window ({self.window}) must be >= its group ({self.pool}): a group is pooled "
                              "from the window's keys when it completes")  # fmt: skip
        if self.bits is not None:
            raise LeanlmError("tga keeps its window and pooled tokens in the compute dtype; int8/int4 do not combine "
                              "with it")  # fmt: skip
        return self

    @property
    def bounded(self) -> bool:
        return False  # window + L / group keys: grows with the context (by 1 / group)

    def capacity(self, max_len: int) -> int:
        return self.window + self.sinks + max(0, max_len - self.sinks) // self.pool

    def price(self, plan) -> None:
        """Cost model: a decode step reads window + (context - window) / group keys per layer."""
        plan.kv_window = self.window
        plan.kv_pool_group = self.pool

    def describe(self) -> str:
        return f"tga:group={self.pool},window={self.window},sinks={self.sinks}" + (",logg=1" if self.log_bias else "")

    def __call__(self, batch, n_kv_heads, max_len, head_dim, dtype, device=None) -> "TGACache":
        return TGACache(self, batch, n_kv_heads, max_len, head_dim, dtype, device)

    @classmethod
    def parse(cls, spec: str) -> "TGAPolicy":
        """'tga:group=G,window=W[,sinks=N][,logg=0|1]'."""
        body = spec.strip()
        if not body.startswith("tga:"):
            raise LeanlmError(f"bad tga spec '{spec}'; expected e.g. tga:group=16,window=512")
        p = cls()
        names = {"group": "pool", "window": "window", "logg": "log_bias", "sinks": "sinks"}
        for item in [s.strip() for s in body[4:].split(",") if s.strip()]:
            m = re.fullmatch(r"([a-z]+)=(\d+)", item)
            if not m or m.group(1) not in names:
                raise LeanlmError(f"unknown tga item '{item}' in '{spec}'; use group=G, window=W, sinks=N, logg=0|1 "
                                  "(e.g. tga:group=16,window=512)")  # fmt: skip
            key, n = names[m.group(1)], int(m.group(2))
            if key == "log_bias" and n not in (0, 1):
                raise LeanlmError(f"tga logg takes 0 or 1, got {n}")
            setattr(p, key, bool(n) if key == "log_bias" else n)
        return p.validate()


class TGACache(KVCache):
    """One layer's keys/values: slots [0, L) are a ring of the last L positions (position p in slot p % L),
    [L, L + S) the first S positions (sinks), [L + S, L + S + P) the pooled groups in order. A decode step
    attends over the slice [0, L + visible sinks + visible groups) in place: no copy, no mask (an additive
    log(G) bias on the pooled part when `log_bias`)."""

    custom_attention = True

    def __init__(self, policy: TGAPolicy, batch, n_kv_heads, max_len, head_dim, dtype, device=None):
        nn.Module.__init__(self)  # not KVCache.__init__: no full-length buffers
        self.policy, self.G = policy, policy.pool
        self._max_len = max_len
        self.batch, self.n_kv_heads, self.head_dim, self.dtype, self.device = batch, n_kv_heads, head_dim, dtype, device
        sinks = min(policy.sinks, max_len)
        self._alloc(policy.window, sinks, max(0, max_len - sinks) // self.G)
        self.layer_window: int | None = None
        self.configured = False

    def _alloc(self, ring: int, sinks: int, pooled: int) -> None:
        self.L, self.S, self.P = ring, sinks, pooled
        self.pooled = 0  # groups stored so far
        shape = (self.batch, self.n_kv_heads, ring + sinks + pooled, self.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=self.dtype, device=self.device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=self.dtype, device=self.device), persistent=False)
        # slot positions for the fused decode kernel (fused_store): every slot it reads is visible, so 0 will do;
        # the kernel records each new key's position here
        self.register_buffer("slot_pos", torch.zeros(self.batch, 1, shape[2], dtype=torch.int32, device=self.device),
                             persistent=False)  # fmt: skip
        bias = torch.zeros(ring + sinks + pooled, device=self.device)
        bias[ring + sinks :] = math.log(self.G)
        self.register_buffer("bias", bias, persistent=False)

    def _configure(self, attn) -> None:
        """First call: a layer with its own sliding window keeps min(window, its window) keys, no sinks or groups."""
        if attn.window is not None:
            self.layer_window = attn.window
            self._alloc(min(self.policy.window, attn.window), 0, 0)
        self.configured = True

    @property
    def max_len(self) -> int:
        return self._max_len

    def nbytes(self) -> int:
        """Bytes this layer's cache holds (window ring + sinks + pooled slots, and the kernel's slot positions)."""
        return sum(b.numel() * b.element_size() for b in (self.k, self.v, self.slot_pos))

    def update(self, k, v, start):
        raise NotImplementedError("TGACache is used through attend()")

    def _groups(self, end: int) -> int:
        """Complete groups among positions [S, end)."""
        return min(max(0, end - self.S) // self.G, self.P)

    def _pool_pending(self, end: int) -> None:
        """Pool, from the ring, the groups that completed before position `end` and are not stored yet. A decode
        step's completed group may wait for the next step: no query sees a group before it has left the window
        (window >= group), and until then its tokens are still in the ring."""
        G, off = self.G, self.L + self.S
        for j in range(self.pooled, self._groups(end)):
            idx = torch.arange(self.S + j * G, self.S + (j + 1) * G, device=self.k.device) % self.L
            for buf in (self.k, self.v):
                buf[:, :, off + j] = buf[:, :, idx].float().mean(2).to(buf.dtype)
        self.pooled = max(self.pooled, self._groups(end))

    def fused_store(self, dtype: torch.dtype, start: int, rows: int, window: int) -> list | None:
        """ops.decode_layer_kvquant's arguments for a one-token decode step (model/fused.py): the ring, the sinks
        and the pooled groups read in place as an unquantized store whose first n_vis slots are all visible, the
        new key written to its ring slot by the kernel. None where that does not hold (a chunk, a layer with its
        own window, logg=1, a step among the sinks) and the layer attends through `attend`."""
        if (rows != 1 or window or not self.configured or self.layer_window is not None or self.policy.log_bias
                or dtype != self.dtype or start < self.S or start + 1 > self._max_len or self.k.device.type != "cpu"
                or self.head_dim % 8 or not ops.available()):  # fmt: skip
            return None
        self._pool_pending(start)
        e = ops._EMPTY
        return [[self.k, e, e, self.v, e, e], self.slot_pos, [start % self.L], self._visible(start), True, 0, -1, 16,
                self.head_dim]  # fmt: skip

    def _visible(self, start: int) -> int:
        """Slots a decode query at `start` attends to, all in [0, n): the ring (positions (start - L, start]),
        the sinks that left it, the groups wholly before it (a group counts only once every sink is visible)."""
        before = start - self.L + 1  # positions [0, before) lie before the window
        return min(self.L, start + 1) + min(self.S, max(0, before)) + self._groups(before)

    def _pool(self, local_k, local_v, base: int, start: int, end: int) -> int:
        """Pool the groups that complete in [start, end) from local keys at positions [base, end); returns
        the number of pooled groups now stored."""
        G, B, S, off = self.G, local_k.shape[0], self.S, self.L + self.S
        p0, p1 = self._groups(start), self._groups(end)
        if p1 > p0:
            for src, dst in ((local_k, self.k), (local_v, self.v)):
                seg = src[:, :, S + p0 * G - base : S + p1 * G - base]
                mean = seg.float().unflatten(2, (p1 - p0, G)).mean(3)
                dst[:B, :, off + p0 : off + p1] = mean.to(dst.dtype)
        return p1

    def attend(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        if not self.configured:
            self._configure(attn)
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        L, G, S = self.L, self.G, self.S
        end = start + T
        if end > self._max_len:
            raise LeanlmError(f"tga cache was set up for {self._max_len} tokens (position {end})")
        gqa = H != Hkv
        if start < S:  # the first S positions are also kept as sinks
            n = min(end, S) - start
            self.k[:B, :, L + start : L + start + n] = k[:, :, :n]
            self.v[:B, :, L + start : L + start + n] = v[:, :, :n]
        if T == 1:
            # decode: write into the ring first (it then holds positions (start - L, start]), pool a group
            # that completes here, then attend over the ring, the sinks and the pooled groups before the window
            slot = start % L
            self.k[:B, :, slot : slot + 1] = k
            self.v[:B, :, slot : slot + 1] = v
            self._pool_pending(end)
            before = start - L + 1  # positions [0, before) lie before the window
            n_vis = self._visible(start)
            ck, cv = self.k[:B, :, :n_vis], self.v[:B, :, :n_vis]
            mask = self.bias[None, :n_vis].to(q.dtype) if self.policy.log_bias and self._groups(before) else None
            return F.scaled_dot_product_attention(q, ck.to(q.dtype), cv.to(q.dtype), attn_mask=mask, scale=attn.scale,
                                                  enable_gqa=gqa)  # fmt: skip
        # chunk: the ring's keys (positions [base, start)) in position order, then the new ones
        self._pool_pending(start)  # (a decode step before this chunk may have left its group for the next)
        n_ring = min(L, start)
        base = start - n_ring
        dev = q.device
        if n_ring:
            slots = torch.arange(base, start, device=dev) % L
            local_k = torch.cat([self.k[:B, :, slots].to(k.dtype), k], 2)
            local_v = torch.cat([self.v[:B, :, slots].to(v.dtype), v], 2)
        else:
            local_k, local_v = k, v
        n_pool = self._pool(local_k, local_v, base, start, end)
        self.pooled = n_pool
        n_sink = min(S, end)
        qpos = torch.arange(start, end, device=dev)[:, None]
        lpos = torch.arange(base, end, device=dev)[None, :]
        lwin = L if self.layer_window is None else min(L, self.layer_window)
        visible = (lpos <= qpos) & (lpos > qpos - lwin)
        keys, vals = local_k, local_v
        if n_sink or n_pool:
            spos = torch.arange(n_sink, device=dev)[None, :]  # a sink is seen here once it left the window
            gend = S + torch.arange(1, n_pool + 1, device=dev)[None, :] * G - 1  # last position of each group
            visible = torch.cat([spos <= qpos - L, gend <= qpos - L, visible], 1)
            far = slice(L, L + n_sink), slice(L + S, L + S + n_pool)
            keys = torch.cat([self.k[:B, :, far[0]], self.k[:B, :, far[1]], local_k.to(self.k.dtype)], 2).to(k.dtype)
            vals = torch.cat([self.v[:B, :, far[0]], self.v[:B, :, far[1]], local_v.to(self.v.dtype)], 2).to(v.dtype)
        dtype = q.dtype
        qf, kf, vf = (q.float(), keys.float(), vals.float()) if upcast_for_matmul(q) else (q, keys, vals)
        if self.policy.log_bias and n_pool:
            mask = torch.zeros(visible.shape, dtype=qf.dtype, device=dev)
            mask[:, n_sink : n_sink + n_pool] = math.log(G)
            mask.masked_fill_(~visible, float("-inf"))
        else:
            mask = visible
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=attn.scale, enable_gqa=gqa)
        out = out if out.dtype == dtype else out.to(dtype)
        # keep the last L positions in the ring
        keep = min(L, end - base)
        pos = torch.arange(end - keep, end, device=dev)
        self.k[:B].index_copy_(2, pos % L, local_k[:, :, -keep:].to(self.k.dtype))
        self.v[:B].index_copy_(2, pos % L, local_v[:, :, -keep:].to(self.v.dtype))
        return out
