"""AWQ: activation-aware per-input-channel scaling, then clipping (Lin et al., "AWQ", 2023).

Salient input channels (large mean |x|) lose less to rounding when their weight columns are
scaled up by s and the input divided by s. The division is folded into the op that produces
the input, so the model computes the same function in full precision:

    attn.wqkv   <- attn_norm weight        (Gemma's (1 + w) norms: w' = (1 + w) / s - 1)
    attn.wo     <- v rows of attn.wqkv     (with grouped-query attention, q heads sharing a kv
                                            head share its scales, so one v row serves them all)
    mlp.w_gate_up <- mlp_norm weight
    mlp.w_down  <- up rows of mlp.w_gate_up

s = mean|x|^a / sqrt(max * min), with a searched on a grid in [0, 1) (a = 0 is plain RTN). The
loss of a candidate is the Linear's output error over all calibration rows,
tr(dW H dW^T) with H = X^T X / n, so a candidate costs one [N, K] x [K, K] product rather than a
forward pass. The clipping search then shrinks each (row, group) range by the factor that
minimises that group's output error dW_g H_gg dW_g^T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import QSpec
from .gptq import gptq
from .rtn import fake_quantize, rtn


def output_error(dW: torch.Tensor, H: torch.Tensor) -> float:
    """tr(dW H dW^T): summed squared output error over the calibration rows (per row of X)."""
    return float(((dW @ H) * dW).sum())


@torch.no_grad()
def search_scale(W: torch.Tensor, H: torch.Tensor, act_mean: torch.Tensor, spec: QSpec, grid: int = 20,
                 tie=None) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Best input-channel scales s [K] for W [N, K]. `tie` maps a [K] vector to one that is
    constant over channels that must share a scale (grouped-query attention)."""
    W = W.float()
    a = act_mean.float().clamp_min(1e-8)
    if tie is not None:
        a = tie(a)
    best, best_s, losses = float("inf"), torch.ones_like(a), []
    for k in range(grid):
        alpha = k / grid
        s = a.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        dW = W - fake_quantize(W * s, spec) / s
        loss = output_error(dW, H)
        losses.append(loss)
        if loss < best:
            best, best_s = loss, s
    return best_s, {"losses": losses, "alpha": losses.index(best) / grid, "rtn_loss": losses[0], "loss": best}


@torch.no_grad()
def search_clip(W: torch.Tensor, H: torch.Tensor, spec: QSpec, grid: int = 20, max_shrink: float = 0.5,
                chunk: int = 1024) -> torch.Tensor:  # fmt: skip
    """Per (row, group) shrink factor in (max_shrink, 1] minimising dW_g H_gg dW_g^T."""
    N, K = W.shape
    g, G, Kp = spec.group_size(K), spec.n_groups(K), spec.padded(K)
    Hp = F.pad(H.float(), (0, Kp - K, 0, Kp - K))  # padded columns contribute nothing
    Hb = torch.stack([Hp[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(G)])  # [G, g, g]
    ratios = [1 - i / grid for i in range(int(round((1 - max_shrink) * grid)))] or [1.0]
    best_r = torch.ones(N, G)
    for n0 in range(0, N, chunk):
        Wc = W[n0 : n0 + chunk].float()
        n = Wc.shape[0]
        best_err = torch.full((n, G), float("inf"))
        for r in ratios:
            dW = F.pad(Wc - fake_quantize(Wc, spec, r), (0, Kp - K)).view(n, G, g)
            err = torch.einsum("ngi,gij,ngj->ng", dW, Hb, dW)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r[n0 : n0 + n] = torch.where(better, torch.full_like(err, r), best_r[n0 : n0 + n])
    return best_r


def fold_into_norm(norm, s: torch.Tensor) -> None:
    """Divide a (Gemma: 1 + w) RMSNorm's effective weight by s."""
    w = norm.weight.data.float()
    new = (1.0 + w) / s - 1.0 if norm.plus_one else w / s
    norm.weight.data = new.to(norm.weight.dtype)


def gqa_tie(n_heads: int, n_kv_heads: int, head_dim: int):
    """[n_heads * head_dim] -> same shape, averaged over the q heads that share a kv head."""
    rep = n_heads // n_kv_heads

    def tie(v: torch.Tensor) -> torch.Tensor:
        m = v.view(n_kv_heads, rep, head_dim).mean(1, keepdim=True)
        return m.expand(n_kv_heads, rep, head_dim).reshape(-1)

    return tie


@torch.no_grad()
def awq_block(layer, stats: dict, specs: dict, cfg, make_linear) -> dict:
    """Search, fold and apply AWQ scales for one decoder block, then clip and quantize.

    stats: linear name -> (H, mean|x|) from the block's calibration inputs; specs: linear name ->
    QSpec (names not in specs are left in full precision, but may still absorb a fold).
    make_linear(name, QuantizedWeight, bias) installs the quantized module.
    """
    attn, mlp = layer.attn, layer.mlp
    q_dim, kv_dim, _ = attn.split
    ffn = mlp.ffn_dim
    report = {}
    scales = {}
    lin = {"attn.wqkv": attn.wqkv, "attn.wo": attn.wo, "mlp.w_gate_up": mlp.w_gate_up, "mlp.w_down": mlp.w_down}
    for name, module in lin.items():
        if name not in specs or name not in stats:
            continue
        H, a = stats[name]
        tie = gqa_tie(attn.n_heads, attn.n_kv_heads, attn.head_dim) if name == "attn.wo" else None
        s, info = search_scale(module.weight, H, a, specs[name], cfg.grid, tie)
        scales[name] = s
        report[name] = {"alpha": info["alpha"], "rtn_loss": info["rtn_loss"], "loss": info["loss"]}

    # fold 1/s into the producer of each input, s into the consumer's columns
    if "attn.wqkv" in scales:
        fold_into_norm(layer.attn_norm, scales["attn.wqkv"])
    if "attn.wo" in scales:  # v rows: one scale per kv channel (the q heads sharing it agree)
        rep = attn.n_heads // attn.n_kv_heads
        t = scales["attn.wo"].view(attn.n_kv_heads, rep, attn.head_dim)[:, 0].reshape(-1)
        rows = slice(q_dim + kv_dim, q_dim + 2 * kv_dim)
        attn.wqkv.weight.data[rows] = (attn.wqkv.weight.data[rows].float() / t[:, None]).to(attn.wqkv.weight.dtype)
        if attn.wqkv.bias is not None:
            attn.wqkv.bias.data[rows] = (attn.wqkv.bias.data[rows].float() / t).to(attn.wqkv.bias.dtype)
    if "mlp.w_gate_up" in scales:
        fold_into_norm(layer.mlp_norm, scales["mlp.w_gate_up"])
    if "mlp.w_down" in scales:
        up = mlp.w_gate_up.weight.data[ffn:]
        mlp.w_gate_up.weight.data[ffn:] = (up.float() / scales["mlp.w_down"][:, None]).to(up.dtype)
    for name, s in scales.items():
        m = lin[name]
        m.weight.data = (m.weight.data.float() * s).to(m.weight.dtype)

    for name, module in lin.items():
        if name not in specs:
            continue
        W = module.weight.data.float()
        shrink, H = None, None
        if name in stats:
            H = stats[name][0]
            if name in scales:  # the Hessian of the scaled inputs x / s
                s = scales[name]
                H = H / s[:, None] / s[None, :]
        if cfg.clip and H is not None:
            shrink = search_clip(W, H, specs[name], cfg.clip_grid, cfg.max_shrink)
            report.setdefault(name, {})["mean_clip"] = float(shrink.mean())
        if cfg.gptq and H is not None:
            qw = gptq(W, H, specs[name], act_order=True, shrink=shrink)
        else:
            qw = rtn(W, specs[name], shrink, residual=cfg.tune_codes or cfg.recon_steps > 0)
        make_linear(name, qw, module.bias)
    return report
