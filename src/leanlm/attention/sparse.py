"""Query-aware sparse attention at decode: Quest page selection and exact top-k keys.

The cache keeps every key (memory is not reduced); at decode each query attends exactly over a
subset of its visible keys, chosen per kv head and shared by the query heads of its group:

- quest (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", 2024):
  the cache is cut in pages of `page` keys, and each page keeps the elementwise min and max of its
  keys (fp32, per kv head). A query scores a page by the upper bound of q.k over it,
  sum_d max(q_d min_d, q_d max_d), summed over the group's query heads, and attends over the
  `pages` best pages, always including the first `sinks` pages (attention sinks) and its own,
  most recent page. It reads the bounds (2 fp32 rows per page) and pages * page keys.
- topk: exact q.k over every visible key; each group keeps the `keys` keys with the highest logit
  for any of its heads (relative to that head's largest logit) and the softmax runs over those. It
  still reads every key: it saves the value reads and the softmax tail, not the key reads.

With a budget covering the visible keys both are full attention. Forwards of more than
ops.MAX_ROWS new tokens (prefill, chunked prefill) attend fully, as the method is a decode-time
one, but keep the page bounds up to date. Sliding-window layers select among the pages inside
their window.

The decode step stays fused: `SparseCache.fused_sparse` hands the cache, the bounds and the
selection to `ops.decode_layer_sparse` (csrc/attention_topk.cpp), the whole block in one C++ call
(model/fused.py). Without the native kernels, `sparse_reference` computes the same in torch.

    leanlm.apply(model, KVPolicy.parse("quest:pages=64,page=16"))   # or "topk:keys=1024"; --kv in the CLI
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import LeanlmError
from ..model.runtime import KVCache
from .policies import KVPolicy

SPARSE_METHODS = ("quest", "topk")
_MODE = {"quest": 0, "topk": 1}  # csrc/attention_topk.cpp's SparseMode
_USAGE = "use quest[:pages=N][,page=N][,sinks=N] or topk[:keys=N]"


@dataclass
class SparsePolicy(KVPolicy):
    """A query-aware sparse attention method as a KV policy (parsed by KVPolicy.parse)."""

    method: str = "quest"  # quest | topk
    pages: int = 64  # quest: pages each query attends over (sink pages and its own page included)
    page: int = 16  # quest: keys per page
    sink_pages: int = 1  # quest: first pages always attended
    keys: int = 1024  # topk: keys each query attends over

    def validate(self) -> "SparsePolicy":
        if self.method not in SPARSE_METHODS:
            raise LeanlmError(f"unknown sparse attention method '{self.method}'; {_USAGE}")
        if self.bits is not None:
            raise LeanlmError(f"{self.method} reads the cache in the compute dtype; drop int{self.bits} from the spec")
        if self.method == "quest":
            if not 1 <= self.page <= 4096:
                raise LeanlmError(f"quest page size must be in [1, 4096], got {self.page}; e.g. page=16")
            if self.sink_pages < 0:
                raise LeanlmError(f"quest sinks must be >= 0 pages, got {self.sink_pages}")
            if self.pages < self.sink_pages + 2:
                raise LeanlmError(f"quest pages={self.pages} leaves no room beside the {self.sink_pages} sink page(s) "
                                  f"and the newest page; use pages >= {self.sink_pages + 2}")  # fmt: skip
        elif self.keys < 1:
            raise LeanlmError(f"topk keys must be >= 1, got {self.keys}; e.g. topk:keys=1024")
        return self

    @property
    def bounded(self) -> bool:
        return False  # every key is kept

    def capacity(self, max_len: int) -> int:
        return max_len

    @property
    def attended(self) -> int:
        """Keys a decode query attends over (at most)."""
        return self.pages * self.page if self.method == "quest" else self.keys

    def price(self, plan) -> None:
        """Cost model: keys attended per decode query, and the rows read to choose them."""
        plan.kv_attend = self.attended
        # quest: two fp32 bounds per page (4 bf16 rows' bytes); topk: every key's K row
        plan.kv_scan = 4.0 / self.page if self.method == "quest" else 1.0

    def __call__(self, batch, n_kv_heads, max_len, head_dim, dtype, device=None) -> "SparseCache":
        return SparseCache(self, batch, n_kv_heads, max_len, head_dim, dtype, device)

    def describe(self) -> str:
        if self.method == "quest":
            return f"quest:pages={self.pages},page={self.page},sinks={self.sink_pages}"
        return f"topk:keys={self.keys}"

    @classmethod
    def parse(cls, spec: str) -> "SparsePolicy":
        """'quest' | 'quest:64' | 'quest:pages=64,page=16[,sinks=1]' | 'topk:1024' | 'topk:keys=1024'."""
        p = cls()
        method = None
        for item in [s.strip() for s in spec.split(",") if s.strip()]:
            m = re.fullmatch(r"([a-z_][a-z0-9_]*)(?:[:=](?:([a-z_]+)=)?(\d+))?", item)
            if not m:
                raise LeanlmError(f"bad --kv item '{item}'; {_USAGE}")
            key, sub, val = m.group(1), m.group(2), m.group(3)
            if key in SPARSE_METHODS:
                if method is not None:
                    raise LeanlmError(f"--kv names two sparse methods ({method}, {key}); keep one")
                method = p.method = key
                if val is None:
                    continue
                key = sub or ("pages" if key == "quest" else "keys")
            elif sub is not None:
                raise LeanlmError(f"bad --kv item '{item}'; {_USAGE}")
            if key in ("window", "h2o", "snapkv", "obs", "int8", "int4", "bits", "group", "full"):
                raise LeanlmError(f"--kv item '{item}' does not combine with quest/topk (they keep the full cache "
                                  f"and choose keys per query); {_USAGE}")  # fmt: skip
            if key not in ("pages", "page", "keys", "sinks"):
                raise LeanlmError(f"unknown --kv item '{item}'; {_USAGE}")
            if val is None:
                raise LeanlmError(f"--kv item '{item}' needs a number; {_USAGE}")
            setattr(p, "sink_pages" if key == "sinks" else key, int(val))
        if method is None:
            raise LeanlmError(f"--kv '{spec}' names no sparse method; {_USAGE}")
        if method == "topk" and (p.pages, p.page, p.sink_pages) != (64, 16, 1):
            raise LeanlmError(f"pages/page/sinks are quest settings; for topk {_USAGE}")
        if method == "quest" and p.keys != 1024:
            raise LeanlmError(f"keys is a topk setting; for quest {_USAGE}")
        return p.validate()

    @staticmethod
    def wants(spec: str) -> bool:
        """Does this --kv spec name a sparse attention method?"""
        return any(re.match(r"(quest|topk)\b", s.strip()) for s in spec.split(","))


class SparseCache(KVCache):
    """The full cache [B, kv_heads, max_len, head_dim] plus, for quest, page bounds [B, kv_heads, pages, head_dim]
    (fp32 min and max); attention through `attend` (Python path) or `fused_sparse` (the fused decode step)."""

    custom_attention = True

    def __init__(self, policy: SparsePolicy, batch, n_kv_heads, max_len, head_dim, dtype, device=None):
        super().__init__(batch, n_kv_heads, max_len, head_dim, dtype, device)
        self.policy = policy
        self.mode = _MODE[policy.method]
        self.page = policy.page if policy.method == "quest" else 1
        self.budget = policy.pages if policy.method == "quest" else policy.keys
        self.sinks = policy.sink_pages if policy.method == "quest" else 0
        if policy.method == "quest":
            n = math.ceil(max_len / self.page)
            shape = (batch, n_kv_heads, n, head_dim)
            self.register_buffer("kmin", torch.full(shape, math.inf, device=device), persistent=False)
            self.register_buffer("kmax", torch.full(shape, -math.inf, device=device), persistent=False)
        else:
            self.kmin = self.kmax = torch.empty(0, device=device)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def fused_sparse(self, dtype: torch.dtype):
        """What ops.decode_layer_sparse takes (k, v, kmin, kmax, mode, budget, page, sinks), or None."""
        if self.k.dtype != dtype or not (self.k.is_contiguous() and self.v.is_contiguous()):
            return None
        return self.k, self.v, self.kmin, self.kmax, self.mode, self.budget, self.page, self.sinks

    def update_bounds(self, start: int, end: int, batch: int) -> None:
        """Recompute the bounds of the pages positions [start, end) touch, from the cache's keys [page start, end)."""
        P = self.page
        p0, p1 = start // P, (end - 1) // P
        keys = self.k[:batch, :, p0 * P : end].float()
        pad = (p1 - p0 + 1) * P - keys.shape[2]
        B, H, _, D = keys.shape
        self.kmin[:batch, :, p0 : p1 + 1] = F.pad(keys, (0, 0, 0, pad), value=math.inf).view(B, H, -1, P, D).amin(3)
        self.kmax[:batch, :, p0 : p1 + 1] = F.pad(keys, (0, 0, 0, pad), value=-math.inf).view(B, H, -1, P, D).amax(3)

    def attend(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        B, H, T, D = q.shape
        k_all, v_all = self.update(k, v, start)
        if self.mode == 0:
            self.update_bounds(start, start + T, B)
        if T > ops.MAX_ROWS:  # prefill: full attention, as the plain cache does
            return attn.attend(q, k, v, start) if start == 0 else attn.attend(q, k_all, v_all, start)
        args = (self.kmin, self.kmax, start, attn.window or 0, attn.scale, self.mode, self.budget, self.page, self.sinks)
        native = ops.available() and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
        if native and q.dtype == self.k.dtype and not (torch.is_grad_enabled() and q.requires_grad):
            out = ops.sparse_attention(q, self.k, self.v, *args)
            return out.view(B, T, H, D).transpose(1, 2)
        return sparse_reference(q, self.k[:B], self.v[:B], *args)


def select_keys(qg: torch.Tensor, logits: torch.Tensor | None, kmin: torch.Tensor | None, kmax: torch.Tensor | None,
                lo: int, qpos: int, mode: int, budget: int, page: int, sinks: int) -> torch.Tensor:  # fmt: skip
    """The positions (ascending) one kv group's query attends over. qg [G, D] fp32 queries of the group;
    logits [G, qpos - lo + 1] (topk); kmin / kmax [pages, D] the group's bounds (quest)."""
    if mode == 0:
        p0, p1 = lo // page, qpos // page
        if p1 - p0 + 1 <= budget:
            return torch.arange(lo, qpos + 1)
        pages = torch.arange(p0, p1 + 1)
        forced = (pages < sinks) | (pages == p1)
        mn, mx = kmin[p0 : p1 + 1], kmax[p0 : p1 + 1]
        bound = torch.maximum(qg[:, None] * mn[None], qg[:, None] * mx[None]).sum((0, 2))
        rest = pages[~forced][torch.sort(bound[~forced], descending=True, stable=True).indices]
        chosen = torch.cat([pages[forced], rest[: max(budget - int(forced.sum()), 0)]]).sort().values
        keys = (chosen[:, None] * page + torch.arange(page)[None]).flatten()
        return keys[(keys >= lo) & (keys <= qpos)]
    n = qpos - lo + 1
    if n <= budget:
        return torch.arange(lo, qpos + 1)
    best = (logits - logits.amax(-1, keepdim=True)).amax(0)
    return (torch.sort(best, descending=True, stable=True).indices[:budget] + lo).sort().values


@torch.no_grad()
def sparse_reference(q, cache_k, cache_v, kmin, kmax, start: int, window: int, scale: float, mode: int, budget: int,
                     page: int, sinks: int) -> torch.Tensor:  # fmt: skip
    """Torch version of ops.sparse_attention (the fallback and the tests' oracle): q [B, nh, T, hd] at positions
    start.., over cache_k / cache_v [B, nkv, L, hd] already holding their keys -> [B, nh, T, hd]."""
    B, H, T, D = q.shape
    Hkv = cache_k.shape[1]
    G = H // Hkv
    out = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    qf = q.float()
    for b in range(B):
        for t in range(T):
            qpos = start + t
            lo = max(0, qpos - window + 1) if window else 0
            for g in range(Hkv):
                qg = qf[b, g * G : (g + 1) * G, t]
                logits = qg @ cache_k[b, g, lo : qpos + 1].float().T * scale  # [G, n]
                bounds = (kmin[b, g], kmax[b, g]) if mode == 0 else (None, None)
                idx = select_keys(qg, logits, *bounds, lo, qpos, mode, budget, page, sinks)
                p = torch.softmax(logits[:, idx - lo], -1)
                out[b, g * G : (g + 1) * G, t] = (p @ cache_v[b, g, idx].float()).to(q.dtype)
    return out
