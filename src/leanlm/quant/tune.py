"""End-to-end tuning of quantization grids (scales and zeros), and optionally of the codes' rounding.

GPTQ and AWQ choose each layer's codes and grid from that layer's own output error; the errors
of 30 layers then add up in the model's output. Here the codes stay as rounded, and every
group's scale and zero (about 2 numbers per 128 weights) are trained by logit distillation
towards the unquantized model (KL, model/distill.py), the idea of PEQA (Kim et al. 2023) and
EfficientQAT's E2E-QP phase (Chen et al. 2024). The stored format is unchanged: the same
codes, bf16 scales / zeros, the same kernels and bytes.

The forward pass of the tuned model rebuilds each weight from codes and the current grid and
rounds scale and zero to bfloat16 with a straight-through gradient, so training sees exactly
the grid that will be stored. Scales are trained in log space (s = s0 * exp(a)) and zeros in
units of the initial scale (z = z0 + s0 * b), so one learning rate fits every layer.

With learnable rounding (`codes`) the integer codes may move too, by at most one step up or down:
every weight gets an offset v in [-1, 1] (code units) and the forward pass uses round(q + v) with a
straight-through gradient, the learnable rounding of AdaRound (Nagel et al. 2020) and AutoRound
(Cheng et al. 2023), here trained end to end on the model's KL rather than block by block. v starts
at the weight's own rounding error (GPTQ's error-compensated value, or the weight itself for RTN,
minus its code): a weight that sat near the midpoint between two codes flips after a small push,
one that sat on its code needs a long, consistent one. Storage and kernels are still unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeanlmError
from ..model.distill import distill
from .calibrate import get_module, set_module
from .packed import QuantLinear, exported_weight
from .rtn import QuantizedWeight


def _bf16_ste(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bfloat16 in the forward pass, identity in the backward pass."""
    return x + (x.to(torch.bfloat16).float() - x).detach()


class TunableQuantLinear(nn.Module):
    """A QuantLinear's frozen codes with a trainable grid (float32 math, autograd-friendly)."""

    def __init__(self, qlin: QuantLinear, residual: torch.Tensor | None = None):
        super().__init__()
        t, meta = qlin.export()
        qw = exported_weight(t, meta)
        self.spec, self.in_features, self.out_features = qw.spec, qw.in_features, qw.out_features
        N, Kp = qw.q.shape
        G = qw.scale.shape[1]
        self.register_buffer("centered", (qw.q.float() - self.spec.mid).view(N, G, Kp // G))
        self.register_buffer("scale0", qw.scale.float())
        self.register_buffer("zero0", None if qw.zero is None else qw.zero.float())
        self.register_buffer("bias", t.get("bias"))
        self.log_scale = nn.Parameter(torch.zeros(N, G), requires_grad=False)
        self.zero_shift = nn.Parameter(torch.zeros(N, G), requires_grad=False) if self.zero0 is not None else None
        # learnable rounding: offsets in code units, kept in [-1, 1] by clamp_codes(); they start inside
        # (-0.5, 0.5), so the codes do not change until trained
        self.code_shift = None if residual is None else nn.Parameter(
            residual.float().view_as(self.centered).clamp(-0.499, 0.499), requires_grad=False)  # fmt: skip

    def codes(self) -> torch.Tensor:
        """Centred integer codes as float [N, G, group]; with learnable rounding, round(q + v) clamped
        to the code range, straight-through."""
        if self.code_shift is None:
            return self.centered
        x = self.centered + self.code_shift
        return x + (torch.round(x).clamp(-self.spec.mid, self.spec.qmax - self.spec.mid) - x).detach()

    @torch.no_grad()
    def clamp_codes(self) -> None:
        if self.code_shift is not None:
            self.code_shift.clamp_(-1.0, 1.0)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, zero) float32 [N, G] on the bfloat16 grid (straight-through)."""
        scale = _bf16_ste(self.scale0 * torch.exp(self.log_scale))
        zero = None if self.zero0 is None else _bf16_ste(self.zero0 + self.scale0 * self.zero_shift)
        return scale, zero

    def weight(self) -> torch.Tensor:
        scale, zero = self.grid()
        w = self.codes() * scale[..., None]
        if zero is not None:
            w = w + zero[..., None]
        return w.view(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight(), self.bias).to(x.dtype)

    def to_quant_linear(self) -> QuantLinear:
        scale, zero = self.grid()
        N = self.out_features
        q = (self.codes().detach() + self.spec.mid).view(N, -1).to(torch.uint8)
        zero = None if zero is None else zero.detach().to(torch.bfloat16)
        qw = QuantizedWeight(q, scale.detach().to(torch.bfloat16), zero, self.spec, self.in_features)
        return QuantLinear(qw, self.bias)


class _FrozenHead(nn.Module):
    """A quantized LM head as a dense frozen weight: its many-row path writes with `out=`,
    which autograd refuses; gradients must still reach the hidden states."""

    def __init__(self, qlin: QuantLinear):
        super().__init__()
        self.register_buffer("weight", qlin.dequantize())
        self.register_buffer("bias", qlin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight, self.bias).to(x.dtype)


def tune_grids(model, teacher, tokens: torch.Tensor, steps: int = 200, lr: float = 1e-3, batch_size: int = 1,
               seed: int = 0, progress: bool = True, codes: dict | None = None, codes_lr: float = 2e-3) -> dict:  # fmt: skip
    """Train the scales and zeros of every quantized decoder Linear of `model` (in place) so
    that its next-token distributions match `teacher`'s on windows `tokens` [n, T]. `codes`:
    {Linear name: rounding residual [N, Kp] (QuantizedWeight.residual)} to also learn each of those
    weights' rounding (one code step at most, learning rate `codes_lr`)."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and n.startswith("layers.")]
    if not names:
        raise LeanlmError("grid tuning needs a quantized model (no quantized decoder Linear found)")
    head = model.lm_head
    tunables = {}
    for n in names:
        tunables[n] = TunableQuantLinear(get_module(model, n), (codes or {}).get(n))
        set_module(model, n, tunables[n])
    if isinstance(head, QuantLinear):
        model.lm_head = _FrozenHead(head)
    params = [{"params": [p for t in tunables.values() for p in (t.log_scale, t.zero_shift) if p is not None]}]
    shifts = [t.code_shift for t in tunables.values() if t.code_shift is not None]
    if codes and not shifts:
        raise LeanlmError("learnable rounding needs the rounding residuals of the quantized Linears (GPTQ, AWQ or RTN)")
    if shifts:
        params.append({"params": shifts, "lr": codes_lr})
    fused = model.fused_decode
    model.fused_decode = False  # training forwards are many-row anyway; keep the C++ path out of autograd
    try:
        report = distill(model, teacher, tokens, params, steps, lr, batch_size, seed, progress,
                         desc="tune grids + codes" if shifts else "tune grids",
                         after_step=(lambda: [t.clamp_codes() for t in tunables.values()]) if shifts else None)  # fmt: skip
        with torch.no_grad():
            changes = torch.cat([t.log_scale.abs().flatten() for t in tunables.values()])
            report["mean_abs_log_scale_change"] = float(changes.mean())
            if shifts:  # share of codes that moved (padding columns included: they never get a gradient)
                moved = sum(int((t.codes() != t.centered).sum()) for t in tunables.values())
                report["codes_changed"] = moved / sum(t.centered.numel() for t in tunables.values())
    finally:
        model.fused_decode = fused
        for n, t in tunables.items():
            set_module(model, n, t.to_quant_linear())
        model.lm_head = head
    report["trained_parameters"] = sum(p.numel() for g in params for p in g["params"])
    return report
