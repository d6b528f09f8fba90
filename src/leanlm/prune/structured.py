"""Structured pruning that physically shrinks the model: FFN neurons, attention heads, layers.

The weight matrices lose rows/columns (or whole blocks go), the per-layer LayerSpec is
updated, so the result is a smaller dense model: fewer bytes to read per decoded token, which
is what decode speed on a memory-bound CPU is made of. Uniform results save as a standard
transformers config; per-layer widths save in leanlm's layout (config.json `leanlm_layers`).

Importance scores are computed on the dense model in one layer-sequential calibration pass:
- neurons, "activation": max over calibration tokens of |h_j| * ||W_down[:, j]||, the largest
  residual-stream contribution neuron j ever makes (h = act(gate) * up);
  "wanda": sum_i |W_down[i, j]| * ||h_j||_2; "magnitude": ||[W_gate; W_up][j]|| * ||W_down[:, j]||.
- heads: the same three with the head's output o_h and its columns of W_o; a KV group scores
  the sum of its query heads. GQA is respected: either whole KV groups go (with their query
  heads), or the same number of query heads goes from every group.
- layers: block influence 1 - cos(x_in, x_out), averaged over tokens (ShortGPT); the blocks
  that change the residual stream least go.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..apply import record, register
from ..calibration import BlockRunner, capture_inputs
from ..errors import LeanlmError
from .heal import heal

KINDS = ("neurons", "heads", "layers")
IMPORTANCE = ("activation", "wanda", "magnitude")


@dataclass
class Structured:
    """kind: neurons | heads | layers. ratio: fraction of neurons / heads removed per layer
    (scope 'global' ranks neurons across layers: non-uniform widths). remove: number of
    layers to drop. head_mode: 'kv' (whole KV groups) | 'q' (query heads within each group).
    heal_steps: after pruning, distil the pruned model towards the unpruned one for this many steps (heal.py)."""

    kind: str = "neurons"
    ratio: float | None = None
    remove: int | None = None
    importance: str = "activation"
    scope: str = "layer"
    head_mode: str = "kv"
    multiple_of: int = 1
    heal_steps: int = 0

    @property
    def needs_calibration(self) -> bool:
        return self.kind == "layers" or self.importance != "magnitude" or self.heal_steps > 0

    def price(self, plan) -> None:
        """Nothing to add: the cost model reads the pruned widths from the model config itself."""

    def __post_init__(self):
        if not isinstance(self.heal_steps, int) or isinstance(self.heal_steps, bool) or self.heal_steps < 0:
            raise LeanlmError(f"heal_steps must be an integer >= 0, got {self.heal_steps!r}")
        if self.kind not in KINDS:
            raise LeanlmError(f"unknown structured kind '{self.kind}'; use one of: {', '.join(KINDS)}")
        if self.importance not in IMPORTANCE:
            raise LeanlmError(f"unknown importance '{self.importance}'; use one of: {', '.join(IMPORTANCE)}")
        if self.scope not in ("layer", "global"):
            raise LeanlmError(f"unknown scope '{self.scope}'; use layer (uniform widths) or global")
        if self.head_mode not in ("kv", "q"):
            raise LeanlmError(f"unknown head mode '{self.head_mode}'; use kv (whole KV groups) or q")
        if self.kind == "layers":
            if self.remove is None or self.remove < 1:
                raise LeanlmError("layer pruning needs --remove N with N >= 1 layers to drop, e.g. --remove 4")
        else:
            if self.ratio is None or not 0.0 < self.ratio < 1.0:
                raise LeanlmError(f"--ratio must be in (0, 1), got {self.ratio}; e.g. --ratio 0.25 removes a quarter")
            if self.multiple_of < 1:
                raise LeanlmError(f"multiple_of must be >= 1, got {self.multiple_of}")


# ---- physical surgery ---------------------------------------------------------------------
def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().contiguous(), requires_grad=False)


@torch.no_grad()
def shrink_mlp(model, i: int, keep: torch.Tensor) -> None:
    """Keep FFN neurons `keep` (indices) of layer i: rows of gate and up, columns of down."""
    mlp, spec = model.layers[i].mlp, model.config.layers[i]
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    f = mlp.ffn_dim
    gu = mlp.w_gate_up.weight
    mlp.w_gate_up.weight = _param(torch.cat([gu[keep], gu[f + keep]]))
    mlp.w_gate_up.out_features = 2 * len(keep)
    mlp.w_down.weight = _param(mlp.w_down.weight[:, keep])
    mlp.w_down.in_features = len(keep)
    mlp.ffn_dim = spec.ffn_dim = len(keep)


@torch.no_grad()
def shrink_attention(model, i: int, keep_q: torch.Tensor, keep_kv: torch.Tensor) -> None:
    """Keep query heads `keep_q` and KV heads `keep_kv` of layer i.

    Query heads must stay grouped as GQA needs: each kept KV head keeps the same number of
    its own query heads, in order (query head h belongs to KV head h // (n_heads / n_kv)).
    """
    attn, spec = model.layers[i].attn, model.config.layers[i]
    keep_q = torch.as_tensor(keep_q, dtype=torch.long).sort().values
    keep_kv = torch.as_tensor(keep_kv, dtype=torch.long).sort().values
    group = attn.n_heads // attn.n_kv_heads
    owners = keep_q // group
    per = torch.bincount(owners, minlength=attn.n_heads).tolist()
    counts = {per[k] for k in keep_kv.tolist()}
    if set(owners.tolist()) != set(keep_kv.tolist()) or len(counts) != 1 or 0 in counts:
        raise LeanlmError("head pruning must keep the same number (>= 1) of query heads in every kept KV group")
    hd, nh, nkv = attn.head_dim, attn.n_heads, attn.n_kv_heads

    def rows(heads, offset):
        return (offset + heads[:, None] * hd + torch.arange(hd)[None, :]).flatten()

    idx = torch.cat([rows(keep_q, 0), rows(keep_kv, nh * hd), rows(keep_kv, (nh + nkv) * hd)])
    attn.wqkv.weight = _param(attn.wqkv.weight[idx])
    if attn.wqkv.bias is not None:
        attn.wqkv.bias = _param(attn.wqkv.bias[idx])
    attn.wqkv.out_features = len(idx)
    attn.wo.weight = _param(attn.wo.weight[:, rows(keep_q, 0)])
    attn.wo.in_features = len(keep_q) * hd
    attn.n_heads, attn.n_kv_heads = spec.n_heads, spec.n_kv_heads = len(keep_q), len(keep_kv)
    q_dim, kv_dim = len(keep_q) * hd, len(keep_kv) * hd
    attn.split = (q_dim, kv_dim, kv_dim)
    attn.cache = None


def remove_layers(model, indices: list[int]) -> None:
    """Drop whole decoder blocks (and their LayerSpecs); rotary tables are rebuilt."""
    drop = set(indices)
    model.layers = nn.ModuleList(l for i, l in enumerate(model.layers) if i not in drop)
    model.config.layers = [s for i, s in enumerate(model.config.layers) if i not in drop]
    model.init_rope(model.device)
    model.clear_cache()


# ---- importance ----------------------------------------------------------------------------
class _Stats:
    """Per-layer calibration statistics gathered in one dense pass."""

    def __init__(self):
        self.neuron_max = self.neuron_sq = None  # [ffn]
        self.head_max = self.head_sq_cols = None  # [n_heads], [q_dim]
        self.influence = 0.0
        self.tokens = 0


def _stats_hook(st: _Stats, attn, wo_heads: torch.Tensor):
    """Forward-input hook filling `st`: neuron stats at w_down's input, head stats at wo's input."""

    def hook(name, x):
        if name == "down":
            amax = x.abs().amax(0)
            st.neuron_max = amax if st.neuron_max is None else torch.maximum(st.neuron_max, amax)
            sq = x.double().pow(2).sum(0)
            st.neuron_sq = sq if st.neuron_sq is None else st.neuron_sq + sq
        else:  # wo input: concatenated head outputs; a head's residual contribution is o_h @ W_o[:, h]^T
            o = x.reshape(x.shape[0], attn.n_heads, attn.head_dim)
            norms = torch.einsum("thd,hdo->tho", o, wo_heads).norm(dim=-1).amax(0)  # [h]
            st.head_max = norms if st.head_max is None else torch.maximum(st.head_max, norms)
            sq = x.double().pow(2).sum(0)
            st.head_sq_cols = sq if st.head_sq_cols is None else st.head_sq_cols + sq

    return hook


@torch.no_grad()
def collect_stats(model, tokens: torch.Tensor, want: str, progress: bool = True) -> list[_Stats]:
    """One dense layer-sequential pass: neuron / head statistics or block influence per layer."""
    runner = BlockRunner(model, tokens)
    out = []
    for i in tqdm(range(len(model.layers)), desc=f"{want} importance", disable=not progress, leave=False):
        layer, st = model.layers[i], _Stats()
        attn = layer.attn
        wo_heads = attn.wo.weight.float().T.reshape(attn.n_heads, attn.head_dim, -1)  # [h, hd, hidden]
        mods = {"down": layer.mlp.w_down} if want == "neurons" else {"wo": attn.wo} if want == "heads" else {}
        with capture_inputs(mods, _stats_hook(st, attn, wo_heads)):
            outs = runner.run(i)
        if want == "layers":
            cos = [F.cosine_similarity(a, b, dim=-1).mean().item() * a.shape[0] * a.shape[1] for a, b in zip(runner.xs, outs)]
            st.influence = 1.0 - sum(cos) / runner.n_tokens
        if want == "neurons":  # max_t |h_tj| * ||W_down[:, j]||: the largest residual contribution of neuron j
            st.neuron_max = st.neuron_max * layer.mlp.w_down.weight.float().norm(dim=0)
        st.tokens = runner.n_tokens
        out.append(st)
        runner.advance(outs)
    return out


def neuron_importance(model, i: int, how: str, st: _Stats | None) -> torch.Tensor:
    mlp = model.layers[i].mlp
    wd = mlp.w_down.weight.float()
    if how == "activation":
        return st.neuron_max
    if how == "wanda":
        return wd.abs().sum(0) * st.neuron_sq.float().sqrt()
    gu = mlp.w_gate_up.weight.float()
    f = mlp.ffn_dim
    return (gu[:f].pow(2).sum(1) + gu[f:].pow(2).sum(1)).sqrt() * wd.norm(dim=0)


def head_importance(model, i: int, how: str, st: _Stats | None) -> torch.Tensor:
    """Score per query head [n_heads]."""
    attn = model.layers[i].attn
    nh, hd = attn.n_heads, attn.head_dim
    wo = attn.wo.weight.float()
    if how == "activation":
        return st.head_max
    if how == "wanda":
        return (wo.abs() * st.head_sq_cols.float().sqrt()[None, :]).sum(0).reshape(nh, hd).sum(1)
    wq = attn.wqkv.weight.float()[: nh * hd]
    return wq.reshape(nh, -1).norm(dim=1) * wo.T.reshape(nh, -1).norm(dim=1)


def _round_keep(n: int, ratio: float, multiple: int) -> int:
    keep = round(n * (1 - ratio))
    keep = max(multiple, round(keep / multiple) * multiple)
    return min(keep, n)


# ---- entry point -----------------------------------------------------------------------------
def prune_structured(model, cfg: Structured, tokens: torch.Tensor | None = None, progress: bool = True) -> dict:
    """Shrink the model in place. Returns what was removed (indices per layer) and the params saved."""
    model.set_decode_layout(False)  # row-major weights: the rows this code slices and views
    before = sum(p.numel() for p in model.parameters())
    n_layers = len(model.layers)
    needs = cfg.kind == "layers" or cfg.importance != "magnitude"
    if cfg.needs_calibration and tokens is None:
        what = "healing" if not needs else f"{cfg.kind} pruning with '{cfg.importance}' importance"
        raise LeanlmError(f"{what} needs calibration tokens")
    teacher = copy.deepcopy(model) if cfg.heal_steps else None  # healing distils towards the unpruned model
    stats = collect_stats(model, tokens, cfg.kind, progress) if needs else [None] * n_layers
    report: dict = {"kind": cfg.kind, "importance": cfg.importance, "removed": {}}
    if cfg.kind == "layers":
        if cfg.remove >= n_layers:
            raise LeanlmError(f"cannot remove {cfg.remove} of {n_layers} layers; use --remove below {n_layers}")
        bi = [s.influence for s in stats]
        drop = sorted(sorted(range(n_layers), key=lambda j: bi[j])[: cfg.remove])
        remove_layers(model, drop)
        report.update(block_influence=bi, removed=drop)
    elif cfg.kind == "neurons":
        scores = [neuron_importance(model, i, cfg.importance, stats[i]) for i in range(n_layers)]
        if cfg.scope == "layer":
            keeps = [s.topk(_round_keep(len(s), cfg.ratio, cfg.multiple_of)).indices for s in scores]
        else:  # one ranking over all layers: widths differ per layer (leanlm layout on save)
            allv = torch.cat(scores)
            total = round(len(allv) * (1 - cfg.ratio))
            thresh = allv.topk(total).values[-1]
            keeps = []
            for s in scores:
                k = int((s >= thresh).sum())
                k = min(len(s), max(cfg.multiple_of, -(-k // cfg.multiple_of) * cfg.multiple_of))
                keeps.append(s.topk(k).indices)
        for i, keep in enumerate(keeps):
            f = model.layers[i].mlp.ffn_dim
            report["removed"][i] = sorted(set(range(f)) - set(keep.tolist()))
            shrink_mlp(model, i, keep)
    else:  # heads
        for i in range(n_layers):
            attn = model.layers[i].attn
            nh, nkv = attn.n_heads, attn.n_kv_heads
            group = nh // nkv
            s = head_importance(model, i, cfg.importance, stats[i]).reshape(nkv, group)
            if cfg.head_mode == "kv":
                n_drop = round(nkv * cfg.ratio)
                if n_drop >= nkv or n_drop == 0:
                    raise LeanlmError(f"layer {i} has {nkv} KV groups: ratio {cfg.ratio} removes {n_drop}; "
                                      f"pick a ratio removing 1..{nkv - 1} groups or use head_mode q")  # fmt: skip
                kv = s.sum(1).topk(nkv - n_drop).indices.sort().values
                q = (kv[:, None] * group + torch.arange(group)[None, :]).flatten()
            else:
                n_drop = round(group * cfg.ratio)
                if n_drop >= group or n_drop == 0:
                    raise LeanlmError(f"layer {i} has {group} query heads per KV group: ratio {cfg.ratio} removes "
                                      f"{n_drop} per group; pick a ratio removing 1..{group - 1}")  # fmt: skip
                kv = torch.arange(nkv)
                q = (s.topk(group - n_drop, dim=1).indices + torch.arange(nkv)[:, None] * group).flatten()
            report["removed"][i] = {"q_heads": sorted(set(range(nh)) - set(q.tolist())),
                                    "kv_heads": sorted(set(range(nkv)) - set(kv.tolist()))}  # fmt: skip
            shrink_attention(model, i, q, kv)
    after = sum(p.numel() for p in model.parameters())
    report.update(params_before=before, params_after=after, uniform=model.config.is_uniform(),
                  layers=len(model.layers))  # fmt: skip
    if teacher is not None:
        with torch.enable_grad():
            report["heal"] = heal(model, teacher, tokens, steps=cfg.heal_steps, progress=progress)
        del teacher
    record(model, cfg, {k: report[k] for k in ("params_before", "params_after", "layers")})
    return report


@register(Structured)
def _apply_structured(model, cfg: Structured, calib, progress: bool) -> dict:
    return prune_structured(model, cfg, None if calib is None else calib.tokens(), progress)
