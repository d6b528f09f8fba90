"""MLA-like KV compression: convert a model's attention so its cache holds a small latent per token.

    leanlm.apply(model, MLA(rank=64, rope_dims=16, heal_steps=200), calib)

Per layer (after MHA2MLA, arXiv 2502.14837, and TransMLA, arXiv 2502.07864):
- partial RoPE: each KV head keeps RoPE on `rope_dims` of its head_dim key dims (rope_dims / 2 frequency
  pairs; the query heads of its group follow). `select="norm"` keeps the pairs whose mean
  ||q_pair|| * ||k_pair|| over calibration tokens is largest (MHA2MLA's 2-norm criterion, summed over the
  group's query heads); "rotation" (the default) weighs that bound on a pair's score by how much RoPE
  turns it, the mean of 2|sin(w d / 2)| over distances d < HORIZON (removing RoPE from a slow pair changes
  little); "high" keeps the highest frequencies with no data. The other dims lose RoPE in both
  q and k (an approximation: healing makes up for it).
- joint low rank: the keys' no-RoPE dims and the values come from one latent c = A x of `rank` values:
  [k_nope; v] = B c + bias, with A = U^T W and B = U for U the top `rank` eigenvectors of W C W^T, W the
  stacked [W_k_nope; W_v] rows and C the calibration input covariance (`whiten`; identity otherwise), so
  U U^T W minimises the output error on calibration inputs. `balance` scales the key rows to the values'
  output norm first (TransMLA's KV balancing), so neither side takes the whole rank.
- the cache holds, per token and layer, c (rank values) + the RoPE'd key dims (n_kv_heads * rope_dims)
  (+ n_kv_heads inverse key norms on QK-norm models, Gemma 3); keys and values are rebuilt by the up
  projection when attended to (no absorption into q / o yet).
- healing: KL distillation towards the unconverted model (model/distill.py), training only the new
  projections (`heal_scope="latent"`: down and up; "attention": also the query and RoPE-key projections).

With rank = n_kv_heads * (2 * head_dim - rope_dims) and rope_dims = head_dim the conversion is exact.
A converted model saves with leanlm.save (its projections under "leanlm." names in model.safetensors) and
loads back with leanlm.load (`rebuild` shapes the layers from the model.applied entry first). Decode-time
KV policies (windows, int8 caches) do not combine with a converted layer yet (LeanlmError).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..apply import record, register
from ..calibration import BlockRunner, capture_inputs
from ..errors import LeanlmError
from ..model.runtime import Attention, KVCache, Linear

SELECT = ("rotation", "norm", "high")
HORIZON = 2048  # select=rotation: the distances (0..HORIZON-1) over which RoPE's removal is weighed
HEAL_SCOPES = ("latent", "attention")


@dataclass
class MLA:
    """rank: latent values per token and layer. rope_dims: key dims per KV head that keep RoPE (even, <= head_dim).
    select: rotation | norm | high (which RoPE frequency pairs stay). whiten: activation-aware low rank (input covariance).
    balance: scale keys to the values' norm before the joint low rank. heal_steps / heal_lr / heal_scope:
    distillation towards the unconverted model after the conversion (0 steps: none)."""

    rank: int = 64
    rope_dims: int = 16
    select: str = "rotation"
    whiten: bool = True
    balance: bool = True
    heal_steps: int = 0
    heal_lr: float = 1e-4
    heal_scope: str = "latent"

    @property
    def needs_calibration(self) -> bool:
        return self.select != "high" or self.whiten or self.heal_steps > 0

    def price(self, plan) -> None:
        """Nothing to add: the cost model has no latent-cache width yet (see kv_bytes_per_token)."""

    def __post_init__(self):
        def whole(name, v, lo):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise LeanlmError(f"mla {name} must be an integer >= {lo}, got {v!r}")

        whole("rank", self.rank, 1)
        whole("rope_dims", self.rope_dims, 0)
        whole("heal_steps", self.heal_steps, 0)
        if self.rope_dims % 2:
            raise LeanlmError(f"mla rope_dims must be even (RoPE rotates dims in pairs), got {self.rope_dims}; "
                              f"use {self.rope_dims + 1} or {self.rope_dims - 1}")  # fmt: skip
        if self.select not in SELECT:
            raise LeanlmError(f"unknown mla select '{self.select}'; use one of: {', '.join(SELECT)}")
        if self.heal_scope not in HEAL_SCOPES:
            raise LeanlmError(f"unknown mla heal_scope '{self.heal_scope}'; use one of: {', '.join(HEAL_SCOPES)}")
        if not isinstance(self.heal_lr, (int, float)) or not self.heal_lr > 0:
            raise LeanlmError(f"mla heal_lr must be > 0, got {self.heal_lr!r}")

    def check(self, attn) -> None:
        """Errors naming the fix when this config does not fit a layer's attention."""
        hd, nkv = attn.head_dim, attn.n_kv_heads
        if self.rope_dims > hd:
            raise LeanlmError(f"mla rope_dims {self.rope_dims} exceeds the head_dim {hd}; use rope_dims <= {hd}")
        full = nkv * (2 * hd - self.rope_dims)
        if self.rank > full:
            raise LeanlmError(f"mla rank {self.rank} exceeds the {full} key (no-RoPE) and value dims it compresses "
                              f"(n_kv_heads {nkv} x (2 x head_dim {hd} - rope_dims {self.rope_dims})); use rank <= {full}")  # fmt: skip


# ---- the converted attention and its cache ------------------------------------------------------
class LatentCache(nn.Module):
    """One layer's cache of a converted attention: latent c [B, max_len, rank], RoPE'd key dims
    [B, n_kv, max_len, rope_dims] and, with QK-norm, the keys' inverse RMS [B, n_kv, max_len, 1]."""

    custom_attention = False

    def __init__(self, batch: int, max_len: int, rank: int, n_kv: int, rope_dims: int, qk_norm: bool, dtype,
                 device=None):  # fmt: skip
        super().__init__()
        self.register_buffer("c", torch.zeros(batch, max_len, rank, dtype=dtype, device=device), persistent=False)
        self.register_buffer("kr", torch.zeros(batch, n_kv, max_len, rope_dims, dtype=dtype, device=device),
                             persistent=False)  # fmt: skip
        self.register_buffer("inv", torch.zeros(batch, n_kv, max_len, 1 if qk_norm else 0, dtype=dtype, device=device),
                             persistent=False)  # fmt: skip

    @property
    def max_len(self) -> int:
        return self.c.shape[1]

    def fused_kv(self, dtype):
        return None  # the fused decode step cannot read a latent: the attention runs its own forward

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.c, self.kr, self.inv))

    def update(self, c, kr, inv, start: int):
        B, T = c.shape[0], c.shape[1]
        end = start + T
        self.c[:B, start:end] = c
        self.kr[:B, :, start:end] = kr
        self.inv[:B, :, start:end] = inv
        return self.c[:B, :end], self.kr[:B, :, :end], self.inv[:B, :, :end]


class MLAAttention(Attention):
    """Attention whose keys' no-RoPE dims and values come from a per-token latent (see the module docstring).

    Head dims are reordered per KV head (its query heads alike, which leaves q.k unchanged): the rope_dims
    kept dims first, in RoPE's half-split layout, then the no-RoPE dims. `rope_idx` [n_kv, rope_dims] names
    the original dims kept, to gather the rotary tables' columns."""

    def __init__(self, base: Attention, rank: int, rope_idx: torch.Tensor, qkv_bias: bool):
        nn.Module.__init__(self)  # not Attention's: the projections differ
        self.n_heads, self.n_kv_heads, self.head_dim = base.n_heads, base.n_kv_heads, base.head_dim
        self.window, self.scale = base.window, base.scale
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        self.rank, self.rope_dims = rank, rope_idx.shape[1]
        self.nope_dims = hd - self.rope_dims
        hidden = base.wo.out_features
        self.register_buffer("rope_idx", rope_idx.to(torch.long).cpu(), persistent=False)
        self.mla_q = Linear(hidden, nh * hd, bias=qkv_bias)
        self.mla_kr = Linear(hidden, nkv * self.rope_dims, bias=qkv_bias)
        self.mla_down = Linear(hidden, rank, bias=False)
        self.mla_up = Linear(rank, nkv * (self.nope_dims + hd), bias=qkv_bias)
        self.wo = base.wo
        self.qk_norm = base.q_norm is not None
        self.eps, self.plus_one = (base.q_norm.eps, base.q_norm.plus_one) if self.qk_norm else (0.0, False)
        # per-head norm weights, reordered like the head dims (the shared [hd] weight no longer fits every head)
        self.mla_qn = nn.Parameter(torch.zeros(nh, hd), requires_grad=False) if self.qk_norm else None
        self.mla_kn = nn.Parameter(torch.zeros(nkv, hd), requires_grad=False) if self.qk_norm else None
        self.q_norm = self.k_norm = None
        self.cache = None

    def __setattr__(self, name, value):
        if name == "cache":  # model.setup_cache installs plain KV caches: keep a latent one instead
            value = self._latent_cache(value)
        super().__setattr__(name, value)

    def _latent_cache(self, c):
        if c is None or isinstance(c, LatentCache):
            return c
        if type(c) is not KVCache:
            raise LeanlmError(f"a KV-cache policy ({type(c).__name__}) does not combine with an mla-converted model "
                              "yet; run it without --kv / the recorded KV policy")  # fmt: skip
        return LatentCache(c.k.shape[0], c.max_len, self.rank, self.n_kv_heads, self.rope_dims, self.qk_norm,
                           c.k.dtype, c.k.device)  # fmt: skip

    def kv_values_per_token(self) -> int:
        return self.rank + self.n_kv_heads * (self.rope_dims + (1 if self.qk_norm else 0))

    def _norm(self, x, w):
        h = x.float()
        inv = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = (1.0 + w.float()) if self.plus_one else w.float()
        return h * inv * w, inv

    def _rope(self, x, cos, sin):
        half = x.shape[-1] // 2
        return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), sin)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], start: int) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd, dr = self.n_heads, self.n_kv_heads, self.head_dim, self.rope_dims
        group = nh // nkv
        dtype = x.dtype
        q = self.mla_q(x).view(B, T, nh, hd)
        kr = self.mla_kr(x).view(B, T, nkv, dr)
        c = self.mla_down(x)
        idx = self.rope_idx.to(rope[0].device)
        cos, sin = rope[0][:, 0][:, idx], rope[1][:, 0][:, idx]  # [T, nkv, dr]
        if self.qk_norm:
            q = self._norm(q, self.mla_qn)[0].to(dtype)
            kn = self.mla_up(c)[..., : nkv * self.nope_dims].view(B, T, nkv, -1)
            k_full = torch.cat([kr, kn], dim=-1)
            k_full, inv = self._norm(k_full, self.mla_kn)
            kr, inv = k_full[..., :dr].to(dtype), inv.to(dtype).transpose(1, 2)
        else:
            inv = kr.new_zeros(B, nkv, T, 0)
        qc, qs = cos.repeat_interleave(group, dim=1), sin.repeat_interleave(group, dim=1)
        q = torch.cat([self._rope(q[..., :dr], qc, qs), q[..., dr:]], dim=-1).transpose(1, 2)
        kr = self._rope(kr, cos, sin).transpose(1, 2)  # [B, nkv, T, dr]
        if self.cache is not None:
            c_all, kr_all, inv_all = self.cache.update(c, kr, inv, start)
        elif start != 0:
            raise ValueError("start > 0 needs a KV cache (call model.setup_cache)")
        else:
            c_all, kr_all, inv_all = c, kr, inv
        S = c_all.shape[1]
        up = self.mla_up(c_all)
        kn = up[..., : nkv * self.nope_dims].view(B, S, nkv, -1).transpose(1, 2)
        v = up[..., nkv * self.nope_dims :].view(B, S, nkv, hd).transpose(1, 2)
        if self.qk_norm:
            w = (1.0 + self.mla_kn.float()) if self.plus_one else self.mla_kn.float()
            kn = (kn.float() * inv_all.float() * w[None, :, None, dr:]).to(dtype)
        k = torch.cat([kr_all, kn], dim=-1).contiguous()
        out = self.attend(q.contiguous(), k, v.contiguous(), start)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


# ---- conversion ----------------------------------------------------------------------------------
def _pair_dims(pairs: torch.Tensor, hd: int) -> torch.Tensor:
    """Head dims of frequency pairs (sorted) in RoPE's half-split layout: first halves, then second halves."""
    pairs = pairs.sort().values
    return torch.cat([pairs, pairs + hd // 2])


def _head_perm(rope_idx_g: torch.Tensor, hd: int) -> torch.Tensor:
    kept = set(rope_idx_g.tolist())
    return torch.cat([rope_idx_g, torch.tensor([d for d in range(hd) if d not in kept], dtype=torch.long)])


class _LayerStats:
    def __init__(self):
        self.cov = None
        self.q_pair = self.k_pair = None
        self.n = 0


@torch.no_grad()
def collect_stats(model, tokens: torch.Tensor, want_cov: bool, want_pairs: bool, progress: bool = True) -> list:
    """One layer-sequential pass over the unconverted model: per layer the attention input's covariance
    (sum x x^T / n) and the mean per-pair norms of q and k (after QK-norm, before RoPE)."""
    runner = BlockRunner(model, tokens)
    out = []
    for i in tqdm(range(len(model.layers)), desc="mla statistics", disable=not progress, leave=False):
        attn, st = model.layers[i].attn, _LayerStats()
        nh, nkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
        W = attn.wqkv.weight.float()
        b = None if attn.wqkv.bias is None else attn.wqkv.bias.float()

        def hook(_name, x, st=st, attn=attn, W=W, b=b):
            if want_cov:
                st.cov = x.t() @ x if st.cov is None else st.cov.addmm_(x.t(), x)
            if want_pairs:
                qk = F.linear(x, W[: (nh + nkv) * hd], None if b is None else b[: (nh + nkv) * hd])
                q, k = qk[:, : nh * hd].view(-1, nh, hd), qk[:, nh * hd :].view(-1, nkv, hd)
                if attn.q_norm is not None:
                    q, k = attn.q_norm(q).float(), attn.k_norm(k).float()
                half = hd // 2
                qp = (q[..., :half].pow(2) + q[..., half:].pow(2)).sqrt().sum(0)  # [nh, half]
                kp = (k[..., :half].pow(2) + k[..., half:].pow(2)).sqrt().sum(0)
                st.q_pair = qp if st.q_pair is None else st.q_pair + qp
                st.k_pair = kp if st.k_pair is None else st.k_pair + kp
            st.n += x.shape[0]

        with capture_inputs({"wqkv": attn.wqkv}, hook):
            outs = runner.run(i)
        out.append(st)
        runner.advance(outs)
    return out


def select_pairs(attn, cfg: MLA, st: _LayerStats | None, inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """Frequency pairs kept per KV head [n_kv, rope_dims / 2] (inv_freq [head_dim / 2]: select=rotation)."""
    nh, nkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    n = cfg.rope_dims // 2
    if cfg.select == "high" or st is None:
        return torch.arange(n).repeat(nkv, 1)
    q = (st.q_pair / st.n).view(nkv, nh // nkv, hd // 2).sum(1)
    score = q * (st.k_pair / st.n)  # [nkv, half]: Cauchy-Schwarz bound of each pair's share of q.k
    if cfg.select == "rotation":  # |q.k with RoPE - q.k without| <= bound * 2|sin(w d / 2)| at distance d
        d = torch.arange(HORIZON, dtype=torch.float64)
        turn = (2 * torch.sin(torch.outer(inv_freq.double().cpu(), d) / 2).abs()).mean(1)
        score = score * turn.float()[None]
    return score.topk(n, dim=1).indices.sort(dim=1).values


@torch.no_grad()
def convert_layer(layer, cfg: MLA, pairs: torch.Tensor, cov: torch.Tensor | None) -> dict:
    """Replace layer.attn by an MLAAttention (pairs [n_kv, rope_dims/2]: frequency pairs kept per KV head);
    returns the low rank's kept output energy on the calibration inputs."""
    attn = layer.attn
    nh, nkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    group, dr = nh // nkv, cfg.rope_dims
    dn = hd - dr
    W = attn.wqkv.weight.float()
    b = attn.wqkv.bias
    b = None if b is None else b.float()
    Wq, Wk, Wv = W.split(attn.split)
    rope_idx = torch.stack([_pair_dims(p, hd) for p in pairs]) if dr else torch.zeros(nkv, 0, dtype=torch.long)
    perms = [_head_perm(rope_idx[g], hd) for g in range(nkv)]
    q_rows = torch.cat([(h * hd) + perms[h // group] for h in range(nh)])
    k_rows = torch.stack([g * hd + perms[g] for g in range(nkv)])  # [nkv, hd]
    kr_rows, kn_rows = k_rows[:, :dr].flatten(), k_rows[:, dr:].flatten()
    Wj = torch.cat([Wk[kn_rows], Wv])  # [nkv*dn + nkv*hd, hidden]: what the latent carries
    C = torch.eye(W.shape[1]) if cov is None else cov.float()
    scale = torch.ones(Wj.shape[0])
    if cfg.balance and dn:
        ek = torch.einsum("ij,jk,ik->", Wk[kn_rows], C, Wk[kn_rows]).clamp_min(1e-12)
        ev = torch.einsum("ij,jk,ik->", Wv, C, Wv)
        scale[: nkv * dn] = (ev / ek).sqrt() * math.sqrt(nkv * dn / (nkv * hd))  # equal energy per row
    Wb = Wj * scale[:, None]
    M = (Wb @ C @ Wb.T).double()
    evals, evecs = torch.linalg.eigh(M)
    U = evecs[:, -cfg.rank :].flip(1).float()  # top `rank` directions, largest first
    kept = float(evals[-cfg.rank :].clamp_min(0).sum() / evals.clamp_min(0).sum().clamp_min(1e-30))
    A = U.T @ Wb  # [rank, hidden]
    Bm = U / scale[:, None]
    bias = attn.wqkv.bias is not None
    new = MLAAttention(attn, cfg.rank, rope_idx, bias)
    dt = attn.wqkv.weight.dtype
    new.mla_q.weight = _p(Wq[q_rows], dt)
    new.mla_kr.weight = _p(Wk[kr_rows], dt)
    new.mla_down.weight = _p(A, dt)
    new.mla_up.weight = _p(Bm, dt)
    if bias:
        bq, bk, bv = b.split(attn.split)
        new.mla_q.bias = _p(bq[q_rows], dt)
        new.mla_kr.bias = _p(bk[kr_rows], dt)
        new.mla_up.bias = _p(torch.cat([bk[kn_rows], bv]), dt)
    if new.qk_norm:
        new.mla_qn = _p(torch.stack([attn.q_norm.weight.float()[perms[h // group]] for h in range(nh)]), dt)
        new.mla_kn = _p(torch.stack([attn.k_norm.weight.float()[perms[g]] for g in range(nkv)]), dt)
    new.to(attn.wo.weight.device)
    layer.attn = new
    return {"kept_energy": round(kept, 6)}


def _p(t: torch.Tensor, dtype) -> nn.Parameter:
    return nn.Parameter(t.detach().to(dtype).contiguous(), requires_grad=False)


def kv_bytes_per_token(model, dtype: torch.dtype | None = None) -> int:
    """KV-cache bytes one token takes over all layers, stored in `dtype` (default: the model's; a converted
    layer: its latent + RoPE'd key dims)."""
    el = torch.empty(0, dtype=dtype or model.dtype).element_size()
    n = 0
    for layer in model.layers:
        a = layer.attn
        n += a.kv_values_per_token() if isinstance(a, MLAAttention) else 2 * a.n_kv_heads * a.head_dim
    return n * el


def convert(model, cfg: MLA, tokens: torch.Tensor | None = None, progress: bool = True, stats: list | None = None) -> dict:
    """Convert every layer's attention in place (see the module docstring); returns a report. `stats`:
    collect_stats(model, tokens, True, True) computed once for several conversions of the same model."""
    for i, layer in enumerate(model.layers):
        a = layer.attn
        if isinstance(a, MLAAttention):
            raise LeanlmError("this model's attention is already mla-converted; convert the original model instead")
        if type(a) is not Attention or type(a.wqkv) is not Linear:
            raise LeanlmError(f"layer {i}'s attention is not the stock dense one ({type(a.wqkv).__name__}); apply mla "
                              "before quantization or other methods that replace the attention")  # fmt: skip
        cfg.check(a)
    if cfg.needs_calibration and tokens is None:
        raise LeanlmError("mla needs calibration tokens (select=norm, whiten or healing); pass calib, or use "
                          "select=high, whiten=False, heal_steps=0")  # fmt: skip
    if cfg.heal_steps and model.dtype != torch.float32:
        raise LeanlmError("mla healing trains in float32: load the model with dtype float32 (or heal_steps=0)")
    model.set_decode_layout(False)
    model.clear_cache()
    before = kv_bytes_per_token(model)
    teacher = copy.deepcopy(model) if cfg.heal_steps else None
    want_pairs = cfg.select != "high" and cfg.rope_dims > 0
    if stats is None and (cfg.whiten or want_pairs):
        stats = collect_stats(model, tokens, cfg.whiten, want_pairs, progress)
    pairs, energy = [], []
    for i, layer in enumerate(model.layers):
        st = None if stats is None else stats[i]
        p = select_pairs(layer.attn, cfg, st if want_pairs else None, model.rope[model._rope_names[i]].inv_freq)
        cov = None if st is None or st.cov is None or not cfg.whiten else st.cov / max(st.n, 1)
        energy.append(convert_layer(layer, cfg, p, cov)["kept_energy"])
        pairs.append(p.tolist())
    report = {"kv_bytes_per_token_before": before, "kv_bytes_per_token_after": kv_bytes_per_token(model),
              "rope_pairs": pairs, "kept_energy": energy}  # fmt: skip
    report["kv_ratio"] = round(before / report["kv_bytes_per_token_after"], 4)
    if teacher is not None:
        report["heal"] = heal(model, teacher, tokens, cfg.heal_steps, cfg.heal_lr, cfg.heal_scope, progress)
        del teacher
    record(model, cfg, {k: report[k] for k in ("kv_bytes_per_token_before", "kv_bytes_per_token_after", "kv_ratio",
                                               "rope_pairs")})  # fmt: skip
    return report


def heal(model, teacher, tokens: torch.Tensor, steps: int, lr: float = 1e-4, scope: str = "latent",
         progress: bool = True) -> dict:
    """Distil the converted `model` towards `teacher` (the unconverted model) on windows `tokens` [n, T],
    training only the converted attention's projections (scope latent: down and up; attention: all of them)."""
    from ..model.distill import distill

    if scope not in HEAL_SCOPES:
        raise LeanlmError(f"unknown mla heal scope '{scope}'; use one of: {', '.join(HEAL_SCOPES)}")
    if model.dtype != torch.float32:
        raise LeanlmError("mla healing trains in float32: load the model with dtype float32")
    names = ("mla_down", "mla_up") + (("mla_q", "mla_kr", "mla_qn", "mla_kn") if scope == "attention" else ())
    params = [p for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] in names or n.rsplit(".", 1)[-1] in names]
    if not params:
        raise LeanlmError("the model has no mla-converted attention to heal; apply MLA first")
    with torch.enable_grad():
        h = distill(model, teacher, tokens, params, steps, lr, progress=progress, desc="mla heal")
    return {k: h[k] for k in ("steps", "lr", "first_loss", "last_loss", "seconds", "seq_len") if k in h}


@register(MLA)
def _apply_mla(model, cfg: MLA, calib, progress: bool) -> dict:
    return convert(model, cfg, None if calib is None else calib.tokens(), progress)


# ---- load: shape the layers before the saved weights are assigned --------------------------------
def rebuild(model, applied: list[dict]) -> None:
    """Give `model` (fresh, usually on the meta device) the converted attention shapes that the newest MLA
    entry of `applied` records, so leanlm.load can assign the saved weights."""
    entry = next((e for e in reversed(applied) if e.get("type") == "MLA"), None)
    if entry is None:
        return
    cfg = MLA(**{k: v for k, v in entry["config"].items() if k in MLA.__dataclass_fields__})
    pairs = (entry.get("result") or {}).get("rope_pairs")
    if not isinstance(pairs, list) or len(pairs) != len(model.layers):
        raise LeanlmError("the saved MLA entry lacks its per-layer rope_pairs; re-convert and re-save the model")
    bias = model.config.qkv_bias
    for layer, p in zip(model.layers, pairs):
        a = layer.attn
        p = torch.tensor(p, dtype=torch.long).view(a.n_kv_heads, -1)
        idx = torch.stack([_pair_dims(x, a.head_dim) for x in p]) if p.numel() else torch.zeros(a.n_kv_heads, 0, dtype=torch.long)
        with torch.device(a.wo.weight.device):
            layer.attn = MLAAttention(a, cfg.rank, idx, bias)

