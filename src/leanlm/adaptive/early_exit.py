"""Early exit per token: stop at the layer where the model is already sure.

Confidence, after each layer from `min_layer` on:
- "cosine": cosine similarity of the residual stream before and after the layer (hidden-state
  saturation; costs a few vector ops, so it is checked at every layer);
- "softmax": the top probability of the shared LM head on the current state (a full head
  product, 2*D*V FLOPs, so it is checked only every `every` layers; when it fires the exit
  logits are reused as the output).
A token leaves when its confidence exceeds `threshold`. The remaining layers still get its
K/V, computed from the exit state (CALM), so later tokens attend to every layer as usual
(runtime.write_kv; the emulation over whole sequences gives the same logits).

Exit heads (`lens`, on by default): through the plain LM head an intermediate state is a poor
prediction (on SmolLM2-135M, KL ~17 nats to the final distribution at layer 10), so per layer a
linear map from the (unit-scale) exit state to the last layer's is fitted by ridge regression on
calibration activations (a "tuned lens"; D*D weights, ~2*D*D FLOPs when a token leaves).

Calibration (`target_kl`): on calibration windows the dense model's per-token confidence and
KL(full || exit-at-layer) are computed at every layer, the threshold with the most skipped
layers whose predicted mean KL meets the target is taken, and it is then checked with the real
policy (KV effects included) on the first windows and raised until the measured KL meets it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..apply import record
from ..errors import LeanlmError
from .runtime import Gate, add_gate, make_adaptive

CONFIDENCES = ("cosine", "softmax")


@dataclass
class EarlyExit:
    confidence: str = "cosine"
    threshold: float | None = None  # set directly (then nothing is calibrated: no lens), or from target_kl
    target_kl: float = 0.05  # mean KL(full || early exit) per token on calibration text
    min_layer: int | None = None  # first layer after which a token may leave (default: n_layers // 3)
    every: int = 4  # softmax: check after every `every` layers
    lens: bool = True  # map the exit state to the last layer's (a per-layer linear map fitted on calibration)
    ridge: float = 1e-2
    calib_samples: int = 8
    calib_seq_len: int = 512
    kl_tokens: int = 1024  # calibration tokens on which exit KL is profiled (the head over all is costly)

    saved_apart = True  # what calibration learned is kept in adaptive.safetensors (state.py), not in the weights

    @property
    def needs_calibration(self) -> bool:
        return self.threshold is None  # a set threshold needs no data; target_kl is met on calibration text

    def price(self, plan) -> None:
        """Not priced: the cost model has no per-token layer count yet (the measured FLOPs fraction is in eval)."""

    def __post_init__(self):
        if self.confidence not in CONFIDENCES:
            raise LeanlmError(f"early-exit confidence must be one of {', '.join(CONFIDENCES)}, got {self.confidence!r}")
        if self.target_kl <= 0:
            raise LeanlmError(f"early-exit target_kl must be > 0, got {self.target_kl}")
        if self.every < 1:
            raise LeanlmError("early-exit 'every' must be >= 1")


def _unit(h: torch.Tensor) -> torch.Tensor:
    """h / rms(h): the scale the final RMSNorm removes anyway, so lens fits are scale-free."""
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


class ExitGate(Gate):
    """`lens[i]` = (A [D, D], b [D]) maps a state after layer i to (the unit-scale) last-layer state;
    without it the exit state goes to the LM head as it is (the 'logit lens')."""

    def __init__(self, confidence: str, threshold: float, min_layer: int, n_layers: int, every: int, dim: int,
                 vocab: int, lens: dict | None = None):  # fmt: skip
        self.confidence, self.threshold = confidence, float(threshold)
        last = n_layers - 1  # leaving after the last layer changes nothing
        self.check = [min_layer <= i < last and (confidence == "cosine" or (i - min_layer) % every == 0)
                      for i in range(n_layers)]  # fmt: skip
        self.cost = 6.0 * dim if confidence == "cosine" else 2.0 * dim * vocab
        self.lens = lens or {}
        self.lens_cost = 2.0 * dim * dim
        self.spent = 0.0

    def state(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if i not in self.lens:
            return h
        A, b = self.lens[i]
        return torch.addmm(b, _unit(h).reshape(-1, h.shape[-1]), A).view(h.shape)

    def _conf(self, i, x, new, model) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.confidence == "cosine":
            return F.cosine_similarity(new, x, dim=-1), None
        logits = model.logits(self.state(i, new))
        return logits.softmax(-1).amax(-1), logits

    def decode_exit(self, i, x, new, model):
        if not self.check[i]:
            return False
        self.spent += self.cost
        c, logits = self._conf(i, x, new, model)
        if float(c) > self.threshold:
            if logits is not None:
                model._exit_logits = logits  # the output is the exit state's logits: reuse them
            return True
        return False

    def mask_exit(self, i, x, new, model, active):
        if not self.check[i]:
            return None
        self.spent += self.cost * (x.shape[0] * x.shape[1] if active is None else float(active.sum()))
        return (self._conf(i, x, new, model)[0] > self.threshold).unsqueeze(-1)

    def exit_state(self, x, exit_layer):
        for e in exit_layer.unique().tolist():
            if e >= 0 and e in self.lens:
                sel = (exit_layer == e).unsqueeze(-1)
                self.spent += self.lens_cost * float(sel.sum())
                x = torch.where(sel, self.state(e, x), x)
        return x

    def take_overhead(self):
        s, self.spent = self.spent, 0.0
        return s


@torch.no_grad()
def exit_profile(model, tokens: torch.Tensor, cfg: EarlyExit, min_layer: int, progress: bool = True):
    """Per layer from min_layer, on `cfg.kl_tokens` sampled calibration tokens: the confidence and
    KL(full || exit here), [L', n] each; and the fitted lens maps {layer: (A, b)} (cfg.lens)."""
    from ..calibration import run_sequential

    batch, D = 2, model.config.hidden_size
    final = torch.cat([h.reshape(-1, D) for h in run_sequential(model, tokens, lambda *a: None, batch, progress=False)])
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(final), generator=g)[: cfg.kl_tokens]
    lp = F.log_softmax(model.logits(final[pick][None])[0], -1)
    target = _unit(final).double()
    conf, kl, lens = [], [], {}
    tmp = ExitGate(cfg.confidence, 2.0, min_layer, model.config.n_layers, 1, D, model.config.vocab_size)

    def per_block(i, layer, xs, rope, dtype):
        ys = [layer(x, rope, 0, dtype) for x in xs]
        if i >= min_layer:
            X = torch.cat([x.reshape(-1, D) for x in xs])
            Y = torch.cat([y.reshape(-1, D) for y in ys])
            if cfg.lens and i < model.config.n_layers - 1:  # ridge regression: unit(y) [1] -> unit(final)
                U = torch.cat([_unit(Y).double(), torch.ones(len(Y), 1, dtype=torch.float64)], 1)
                M = U.T @ U / len(U) + cfg.ridge * torch.eye(D + 1, dtype=torch.float64)
                sol = torch.linalg.solve(M, U.T @ target / len(U)).float()
                lens[i] = tmp.lens[i] = (sol[:D].contiguous(), sol[D].contiguous())
            c, lq = tmp._conf(i, X[pick][None], Y[pick][None], model)
            lq = F.log_softmax(lq[0] if lq is not None else model.logits(tmp.state(i, Y[pick][None]))[0], -1)
            conf.append(c.reshape(-1))
            kl.append((lp.exp() * (lp - lq)).sum(-1).clamp_min(0))
        return ys

    run_sequential(model, tokens, per_block, batch, progress=progress, desc="early-exit profile")
    return torch.stack(conf), torch.stack(kl), lens


def predict(conf: torch.Tensor, kl: torch.Tensor, checks: torch.Tensor, threshold: float) -> tuple[float, float]:
    """(mean KL, mean layers skipped per token) if tokens left at the first checked layer over threshold,
    ignoring the effect of approximate K/V on later tokens. conf/kl: [L', N]; checks: [L'] bool."""
    fire = (conf > threshold) & checks[:, None]
    fire[-1] = True  # no exit = the full model (last row: KL 0)
    first = fire.float().argmax(0)
    n = conf.shape[0]
    return float(kl.gather(0, first[None])[0].mean()), float((n - 1 - first).float().mean())


@torch.no_grad()
def measured_kl(model, tokens: torch.Tensor, base_lp: list[torch.Tensor]) -> float:
    total, n = 0.0, 0
    for t, lp in zip(tokens.split(2), base_lp):
        lq = F.log_softmax(model(t), -1)
        total += float((lp.exp() * (lp - lq)).sum())
        n += lp.shape[0] * lp.shape[1]
    return total / n


def apply_early_exit(model, cfg: EarlyExit, calib: torch.Tensor | None = None, tokenizer=None, progress: bool = True,
                     profile: tuple | None = None) -> dict:  # fmt: skip
    """Install an exit gate (calibrating its threshold unless cfg.threshold is set). Returns a report.
    `profile`: exit_profile's result for the same model, calibration and settings, to reuse it."""
    make_adaptive(model)
    L = model.config.n_layers
    min_layer = cfg.min_layer if cfg.min_layer is not None else L // 3
    if not 0 <= min_layer < L - 1:
        raise LeanlmError(f"early-exit min_layer must be in [0, {L - 2}], got {min_layer}")
    gate = ExitGate(cfg.confidence, 2.0 if cfg.threshold is None else cfg.threshold, min_layer, L, cfg.every,
                    model.config.hidden_size, model.config.vocab_size)  # fmt: skip
    report = {"confidence": cfg.confidence, "min_layer": min_layer}
    if cfg.threshold is None:
        if calib is None:
            if tokenizer is None:
                raise LeanlmError("early exit needs a threshold or calibration tokens (or a tokenizer) for target_kl")
            from ..calibration import calibration_tokens

            calib = calibration_tokens(tokenizer, "wikitext2-valid", cfg.calib_samples, cfg.calib_seq_len)
        conf, kl, gate.lens = profile or exit_profile(model, calib, cfg, min_layer, progress)
        report["lens_layers"] = sorted(gate.lens)
        report["profile_mean_kl_per_layer"] = [float(k) for k in kl.mean(1)]
        checks = torch.tensor(gate.check[min_layer:])
        calib = calib[:4]  # the policy's real KL is checked on the first windows
        cands = torch.unique(torch.quantile(conf.flatten()[:1 << 20].float(), torch.linspace(0, 1, 201)))
        preds = [(float(t), *predict(conf, kl, checks, float(t))) for t in cands.tolist() + [2.0]]
        old, model.adaptive_gate = model.adaptive_gate, None  # KL to the full model
        with torch.no_grad():
            base_lp = [F.log_softmax(model(t), -1) for t in calib.split(2)]
        budget = cfg.target_kl
        for attempt in range(6):  # predicted KL ignores K/V effects: confirm with the real policy
            ok = [p for p in preds if p[1] <= budget]
            thr, pkl, pskip = max(ok, key=lambda p: (p[2], -p[0]))
            gate.threshold = thr
            model.adaptive_gate = gate
            real = measured_kl(model, calib, base_lp)
            model.adaptive_gate = None
            report.setdefault("tries", []).append({"threshold": thr, "predicted_kl": pkl, "measured_kl": real,
                                                   "predicted_layers_skipped": pskip})  # fmt: skip
            if real <= cfg.target_kl or pskip == 0:
                break
            budget *= min(0.6, cfg.target_kl / real)
        model.adaptive_gate = old
    report["threshold"] = gate.threshold
    add_gate(model, gate)
    record(model, cfg, {"threshold": gate.threshold})
    return report
