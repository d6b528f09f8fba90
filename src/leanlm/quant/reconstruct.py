"""Block-wise reconstruction of a quantized decoder block (AutoRound / BRECQ style).

GPTQ and AWQ round each Linear against that Linear's own output error. Here, once a block's
Linears are quantized, their grids (every group's scale and zero) and their rounding (each code
may move one step, tune.TunableQuantLinear) are trained so that the *block's* output on the
inputs that reach it through the already-quantized blocks matches the unquantized block's output
on the unquantized inputs:

    min  || qblock(x_q) - block(x) ||^2      (x: fp32 stream, x_q: quantized stream)

so each block also makes up for the error the blocks before it left in the residual stream.
This is AutoRound's objective (Cheng et al. 2023, signed-gradient rounding + min/max tuning)
with Adam, on the same trainable grid and codes as end-to-end tuning (tune.py): one block's
3-4M weights see every calibration token, where the end-to-end loop's per-weight gradients
came from one window per step. Storage and kernels are unchanged.
"""

from __future__ import annotations

import torch

from .calibrate import LINEARS, get_module, set_module
from .packed import QuantLinear
from .tune import TunableQuantLinear


def reconstruct_block(layer, xq: list[torch.Tensor], yfp: list[torch.Tensor], rope, dtype, residuals: dict,
                      steps: int, lr: float, batch: int = 4, seed: int = 0, loss: str = "mse") -> dict:  # fmt: skip
    """Train `layer`'s quantized Linears in place (grid and, where `residuals` has their rounding
    error, codes) so that its outputs on the quantized stream `xq` match `yfp`, the unquantized
    block's outputs on the unquantized stream. xq / yfp: lists of [b, T, D] batches of the same
    windows; `batch` windows per step. Returns the loss over all windows (MSE / mean square of
    the target) before and after, with the grid and codes as stored.

    loss "mse": plain squared error. "channel": each residual-stream channel's error divided by that
    channel's mean square, so that the few channels with massive activations (SmolLM2's stream
    from block 11 on) do not drown the rest of the error."""
    target, inputs = torch.cat(yfp), torch.cat(xq)
    power = target.pow(2).mean(dim=(0, 1))  # per channel
    if loss == "channel":
        weight = 1.0 / power.clamp_min(1e-2 * power.median())
    else:
        weight = torch.full_like(power, 1.0 / float(power.mean()))  # relative to the output's power
    n = inputs.shape[0]

    def loss_on(idx) -> torch.Tensor:
        return ((layer(inputs[idx], rope, 0, dtype).float() - target[idx]).pow(2) * weight).mean()

    def full_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_on(torch.arange(i, min(i + batch, n)))) * (min(i + batch, n) - i)
                       for i in range(0, n, batch)) / n  # fmt: skip

    before = full_loss()
    names = [name for name in LINEARS if isinstance(get_module(layer, name), QuantLinear)]
    tun = {name: TunableQuantLinear(get_module(layer, name), residuals.get(name)) for name in names}
    for name, t in tun.items():
        set_module(layer, name, t)
    params = [p for t in tun.values() for p in (t.log_scale, t.zero_shift, t.code_shift) if p is not None]
    frozen = [p for p in layer.parameters() if p.requires_grad]
    for p in frozen:  # norms and biases stay as they are
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randperm(n, generator=g)[: min(batch, n)]
                loss = loss_on(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for t in tun.values():
                    t.clamp_codes()
        with torch.no_grad():
            moved = sum(int((t.codes() != t.centered).sum()) for t in tun.values() if t.code_shift is not None)
            total = sum(t.centered.numel() for t in tun.values())
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
        for name, t in tun.items():
            set_module(layer, name, t.to_quant_linear())
    return {"loss_before": before, "loss_after": full_loss(), "codes_changed": moved / total}


__all__ = ["reconstruct_block"]
