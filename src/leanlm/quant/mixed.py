"""Mixed precision: measure how much each Linear alone hurts the model, then spend a bit budget.

Sensitivity of a Linear = mean per-token KL(base || model with only that Linear quantized
(RTN, low spec)) on a few calibration windows. The inputs of every block are cached once, so
each measurement reruns only the blocks from that Linear's block on, plus the LM head.

Assignment: start with every Linear at the low spec and promote to the high spec greedily in
order of sensitivity per extra stored bit, skipping promotions that would exceed the target
average bits/weight (storage bits: codes + bf16 scales/zeros + group padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibrate import get_module
from .config import QSpec
from .rtn import fake_quantize


@torch.no_grad()
def layer_sensitivity(model, tokens: torch.Tensor, names: list[str], spec: QSpec, progress: bool = True) -> dict[str, float]:
    """name -> mean per-token KL(base || base with only `name` quantized to `spec`)."""
    dtype = model.dtype
    T = tokens.shape[1]
    ropes = {k: t.get(0, T, dtype) for k, t in model.rope.items()}
    x = model.embed(tokens.to(model.device))
    inputs = []
    for layer, rn in zip(model.layers, model._rope_names):
        inputs.append(x)
        x = layer(x, ropes[rn], 0, dtype)
    base = F.log_softmax(model.logits(x).float(), -1).flatten(0, 1)
    out = {}
    for name in tqdm(names, desc="sensitivity", disable=not progress, leave=False):
        i = int(name.split(".")[1])
        lin = get_module(model, name)
        w = lin.weight.data
        lin.weight.data = fake_quantize(w.float(), spec).to(w.dtype)
        try:
            h = inputs[i]
            for layer, rn in zip(model.layers[i:], model._rope_names[i:]):
                h = layer(h, ropes[rn], 0, dtype)
            lp = F.log_softmax(model.logits(h).float(), -1).flatten(0, 1)
            out[name] = float(F.kl_div(lp, base, log_target=True, reduction="sum")) / base.shape[0]
        finally:
            lin.weight.data = w
    return out


def assign_bits(sensitivity: dict[str, float], shapes: dict[str, tuple[int, int]], low: QSpec, high: QSpec,
                target_bits: float) -> tuple[dict[str, QSpec], float]:  # fmt: skip
    """name -> spec meeting `target_bits` on average, and the average achieved."""
    cost = {n: (low.bits_per_weight(k) * o * k, high.bits_per_weight(k) * o * k) for n, (o, k) in shapes.items()}
    total = sum(o * k for o, k in shapes.values())
    spent = sum(c[0] for c in cost.values())
    budget = target_bits * total
    chosen = {n: low for n in shapes}
    order = sorted(shapes, key=lambda n: sensitivity.get(n, 0.0) / max(cost[n][1] - cost[n][0], 1e-9), reverse=True)
    for n in order:
        extra = cost[n][1] - cost[n][0]
        if spent + extra <= budget:
            chosen[n] = high
            spent += extra
    return chosen, spent / total
