"""KV-cache policies: attention sinks + sliding window (StreamingLLM), heavy-hitter (H2O) and
observation-window (SnapKV) eviction under a budget, each optionally on an int8/int4 store.

A policy is a small config (`KVPolicy`) that builds one `PolicyCache` per layer:
`model.setup_cache(batch, max_len, cache_cls=KVPolicy.parse("sinks:4,window:1024,int8"))`.
`leanlm.apply(model, policy)` records it in `model.applied`; from then on the decode loop
(`generate_tokens`: `leanlm generate`, `eval --speed`, `serve`) builds its cache with it, also after
`leanlm.save` and `leanlm.load` (an explicit `kv=` / `--kv` overrides it).

How it plugs into the runtime: PolicyCache sets `custom_attention`, so Attention calls
`cache.attend(attn, q, k, v, start)`. The cache attends the new queries over its kept keys
plus the new keys, masked by *original positions* (causal, and the layer's own sliding window),
then stores the new keys/values and evicts. RoPE was applied before caching, so kept keys keep
their original positions; we do not re-position them (StreamingLLM's re-positioning is not
done; positions past the trained context simply extend the rotary table).

Eviction scores (per kv head, summed over the query heads of its group):
- h2o: cumulative attention each kept key has received; the newest `window` keys are protected.
- snapkv: at a chunk of T > 1 queries, the attention from its last `obs` queries, avg-pooled
  over 7 neighbouring keys (SnapKV's clustering); at single-token decode a decayed running sum
  (factor 1 - 1/obs), so eviction keeps following the most recent queries. The newest `obs`
  keys are protected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..apply import record, register
from ..errors import LeanlmError
from ..model.runtime import KVCache, upcast_for_matmul
from .kv_quant import KVStore


METHODS = ("full", "window", "h2o", "snapkv")


@dataclass
class KVPolicy:
    method: str = "full"          # full | window | h2o | snapkv
    sinks: int = 4                # window: first tokens always kept
    window: int = 1024            # window: recent tokens; h2o/snapkv: protected recent tokens
    budget: int = 1024            # h2o/snapkv: kept tokens per head
    obs: int = 32                 # snapkv observation window
    bits: int | None = None       # None (compute dtype) | 8 | 4
    group: int = 32               # int4 group size (channels)

    needs_calibration = False     # a decode-time setting: nothing is learned

    def price(self, plan) -> None:
        """Cost model: keys a decode step reads per layer, and their storage dtype."""
        if self.method != "full":
            plan.kv_window = self.capacity(1 << 30)
        if self.bits:
            plan.kv_dtype = f"int{self.bits}"

    def validate(self) -> "KVPolicy":
        if self.method not in METHODS:
            raise LeanlmError(f"unknown KV policy method '{self.method}'; use one of: {', '.join(METHODS)}")
        if self.bits not in (None, 8, 4):
            raise LeanlmError(f"KV bits must be 8 or 4, got {self.bits}")
        if self.method in ("h2o", "snapkv"):
            recent = self.window if self.method == "h2o" else self.obs
            if self.budget < 2 or recent >= self.budget:
                raise LeanlmError(f"{self.method} budget {self.budget} must exceed its recent window {recent}")
        if self.method == "window" and (self.window < 1 or self.sinks < 0):
            raise LeanlmError("window must be >= 1 and sinks >= 0")
        return self

    @property
    def bounded(self) -> bool:
        """Constant memory however long the sequence (generation may go past max_len)."""
        return self.method != "full"

    def capacity(self, max_len: int) -> int:
        if self.method == "full":
            return max_len
        if self.method == "window":  # + 1: the ring keeps the oldest key a decode query still sees
            return self.sinks + self.window + 1
        return self.budget

    def __call__(self, batch, n_kv_heads, max_len, head_dim, dtype, device=None) -> "PolicyCache":
        return PolicyCache(self, batch, n_kv_heads, max_len, head_dim, dtype, device)

    def describe(self) -> str:
        parts = []
        if self.method == "window":
            parts.append(f"sinks:{self.sinks},window:{self.window}")
        elif self.method in ("h2o", "snapkv"):
            parts.append(f"{self.method}:{self.budget},window:{self.window if self.method == 'h2o' else self.obs}")
        if self.bits:
            parts.append(f"int{self.bits}")
        return ",".join(parts) or "full"

    @classmethod
    def parse(cls, spec: str | None) -> "KVPolicy | None":
        """'full' | 'int8' | 'int4' | 'sinks:4,window:1024[,int8]' | 'window:1024' |
        'h2o:1024[,window:256][,int4]' | 'snapkv:1024[,obs:32]' | 'tga:group=16,window=512' |
        'quest:pages=64,page=16' | 'topk:keys=1024' (tga: attention/tga.py's TGAPolicy; quest / topk:
        attention/sparse.py's SparsePolicy). None/'' -> None (plain cache)."""
        if not spec or spec.strip() in ("none", "fp", "default"):
            return None
        if spec.strip().startswith("tga:"):  # pooled-global attention (attention/tga.py)
            from .tga import TGAPolicy

            return TGAPolicy.parse(spec)
        from .sparse import SparsePolicy  # quest / topk: query-aware sparse attention (attention/sparse.py)

        if SparsePolicy.wants(spec):
            return SparsePolicy.parse(spec)
        p = cls()
        seen_window = False
        for item in [s.strip() for s in spec.split(",") if s.strip()]:
            m = re.fullmatch(r"([a-z0-9]+)(?::(\d+))?", item)
            if not m:
                raise LeanlmError(f"bad --kv item '{item}'; expected e.g. sinks:4,window:1024,int8 or h2o:1024")
            key, val = m.group(1), m.group(2)
            n = int(val) if val is not None else None
            if key in ("int8", "int4") and n is None:
                p.bits = int(key[3:])
            elif key == "full" and n is None:
                p.method = "full"
            elif key in ("h2o", "snapkv") and n is not None:
                p.method, p.budget = key, n
            elif key in ("sinks", "window", "obs", "group", "bits") and n is not None:
                setattr(p, key, n)
                seen_window |= key == "window"
                if key in ("sinks", "window") and p.method == "full":
                    p.method = "window"
            else:
                raise LeanlmError(f"unknown --kv item '{item}'; use full, int8, int4, sinks:N, window:N, "
                                  "h2o:BUDGET, snapkv:BUDGET, obs:N, quest:pages=N,page=N or topk:keys=N")  # fmt: skip
        if p.method == "h2o" and not seen_window:
            p.window = p.budget // 2  # H2O's default split: half heavy hitters, half recent
        p.validate()
        return p


@register(KVPolicy)
def _apply_kv_policy(model, policy: KVPolicy, calib, progress: bool) -> dict:
    """leanlm.apply: record the policy; the decode loop builds its cache from model.applied."""
    policy.validate()
    kept = policy.capacity(model.config.max_seq_len)
    record(model, policy, {"policy": policy.describe(), "tokens_kept_per_layer": kept})
    return {"policy": policy.describe(), "tokens_kept_per_layer": kept}


def model_policy(model) -> "KVPolicy | None":
    """The KV policy recorded on the model (the newest one applied), or None."""
    from ..apply import latest

    return latest(model, KVPolicy)


class PolicyCache(KVCache):
    custom_attention = True
    native_kvquant = True  # class-wide switch; False: the dequantize-then-attend path (the tests' reference)

    def __init__(self, policy: KVPolicy, batch, n_kv_heads, max_len, head_dim, dtype, device=None):
        nn.Module.__init__(self)  # not KVCache.__init__: no full-length float buffers
        self.policy, self.method = policy, policy.method
        self.cap = policy.capacity(max_len)
        self.batch, self.n_kv_heads, self.head_dim, self.dtype = batch, n_kv_heads, head_dim, dtype
        self.store = KVStore(batch, n_kv_heads, self.cap, head_dim, dtype, device, policy.bits, policy.group)
        per_head = self.method in ("h2o", "snapkv")
        # original position of each slot (-1 = empty); per kv head when heads evict differently
        self.register_buffer("pos", torch.full((batch, n_kv_heads if per_head else 1, self.cap), -1,
                                               dtype=torch.int32, device=device), persistent=False)  # fmt: skip
        if per_head:
            self.register_buffer("score", torch.zeros(batch, n_kv_heads, self.cap, device=device), persistent=False)
        self.n = 0  # filled slots

    @property
    def max_len(self) -> int:
        return self.cap

    def nbytes(self) -> int:
        """Bytes this layer's cache holds (store + positions + scores)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def update(self, k, v, start):  # policies attend through `attend`; update is not used
        raise NotImplementedError("PolicyCache is used through attend()")

    # ---- attention ----------------------------------------------------------------
    def attend(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        B, H, T, D = q.shape
        Hkv, G = k.shape[1], H // k.shape[1]
        dev = q.device
        new_pos = torch.arange(start, start + T, device=dev, dtype=torch.int32)
        if self._native_ok(T, q.dtype) and not (torch.is_grad_enabled() and q.requires_grad):  # (no backward)
            return self._attend_native(attn, q, k, v, start, new_pos)
        if T == 1 and self.method in ("full", "window") and attn.window is None:
            # decode: every kept key is visible to the new query (a full cache, or sinks + a ring
            # of window + 1 slots that after this write holds the last `window` keys and the new
            # one), and attention does not depend on key order: store first, then attend over
            # the store without a mask or a concatenated copy
            self._insert(k, v, new_pos, start, None, None, None, None)
            ck, cv = self.store.read(self.n, B)
            out = F.scaled_dot_product_attention(q, ck.to(q.dtype), cv.to(q.dtype), scale=attn.scale, enable_gqa=G > 1)
            return out
        if self.n:
            ck, cv = self.store.read(self.n, B)
            keys, vals = torch.cat([ck.to(k.dtype), k], 2), torch.cat([cv.to(v.dtype), v], 2)
            cpos = self.pos[:B, :, : self.n]
            kpos = torch.cat([cpos, new_pos.expand(B, cpos.shape[1], T)], 2)
        else:
            keys, vals, kpos = k, v, new_pos.expand(B, 1, T)
        S = keys.shape[2]
        # mask [B, Hp, T, S] from original positions; Hp is 1 or Hkv
        qpos = new_pos[:, None]
        mask = (kpos[:, :, None, :] <= qpos) & (kpos[:, :, None, :] >= 0)
        if attn.window is not None:
            mask &= kpos[:, :, None, :] > qpos - attn.window
        if self.method == "window":  # the ring's extra slot is for decode; a chunk sees sinks + last `window`
            mask &= (kpos[:, :, None, :] >= start - self.policy.window) | (kpos[:, :, None, :] < self.policy.sinks)
        need_probs = self.method in ("h2o", "snapkv")
        dtype = q.dtype
        qf, kf, vf = (q.float(), keys.float(), vals.float()) if upcast_for_matmul(q) else (q, keys, vals)
        if need_probs:  # explicit softmax: eviction needs the attention weights
            scores = torch.matmul(qf.view(B, Hkv, G, T, D), kf.unsqueeze(2).transpose(-1, -2)).float() * attn.scale
            m = mask if mask.shape[1] == Hkv else mask.expand(B, Hkv, T, S)
            scores.masked_fill_(~m[:, :, None], float("-inf"))
            probs = torch.softmax(scores, -1)
            out = torch.matmul(probs.to(vf.dtype), vf.unsqueeze(2)).view(B, H, T, D)
        else:
            probs = None
            if T == 1 and attn.window is None and self.n == self.cap and bool(mask.all()):
                sdpa_mask = None  # full cache, every kept key visible: fast path
            else:
                sdpa_mask = mask.repeat_interleave(G, 1) if mask.shape[1] > 1 else mask
            out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=sdpa_mask, scale=attn.scale,
                                                 enable_gqa=G > 1)  # fmt: skip
        out = out if out.dtype == dtype else out.to(dtype)
        self._insert(k, v, new_pos, start, keys, vals, kpos, probs)
        return out

    def _native_ok(self, rows: int, dtype: torch.dtype) -> bool:
        """Can the kernels read this store as it is (a full or window policy, 1..16 new rows on CPU, stored int8 /
        int4, or unquantized in the compute dtype)?"""
        st = self.store
        stored_as_computed = st.bits is not None or st.dtype == dtype
        return (self.native_kvquant and stored_as_computed and self.method in ("full", "window")
                and rows <= ops.MAX_ROWS and dtype in (torch.float32, torch.bfloat16) and self.pos.device.type == "cpu"
                and st.group % 8 == 0 and self.head_dim % (32 if st.bits == 4 else 8) == 0
                and ops.available())  # fmt: skip

    def _attend_native(self, attn, q, k, v, start, new_pos) -> torch.Tensor:
        """The same attention as below (same keys, masks and stored values), computed on the codes in C++
        (csrc/attention_kvquant.cpp) instead of over a dequantized copy of the whole store."""
        window = attn.window or 0
        sinks, ring = (self.policy.sinks, self.policy.window) if self.method == "window" else (0, -1)
        if q.shape[2] == 1 and attn.window is None:  # decode: store first, as the path below does
            self._insert(k, v, new_pos, start, None, None, None, None)
            return ops.attend_kvquant(q, self.store, self.pos, self.n, start, attn.scale, window, sinks=sinks,
                                      ring=ring)  # fmt: skip
        out = ops.attend_kvquant(q, self.store, self.pos, self.n, start, attn.scale, window, k.to(q.dtype),
                                 v.to(q.dtype), sinks, ring)  # fmt: skip
        self._insert(k, v, new_pos, start, None, None, None, None)
        return out

    def fused_store(self, dtype: torch.dtype, start: int, rows: int, window: int) -> list | None:
        """ops.decode_layer_kvquant's store arguments for `rows` new positions from `start` (the fused decode step,
        model/fused.py), or None where the kernel does not apply. Books the write it asks for (n)."""
        if not self._native_ok(rows, dtype):
            return None
        st, end = self.store, start + rows
        if self.method == "full":
            if end > self.cap:
                raise LeanlmError(f"KV cache of {self.cap} tokens is full (position {end})")
            slots, sinks, ring = list(range(start, end)), 0, -1
        else:
            s, w = self.policy.sinks, self.policy.window
            slots = [p if p < s else s + (p - s) % (w + 1) for p in range(start, end)]
            slots = [sl if p < s or p >= end - w - 1 else -1 for p, sl in zip(range(start, end), slots)]
            sinks, ring = s, w
        store_first = rows == 1 and window == 0  # as attend: a decode query attends its own key as stored
        n_before = self.n
        self.n = max(self.n, end) if self.method == "full" else min(self.cap, max(self.n, end))
        bufs, bits, group = st.kernel_buffers()
        return [bufs, self.pos, slots, self.n if store_first else n_before, store_first, sinks, ring, bits, group]

    # ---- storing / eviction ---------------------------------------------------------
    def _insert(self, k, v, new_pos, start, keys, vals, kpos, probs) -> None:
        T = k.shape[2]
        if self.method == "full":
            if start + T > self.cap:
                raise LeanlmError(f"KV cache of {self.cap} tokens is full (position {start + T})")
            self.store.write(start, k, v)
            self.pos[:, :, start : start + T] = new_pos
            self.n = max(self.n, start + T)
        elif self.method == "window":
            self._insert_window(k, v, new_pos, start)
        else:
            self._insert_evict(k, v, start, keys, vals, kpos, probs)

    def _insert_window(self, k, v, new_pos, start) -> None:
        s, w = self.policy.sinks, self.policy.window
        end = start + k.shape[2]
        keep = (new_pos < s) | (new_pos >= end - w - 1)  # a chunk longer than the ring keeps its tail
        idx = keep.nonzero().squeeze(1)
        p = new_pos[idx].long()
        slots = torch.where(p < s, p, s + (p - s) % (w + 1))
        self.store.write_index(slots, k[:, :, idx], v[:, :, idx])
        self.pos[:, :, slots] = p.to(torch.int32)
        self.n = min(self.cap, max(self.n, end))

    def _insert_evict(self, k, v, start, keys, vals, kpos, probs) -> None:
        B, Hkv, T = k.shape[0], k.shape[1], k.shape[2]
        S = keys.shape[2]
        n = self.n
        got = probs.sum(2)  # [B, Hkv, T, S] summed over the group's query heads
        old = self.score[:B, :, :n]
        if self.method == "h2o":
            cand = torch.cat([old, old.new_zeros(B, Hkv, T)], 2) + got.sum(2)
            recent = self.policy.window
        else:
            obs = self.policy.obs
            if T > 1:
                cand = got[:, :, -obs:].sum(2)
                cand = F.avg_pool1d(cand.reshape(B * Hkv, 1, S), 7, 1, 3, count_include_pad=False).view(B, Hkv, S)
            else:
                cand = torch.cat([old * (1 - 1 / obs), old.new_zeros(B, Hkv, 1)], 2) + got.sum(2)
            recent = obs
        kpos = kpos.expand(B, Hkv, S)
        if S <= self.cap:  # room for everything: append
            self.store.write(n, k, v)
            self.pos[:B, :, n:S] = kpos[:, :, n:]
            self.score[:B, :, :S] = cand
            self.n = S
            return
        end = start + T
        prio = cand.masked_fill(kpos >= end - recent, float("inf"))
        idx = prio.topk(self.cap, dim=-1).indices.sort(-1).values  # [B, Hkv, cap]
        gi = idx.unsqueeze(-1).expand(B, Hkv, self.cap, keys.shape[-1])
        self.store.write(0, keys.gather(2, gi), vals.gather(2, gi))
        self.pos[:B] = kpos.gather(2, idx)
        self.score[:B] = cand.gather(2, idx)
        self.n = self.cap


def cache_bytes(model) -> int:
    """Bytes held by the model's KV caches right now (policy caches: store + bookkeeping)."""
    total = 0
    for layer in model.layers:
        c = layer.attn.cache
        if c is None:
            continue
        total += c.nbytes() if hasattr(c, "nbytes") else sum(b.numel() * b.element_size() for b in c.buffers())
    return total
