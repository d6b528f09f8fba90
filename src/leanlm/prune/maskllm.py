"""Learned N:M masks in the style of MaskLLM (Fang et al., NeurIPS 2024), trained block by block on a CPU.

MaskLLM treats the mask of every group of M consecutive input weights of a row as a categorical choice among
its C = binom(M, N) candidate patterns (6 for 2:4) and learns the choice through a Gumbel-softmax relaxation:

    p = softmax((kappa * L + g) / tau)          L: learnable logits [C, groups], g: Gumbel noise
    soft mask of the group = sum_c p_c * S_c    S_c: the c-th candidate pattern (a 0/1 vector of M)

The scale kappa (MaskLLM's "scale multiplier") lets small optimizer steps move the logits, the temperature
tau goes from soft to sharp; both are annealed linearly over the steps (4 -> 0.05 and 100 -> 500 by default,
MaskLLM's values). The logits start from a prior mask (MaskLLM's prior initialization): each candidate gets
prior_strength x (its overlap with the prior - N/2) x the init std on top of small random logits. The final
mask is the argmax candidate of each group, so it is exactly N:M. The paper's strength, 3, lets the random
part outvote the prior in about 6% of the groups, which its 2000 steps repair and a 24-step CPU run does not
(on a SmolLM2 block that alone made the learned mask worse than its prior); the default here is 10. The
optimizer is Adam on the unscaled logits (lr 4e-3 for 24 steps: a logit pushed the same way at every step
moves about 0.1, the prior's margin, and one pushed by Gumbel noise alone about a fifth of that).

What differs from the paper, to fit two CPU cores:
- Training is block-local distillation instead of end-to-end language modelling: the calibration windows run
  through the model one block at a time (leanlm.calibration.BlockRunner), and the loss of block i is its
  output error against the dense model, relative to how much the dense block changes its input,
  sum ||f_i(x) - y||^2 / sum ||y - x||^2. With target="teacher" (default) y is the dense model's hidden state
  after block i (the error the earlier pruned blocks left is corrected too); with target="block" y is the
  dense block i applied to the same pruned-stream input x (SparseGPT's local objective).
- Weights. MaskLLM keeps the dense weights frozen and learns only the mask (weights="original" here). With
  weights="prior" (default) and the SparseGPT prior, the frozen weights are SparseGPT's: the kept weights
  carry its OBS compensation and the pruned ones the value they had when SparseGPT pruned them
  (sparsegpt_prune(keep_pruned_values=True)), so the prior mask reproduces SparseGPT exactly and the learning
  looks for groups whose other pattern lowers the block error. No weight is trained. Wanda and magnitude
  priors leave the original weights, so there both settings are the same.
- keep_better: the last quarter of the calibration windows is held out of training, and the learned mask
  replaces the prior only if it lowers the block objective there (with few windows and millions of logits,
  a mask that fits the training windows better can fit new text worse); the report says, per block, which one
  was kept and both errors on the held-out windows.
- The cost term. Every candidate of a group is N:M, so the pattern itself costs the same whichever is chosen;
  what the cost model prices is N:M against dense. With cost_weight set, each block linear also gets a
  learnable gate a (a Gumbel-sigmoid, same temperature): its weight is s * (W_frozen * mask) + (1 - s) * W_dense
  and the loss adds
      cost_weight * sum_l [sigma(a_l) * c_nm(l) + (1 - sigma(a_l)) * c_dense(l)] / sum_l c_dense(l)
  with c_nm, c_dense the decode seconds of linear l on `hardware` from leanlm.hardware.forward_cost (batch 1,
  one new token, the model's dtype). A linear whose sigma(a) ends below 0.5 stays dense (listed in the
  config's dense_layers, which the cost model prices as dense). cost_weight=0 keeps every linear dense (the
  error alone never prefers N:M); a large weight makes every linear N:M. Without cost_weight (default) every
  block linear is N:M: equal sparsity with SparseGPT and Wanda at the same pattern.

    from leanlm.prune import MaskLLM, calibration_tokens, prune_maskllm
    calib = calibration_tokens(tok, "wikitext2-valid", n_samples=16, seq_len=512)
    report = prune_maskllm(model, MaskLLM(pattern="2:4", steps=24), calib)
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from ..apply import record, register
from ..calibration import BlockRunner, block_linears, row_parts
from ..errors import LeanlmError
from .masks import magnitude_scores, nm_mask, parse_pattern, wanda_scores
from .sparsegpt import sparsegpt_prune

PRIORS = ("sparsegpt", "wanda", "magnitude")
WEIGHTS = ("prior", "original")
TARGETS = ("teacher", "block")
INIT_STD = 0.01  # std of the random logits before the prior is added (MaskLLM's gate init)
GATE_INIT = 1.0  # dense-or-N:M gate logits start at sigma(1) = 0.73, leaning towards N:M
GATE_LR = 0.25  # Adam step of the gate logits: a short run can cross from one side to the other


def candidates(n: int, m: int) -> torch.Tensor:
    """[binom(m, n), m] float 0/1: every way to keep n of m consecutive weights (2:4: the 6 pairs)."""
    combos = list(itertools.combinations(range(m), n))
    out = torch.zeros(len(combos), m)
    for c, kept in enumerate(combos):
        out[c, list(kept)] = 1.0
    return out


@dataclass
class MaskLLM:
    """Learned N:M masks (module docstring). steps: optimizer steps per block, each on `batch` calibration
    windows; lr: Adam step of the (unscaled) logits; temperature, scale: (start, end) of the linear anneals."""

    pattern: str = "2:4"
    prior: str = "sparsegpt"
    weights: str = "prior"
    target: str = "teacher"
    steps: int = 24
    batch: int = 1
    lr: float = 4e-3
    temperature: tuple[float, float] = (4.0, 0.05)
    scale: tuple[float, float] = (100.0, 500.0)
    prior_strength: float = 10.0
    keep_better: bool = True
    cost_weight: float | None = None
    hardware: str | None = None
    dense_layers: list[str] = field(default_factory=list)
    seed: int = 0
    blocksize: int = 128
    damp: float = 0.01
    nm: tuple[int, int] = field(default=(2, 4), init=False)

    def __post_init__(self):
        nm = parse_pattern(self.pattern)
        if nm is None:
            raise LeanlmError("MaskLLM learns an N:M pattern: give one, e.g. pattern='2:4'")
        self.nm = nm
        for name, value, allowed in (("prior", self.prior, PRIORS), ("weights", self.weights, WEIGHTS),
                                     ("target", self.target, TARGETS)):  # fmt: skip
            if value not in allowed:
                raise LeanlmError(f"unknown MaskLLM {name} '{value}'; use one of: {', '.join(allowed)}")
        for name in ("steps", "batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "steps" else 1):
                raise LeanlmError(f"MaskLLM {name} must be an integer >= {0 if name == 'steps' else 1}, got {v!r}")
        if not self.lr > 0 or self.prior_strength < 0:
            raise LeanlmError(f"MaskLLM needs lr > 0 and prior_strength >= 0, got {self.lr}, {self.prior_strength}")
        for name in ("temperature", "scale"):
            v = tuple(getattr(self, name))
            if len(v) != 2 or min(v) <= 0:
                raise LeanlmError(f"MaskLLM {name} is (start, end), both > 0, e.g. {name}=[4, 0.05]; got {v!r}")
            setattr(self, name, (float(v[0]), float(v[1])))
        if self.cost_weight is not None:
            if self.cost_weight < 0:
                raise LeanlmError(f"cost_weight must be >= 0, got {self.cost_weight}")
            if not self.hardware:
                raise LeanlmError("cost_weight prices dense against N:M on a hardware profile: give hardware=, e.g. "
                                  "'a100' (the cost model prices N:M only where a sparse kernel pays)")  # fmt: skip
        elif self.hardware:
            raise LeanlmError("hardware= is used by the cost term only: give cost_weight too, or drop hardware")
        self.dense_layers = list(self.dense_layers)

    needs_calibration = True

    def price(self, plan) -> None:
        """Cost model: N:M on every block linear but those left dense."""
        n, m = self.nm
        plan.sparsity = 1 - n / m
        plan.sparsity_pattern = self.pattern
        plan.dense_ops = list(self.dense_layers)


# ---- the relaxation -----------------------------------------------------------------------------
def prior_logits(keep: torch.Tensor, options: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Initial logits [C, groups] of a [rows, cols] prior keep mask: small random logits plus
    strength x INIT_STD x (overlap of each candidate with the prior - N/2) (MaskLLM's prior init)."""
    C, m = options.shape
    groups = keep.reshape(-1, m).float()  # [G, m]
    overlap = options @ groups.T  # [C, G]
    n = options[0].sum()
    noise = torch.randn(overlap.shape, generator=gen)
    return INIT_STD * (noise + strength * (overlap - n / 2))


def soft_mask(logits: torch.Tensor, noise: torch.Tensor, options: torch.Tensor, scale: float, tau: float,
              shape: torch.Size) -> torch.Tensor:  # fmt: skip
    """Gumbel-softmax relaxed mask [rows, cols]: candidate-major logits [C, G] keep the softmax over C a
    reduction across C contiguous slabs (6x faster on CPU than a softmax over a last dimension of 6)."""
    p = torch.softmax((logits * scale + noise) / tau, dim=0)
    return (options.T @ p).T.reshape(shape)  # [m, G] -> [G, m] -> [rows, cols]


def hard_mask(logits: torch.Tensor, options: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The argmax candidate of every group: an exact N:M keep mask (bool [rows, cols])."""
    return options[logits.argmax(0)].reshape(shape).bool()


def gumbel_(buf: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fill `buf` with standard Gumbel noise in place."""
    torch.rand(buf.shape, generator=gen, out=buf)
    return buf.clamp_(min=1e-20).log_().neg_().clamp_(min=1e-20).log_().neg_()


def linear_prices(model, layer_index: int, cfg: MaskLLM) -> dict[str, tuple[float, float]]:
    """{linear: (dense seconds, N:M seconds)} of block `layer_index` at batch-1 decode on cfg.hardware."""
    from ..apply import plan_for
    from ..hardware import forward_cost, load_profile

    hw = load_profile(cfg.hardware)
    dense = plan_for(model, [])
    sparse = copy.deepcopy(dense)
    sparse.sparsity, sparse.sparsity_pattern = 1 - cfg.nm[0] / cfg.nm[1], cfg.pattern
    ops = [{o.name: o.seconds for o in forward_cost(model.config, hw, p, 1, 1, 512, last_only=False)}
           for p in (dense, sparse)]  # fmt: skip
    prefix = f"layers.{layer_index}."
    return {name: (ops[0][prefix + name], ops[1][prefix + name]) for name in block_linears(model.layers[layer_index])}


# ---- one block ------------------------------------------------------------------------------------
def _prior(layer, name: str, lin, cfg: MaskLLM, stat) -> tuple[torch.Tensor, torch.Tensor]:
    """(frozen weights, prior keep mask) of one block linear, its fused parts (q/k/v, gate/up) done apart."""
    W = lin.weight.detach().float()
    frozen, keep = W.clone(), torch.ones_like(W, dtype=torch.bool)
    for a, b in row_parts(layer, name):
        w = W[a:b]
        if cfg.prior == "sparsegpt":
            new, keep[a:b] = sparsegpt_prune(w, stat.value(), 1 - cfg.nm[0] / cfg.nm[1], cfg.nm, cfg.blocksize,
                                             cfg.damp, keep_pruned_values=True)  # fmt: skip
            if cfg.weights == "prior":
                frozen[a:b] = new
        else:
            scores = magnitude_scores(w) if cfg.prior == "magnitude" else wanda_scores(w, stat)
            keep[a:b] = nm_mask(scores, *cfg.nm)
    return frozen, keep


class BlockObjective:
    """The block error (relative to the dense block's change) of given weights over calibration windows."""

    def __init__(self, layer, rope, xs: list[torch.Tensor], targets: list[torch.Tensor]):
        self.layer, self.rope = layer, rope
        self.xs = [x[j : j + 1] for x in xs for j in range(x.shape[0])]  # one window each, for sampling
        self.ys = [y[j : j + 1] for y in targets for j in range(y.shape[0])]
        self.scale = [float((y - x).pow(2).sum()) + 1e-12 for x, y in zip(self.xs, self.ys)]

    def forward(self, weights: dict[str, torch.Tensor], idx) -> tuple[torch.Tensor, list[torch.Tensor]]:
        params = {f"{n}.weight": w for n, w in weights.items()}
        err, outs = 0.0, []
        for j in idx:
            out = functional_call(self.layer, params, (self.xs[j], self.rope, 0, torch.float32))
            err = err + (out - self.ys[j]).pow(2).sum()
            outs.append(out)
        return err / sum(self.scale[j] for j in idx), outs

    @torch.no_grad()
    def evaluate(self, weights: dict[str, torch.Tensor], idx=None) -> tuple[float, list[torch.Tensor]]:
        err, outs = self.forward(weights, range(len(self.xs)) if idx is None else idx)
        return float(err), outs


def _learn(objective: BlockObjective, train: list[int], frozen: dict, dense: dict, priors: dict, gated: list[str],
           prices: dict, cfg: MaskLLM, gen: torch.Generator) -> tuple[dict, dict, dict]:  # fmt: skip
    """Train the logits (and the dense-or-N:M gates of `gated` linears) on the windows `train`; returns (logits,
    gate probabilities, loss trace)."""
    n, m = cfg.nm
    options = candidates(n, m)
    logits = {k: prior_logits(priors[k], options, cfg.prior_strength, gen).requires_grad_(True) for k in frozen}
    gates = {k: torch.full((), GATE_INIT, requires_grad=True) for k in gated}
    # one pool of Gumbel noise per linear, read at a random cyclic offset each step: i.i.d. Gumbel across the
    # groups of a step, without drawing millions of fresh variates per step (that took as long as the block)
    pool = {k: gumbel_(torch.empty_like(v), gen).view(-1) for k, v in logits.items()}
    groups = [{"params": list(logits.values()), "lr": cfg.lr}]
    if gates:
        groups.append({"params": list(gates.values()), "lr": GATE_LR})
    opt = torch.optim.Adam(groups)
    dense_cost = sum(prices[k][0] for k in prices) if prices else 1.0
    trace = {"loss": [], "error": [], "cost": []}
    for step in range(cfg.steps):
        t = step / max(1, cfg.steps - 1)
        tau = cfg.temperature[0] + (cfg.temperature[1] - cfg.temperature[0]) * t
        kappa = cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * t
        weights, cost = {}, 0.0
        for k, w in frozen.items():
            noise = pool[k].roll(int(torch.randint(0, pool[k].numel(), (), generator=gen))).view_as(logits[k])
            sparse = w * soft_mask(logits[k], noise, options, kappa, tau, w.shape)
            if k in gates:  # binary concrete: logistic noise on the gate logit, same temperature
                u = torch.rand((), generator=gen).clamp(1e-6, 1 - 1e-6)
                s = torch.sigmoid((gates[k] + torch.log(u) - torch.log1p(-u)) / tau)
                sparse = s * sparse + (1 - s) * dense[k]
                q = torch.sigmoid(gates[k])
                cost = cost + (q * prices[k][1] + (1 - q) * prices[k][0]) / dense_cost
            weights[k] = sparse
        for k in dense:  # linears left dense (dense_layers) run as they are
            weights.setdefault(k, dense[k])
        idx = [train[j] for j in torch.randint(0, len(train), (cfg.batch,), generator=gen).tolist()]
        err, _ = objective.forward(weights, idx)
        loss = err + (cfg.cost_weight or 0.0) * cost
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trace["loss"].append(loss.item())
        trace["error"].append(err.item())
        trace["cost"].append(float(cost.detach()) if torch.is_tensor(cost) else cost)
    probs = {k: float(torch.sigmoid(g.detach())) for k, g in gates.items()}
    return {k: v.detach() for k, v in logits.items()}, probs, trace


def _block_cost(chosen_sparse: list[str], prices: dict) -> float:
    """Predicted decode seconds of the block's linears as a fraction of all-dense."""
    if not prices:
        return 0.0
    return sum(prices[k][1] if k in chosen_sparse else prices[k][0] for k in prices) / sum(p[0] for p in prices.values())


# ---- the model ------------------------------------------------------------------------------------
def _stats(runner: BlockRunner, i: int, layer, cfg: MaskLLM):
    """Calibration statistics of the prior (Hessians for SparseGPT, squared input norms for Wanda) and the
    dense block's outputs on the pruned stream."""
    from .unstructured import _collect

    if cfg.prior == "magnitude":  # no statistics; the dense outputs only where they are the target
        return {}, (runner.run(i) if cfg.target == "block" else None)
    return _collect(runner, i, layer, hessian=cfg.prior == "sparsegpt")


def prune_maskllm(model, cfg: MaskLLM, tokens: torch.Tensor, progress: bool = True) -> dict:
    """Learn N:M masks block by block on calibration windows `tokens` [n, T] and apply them in place."""
    from .unstructured import sparsity_report

    if tokens is None:
        raise LeanlmError("MaskLLM needs calibration tokens (calibration_tokens(tokenizer, ...))")
    if model.dtype != torch.float32:
        raise LeanlmError("MaskLLM trains in float32: load the model with dtype float32")
    model.set_decode_layout(False)  # row-major weights: the rows this code slices and views
    n, m = cfg.nm
    names = {f"layers.{i}.{k}" for i, layer in enumerate(model.layers) for k in block_linears(layer)}
    unknown = [d for d in cfg.dense_layers if d not in names]
    if unknown:
        raise LeanlmError(f"dense_layers names block linears such as 'layers.3.mlp.w_down'; this model has none called: {', '.join(unknown)}")
    for i, layer in enumerate(model.layers):
        for name, lin in block_linears(layer).items():
            if lin.weight.shape[1] % m:
                raise LeanlmError(f"layers.{i}.{name} has {lin.weight.shape[1]} inputs, not a multiple of {m}: "
                                  f"the {cfg.pattern} pattern does not fit it")  # fmt: skip
    if cfg.cost_weight is not None:
        p = linear_prices(model, 0, cfg)
        if all(nm_s >= dense_s for dense_s, nm_s in p.values()):
            raise LeanlmError(f"the cost model prices {cfg.pattern} no cheaper than dense on '{cfg.hardware}' (no N:M "
                              "kernel there), so the cost term would keep every linear dense; use a profile with "
                              "an N:M speedup (a100, h100, h200) or drop cost_weight")  # fmt: skip
    runner = BlockRunner(model, tokens)
    teacher_xs = [x.clone() for x in runner.xs] if cfg.target == "teacher" else None
    rows, learned_dense = [], []
    t_start = time.perf_counter()
    for i in tqdm(range(len(model.layers)), desc="maskllm blocks", disable=not progress, leave=False):
        t0 = time.perf_counter()
        layer = model.layers[i]
        lins = block_linears(layer)
        stats, dense_outs = _stats(runner, i, layer, cfg)
        if teacher_xs is not None:
            targets = teacher_xs = _run_on(runner, i, teacher_xs)  # the dense model's next hidden states
        else:
            targets = dense_outs
        dense = {k: lin.weight.detach().float().clone() for k, lin in lins.items()}
        forced = {k for k in lins if f"layers.{i}.{k}" in cfg.dense_layers}
        frozen, priors = {}, {}
        for k, lin in lins.items():
            if k not in forced:
                frozen[k], priors[k] = _prior(layer, k, lin, cfg, stats.get(k))
        del stats
        with torch.no_grad():
            rope = tuple(t.clone() for t in runner.rope(i))  # cached rope tables may be inference tensors
        objective = BlockObjective(layer, rope, runner.xs, targets)
        prices = {k: v for k, v in linear_prices(model, i, cfg).items() if k in frozen} if cfg.cost_weight is not None else {}
        gated = list(prices)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        for p in layer.parameters():
            p.requires_grad_(False)
        # keep_better decides on windows the logits never trained on: the last quarter of the calibration windows
        n_windows = len(objective.xs)
        held = max(1, n_windows // 4) if cfg.keep_better and n_windows > 1 else 0
        train, check = list(range(n_windows - held)), list(range(n_windows - held, n_windows)) or None
        with torch.enable_grad():
            logits, probs, trace = _learn(objective, train, frozen, dense, priors, gated, prices, cfg, gen)
        options = candidates(n, m)
        learned = {k: hard_mask(logits[k], options, frozen[k].shape) for k in frozen}
        sparse_learned = [k for k in frozen if k not in probs or probs[k] >= 0.5]
        lam = cfg.cost_weight or 0.0

        def weights_of(masks, sparse_ks):
            return {k: (frozen[k] * masks[k] if k in sparse_ks else dense[k]) for k in lins}

        prior_err = objective.evaluate(weights_of(priors, list(frozen)), check)[0]
        learned_err = objective.evaluate(weights_of(learned, sparse_learned), check)[0]
        prior_obj = prior_err + lam * _block_cost(list(frozen), prices)
        learned_obj = learned_err + lam * _block_cost(sparse_learned, prices)
        use_learned = learned_obj <= prior_obj or not cfg.keep_better
        masks, sparse_ks = (learned, sparse_learned) if use_learned else (priors, list(frozen))
        outs = objective.evaluate(weights_of(masks, sparse_ks))[1]  # every window: the next block's inputs
        with torch.no_grad():
            for k, lin in lins.items():
                w = frozen[k] * masks[k] if k in sparse_ks else dense[k]
                lin.weight.copy_(w.to(lin.weight.dtype))
        learned_dense += [f"layers.{i}.{k}" for k in frozen if k not in sparse_ks]
        changed = sum(int((learned[k] != priors[k]).reshape(-1, m).any(-1).sum()) for k in frozen)
        n_groups = sum(frozen[k].numel() // m for k in frozen)
        rows.append({"block": i, "error_windows": "held out" if held else "calibration", "prior_error": prior_err, "learned_error": learned_err, "kept": "learned" if use_learned else "prior",
                     "groups_changed": changed / max(n_groups, 1), "first_loss": trace["loss"][0] if trace["loss"] else None,
                     "last_loss": trace["loss"][-1] if trace["loss"] else None,
                     "gate_nm_probability": probs or None, "cost_fraction": _block_cost(sparse_ks, prices) if prices else None,
                     "seconds": time.perf_counter() - t0})  # fmt: skip
        runner.advance([torch.cat(outs[j : j + x.shape[0]]) for j, x in _offsets(runner.xs)])
        del objective, logits, frozen, dense
    recorded = copy.copy(cfg)
    recorded.dense_layers = list(dict.fromkeys([*cfg.dense_layers, *learned_dense]))
    report = {"method": "maskllm", "pattern": cfg.pattern, "prior": cfg.prior, "weights": cfg.weights,
              "target": cfg.target, "steps": cfg.steps, "batch": cfg.batch, "calibration_tokens": runner.n_tokens,
              "dense_layers": recorded.dense_layers, "blocks": rows,
              "blocks_learned_kept": sum(r["kept"] == "learned" for r in rows),
              "mean_prior_error": sum(r["prior_error"] for r in rows) / len(rows),
              "mean_learned_error": sum(r["learned_error"] for r in rows) / len(rows),
              "seconds": time.perf_counter() - t_start}  # fmt: skip
    if cfg.cost_weight is not None:
        from ..apply import plan_for
        from ..hardware import estimate, load_profile

        hw = load_profile(cfg.hardware)
        before = estimate(model.config, hw, plan_for(model, []))["decode_step_ms"]
        after = estimate(model.config, hw, plan_for(model, [recorded]))["decode_step_ms"]
        report["predicted_decode_step_ms"] = {"dense": before, "pruned": after, "hardware": cfg.hardware}
    report.update(sparsity_report(model))
    record(model, recorded, {k: report[k] for k in ("sparsity_prunable", "sparsity_all_params", "blocks_learned_kept",
                                                    "mean_prior_error", "mean_learned_error", "dense_layers")})  # fmt: skip
    return report


def _offsets(xs: list[torch.Tensor]):
    """(start window, batch) of each stored batch: BlockObjective splits batches into single windows."""
    j = 0
    for x in xs:
        yield j, x
        j += x.shape[0]


@torch.no_grad()
def _run_on(runner: BlockRunner, i: int, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Block i (as it is now) on other inputs than the runner's: the dense teacher stream."""
    rope, layer = runner.rope(i), runner.model.layers[i]
    return [layer(x, rope, 0, runner.dtype) for x in xs]


@register(MaskLLM)
def _apply_maskllm(model, cfg: MaskLLM, calib, progress: bool) -> dict:
    return prune_maskllm(model, cfg, None if calib is None else calib.tokens(), progress)
