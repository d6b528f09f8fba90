"""Layer skipping per token (mixture-of-depths at inference): a tiny router per layer decides.

Target: a layer matters little for a token when its residual update is small relative to the
residual stream, r = |block(x) - x| / |x|. Per layer a linear router on the normalised block
input predicts log r (ridge regression on calibration activations of the dense model: closed
form, deterministic, a second on this CPU). A token skips layer i when the prediction is below
one global threshold, set so that `skip` of the routable layer-token pairs are skipped on the
calibration text. The first `keep_first` and last `keep_last` layers always run.

A skipped layer still writes the token's K/V, computed from its input state (runtime.write_kv):
these are exactly the K/V the layer would have stored, so nothing about later tokens' attention
is approximate beyond the skipped token's own state. Router cost: a dot product and a norm per
layer (4*D FLOPs), reported by the meter as overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..apply import record
from ..errors import LeanlmError
from .runtime import Gate, add_gate, make_adaptive


@dataclass
class LayerSkip:
    skip: float = 0.2  # target fraction of all layer-token pairs skipped (calibration text)
    keep_first: int = 1
    keep_last: int = 1
    ridge: float = 1e-2
    calib_samples: int = 8
    calib_seq_len: int = 512

    saved_apart = True  # what calibration learned is kept in adaptive.safetensors (state.py), not in the weights
    needs_calibration = True  # the routers are fitted on calibration activations

    def price(self, plan) -> None:
        """Not priced: the cost model has no per-token layer count yet (the measured FLOPs fraction is in eval)."""

    def __post_init__(self):
        if not 0.0 <= self.skip < 1.0:
            raise LeanlmError(f"layer-skip fraction must be in [0, 1), got {self.skip}")
        if self.keep_first < 0 or self.keep_last < 0:
            raise LeanlmError("keep_first / keep_last must be >= 0")


class SkipGate(Gate):
    """skip layer i for a token when w_i . x / |x| + b_i < threshold (w_i absorbs sqrt(D))."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, routable: list[bool], threshold: float):
        self.weight, self.bias = weight.float(), bias.float()  # [L, D], [L]
        self._w = list(self.weight)  # per-layer views: no indexing op at decode
        self._b = self.bias.tolist()
        self.routable, self.threshold = routable, float(threshold)
        self.cost = 4.0 * weight.shape[1]
        self.spent = 0.0

    def decode_skip(self, i, x):
        if not self.routable[i]:
            return False
        self.spent += self.cost
        xv = x.view(-1)
        return float(torch.dot(self._w[i], xv)) / float(xv.norm()) + self._b[i] < self.threshold

    def scores(self, i, x):
        return (x @ self._w[i]) / x.norm(dim=-1) + self._b[i]

    def mask_skip(self, i, x):
        if not self.routable[i]:
            return None
        self.spent += self.cost * x.shape[0] * x.shape[1]
        return (self.scores(i, x) < self.threshold).unsqueeze(-1)

    def take_overhead(self):
        s, self.spent = self.spent, 0.0
        return s


@torch.no_grad()
def fit_routers(model, tokens: torch.Tensor, ridge: float, progress: bool = True):
    """Per layer, ridge regression of log(|update| / |x|) on x / rms(x): weights [L, D], biases [L],
    predictions on the calibration tokens [L, N] and the fit's R^2 per layer."""
    from ..calibration import run_sequential

    D = model.config.hidden_size
    W, B, preds, r2 = [], [], [], []

    def per_block(i, layer, xs, rope, dtype):
        ys = [layer(x, rope, 0, dtype) for x in xs]
        X = torch.cat([x.reshape(-1, D) for x in xs]).double()
        Y = torch.cat([y.reshape(-1, D) for y in ys]).double()
        norm = X.norm(dim=-1, keepdim=True)
        target = ((Y - X).norm(dim=-1) / norm[:, 0]).clamp_min(1e-8).log()
        feats = torch.cat([X / norm * D**0.5, torch.ones(len(X), 1, dtype=X.dtype)], 1)
        A = feats.T @ feats / len(X) + ridge * torch.eye(D + 1, dtype=X.dtype)
        sol = torch.linalg.solve(A, feats.T @ target / len(X))
        p = feats @ sol
        W.append(sol[:D] * D**0.5)  # applied to x / |x| at inference
        B.append(sol[D])
        preds.append(p.float())
        r2.append(float(1 - (p - target).pow(2).mean() / target.var().clamp_min(1e-12)))
        return ys

    run_sequential(model, tokens, per_block, batch_size=4, progress=progress, desc="skip routers")
    return torch.stack(W).float(), torch.stack(B).float(), torch.stack(preds), r2


def apply_layer_skip(model, cfg: LayerSkip, calib: torch.Tensor | None = None, tokenizer=None, progress: bool = True,
                     threshold: float | None = None) -> dict:  # fmt: skip
    """Train the skip routers on calibration text and install the gate. `threshold` overrides the
    calibrated one (-inf: the routers run but never skip, to measure their overhead)."""
    make_adaptive(model)
    L = model.config.n_layers
    routable = [cfg.keep_first <= i < L - cfg.keep_last for i in range(L)]
    if not any(routable):
        raise LeanlmError(f"keep_first + keep_last leave no layer to skip among {L}")
    if calib is None:
        if tokenizer is None:
            raise LeanlmError("layer skipping needs calibration tokens (or a tokenizer to cut them)")
        from ..calibration import calibration_tokens

        calib = calibration_tokens(tokenizer, "wikitext2-valid", cfg.calib_samples, cfg.calib_seq_len)
    W, B, preds, r2 = fit_routers(model, calib, cfg.ridge, progress)
    flat = preds[torch.tensor(routable)].flatten()
    rate = cfg.skip * L / sum(routable)  # the fraction of routable pairs that gives `skip` of all pairs
    if rate >= 1:
        raise LeanlmError(f"skipping {cfg.skip:.0%} of all layers needs more than the {sum(routable)} routable ones")
    if threshold is None:
        threshold = float(flat.kthvalue(max(1, int(rate * flat.numel()))).values) if rate > 0 else float("-inf")
    gate = SkipGate(W, B, routable, threshold)
    add_gate(model, gate)
    record(model, cfg, {"threshold": threshold})
    per_layer = [float((p < threshold).float().mean()) if r else 0.0 for p, r in zip(preds, routable)]
    return {"skip": cfg.skip, "threshold": threshold, "router_r2": r2, "calib_skip_per_layer": per_layer}
