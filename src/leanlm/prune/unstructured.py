"""Unstructured and N:M pruning of every block's linear layers: magnitude, Wanda, SparseGPT.

Zeros alone buy nothing: the matrices keep their shape, so the model is as large and as fast
as before. `sparse_storage` turns the zeros into a smaller file and smaller resident weights,
and measures what a CPU sparse matmul makes of them. Embeddings / LM head and norms are
never pruned (as in Wanda and SparseGPT); reports count them, so the sparsity of the whole
model is stated next to the sparsity of the pruned matrices.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..apply import record, register
from ..errors import LeanlmError
from .heal import heal
from ..calibration import BlockRunner, block_linears, capture_inputs, row_parts
from .masks import (
    check_sparsity,
    magnitude_scores,
    nm_mask,
    outlier_ratio,
    owl_layer_sparsity,
    parse_pattern,
    unstructured_mask,
    wanda_scores,
)
from .sparsegpt import HessianAccumulator, sparsegpt_prune

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl")


@dataclass
class Unstructured:
    """method: magnitude | wanda | sparsegpt; sparsity in [0, 1) or pattern 'N:M';
    allocation: uniform (every layer at `sparsity`) | owl (outlier-weighted per-layer ratios).
    heal_steps: after pruning, distil towards the unpruned model for this many steps, zeros kept (heal.py)."""

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str | None = None
    allocation: str = "uniform"
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    blocksize: int = 128
    damp: float = 0.01
    heal_steps: int = 0
    nm: tuple[int, int] | None = field(default=None, init=False)

    def __post_init__(self):
        if not isinstance(self.heal_steps, int) or isinstance(self.heal_steps, bool) or self.heal_steps < 0:
            raise LeanlmError(f"heal_steps must be an integer >= 0, got {self.heal_steps!r}")
        if self.method not in METHODS:
            raise LeanlmError(f"unknown pruning method '{self.method}'; use one of: {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise LeanlmError(f"unknown allocation '{self.allocation}'; use one of: {', '.join(ALLOCATIONS)}")
        self.nm = parse_pattern(self.pattern)
        if self.nm is not None:
            implied = 1 - self.nm[0] / self.nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise LeanlmError(f"pattern {self.pattern} means sparsity {implied:g}, not {self.sparsity:g}; "
                                  "drop --sparsity or make them agree")  # fmt: skip
            if self.allocation != "uniform":
                raise LeanlmError("OWL allocation varies sparsity per layer, which an N:M pattern fixes; "
                                  "use --allocation uniform with --pattern")  # fmt: skip
            self.sparsity = implied
        if self.sparsity is None:
            raise LeanlmError("give a target: --sparsity S (e.g. 0.5) or --pattern N:M (e.g. 2:4)")
        check_sparsity(self.sparsity)

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.allocation == "owl" or self.heal_steps > 0

    def price(self, plan) -> None:
        """Cost model: the fraction of weights pruned and its pattern (what a sparse kernel can skip)."""
        plan.sparsity = float(self.sparsity)
        plan.sparsity_pattern = self.pattern or "unstructured"


def _prune_matrix(layer, name: str, lin, cfg: Unstructured, sparsity: float, stat) -> None:
    W = lin.weight
    new = torch.empty(W.shape, dtype=torch.float32)
    for a, b in row_parts(layer, name):  # q/k/v and gate/up are pruned as the separate matrices they are
        w = W[a:b]
        if cfg.method == "sparsegpt":
            new[a:b], _ = sparsegpt_prune(w, stat.value(), sparsity, cfg.nm, cfg.blocksize, cfg.damp)
            continue
        scores = magnitude_scores(w) if cfg.method == "magnitude" else wanda_scores(w, stat)
        if cfg.nm is not None:
            mask = nm_mask(scores, *cfg.nm)
        else:  # Wanda compares weights within an output row; magnitude over the whole matrix
            mask = unstructured_mask(scores, sparsity, per_row=cfg.method == "wanda")
        new[a:b] = w.float() * mask
    with torch.no_grad():
        W.copy_(new.to(W.dtype))


def _collect(runner: BlockRunner, i: int, layer, hessian: bool):
    """Calibration statistics of block i's four linears: sum of squared inputs, or Hessians."""
    lins = block_linears(layer)
    stats = {n: (HessianAccumulator(m.weight.shape[1]) if hessian else torch.zeros(m.weight.shape[1], dtype=torch.float64))
             for n, m in lins.items()}  # fmt: skip

    def add(name, x):
        if hessian:
            stats[name].add(x)
        else:
            stats[name] += x.double().pow(2).sum(0)

    with capture_inputs(lins, add):
        outs = runner.run(i)
    return stats, outs


def owl_outlier_ratios(model, tokens: torch.Tensor, m: float = 5.0, progress: bool = True) -> list[float]:
    """Per-block outlier density of Wanda scores on the dense model (one calibration pass)."""
    runner = BlockRunner(model, tokens)
    ratios = []
    for i in tqdm(range(len(model.layers)), desc="owl outliers", disable=not progress, leave=False):
        layer = model.layers[i]
        stats, outs = _collect(runner, i, layer, hessian=False)
        lins = block_linears(layer)
        ratios.append(outlier_ratio([wanda_scores(lins[n].weight, stats[n]) for n in lins], m))
        runner.advance(outs)
    return ratios


def sparsity_report(model) -> dict:
    """Zeros in the block linears and in the whole model (embeddings and norms included)."""
    prunable = zeros = 0
    for layer in model.layers:
        for lin in block_linears(layer).values():
            prunable += lin.weight.numel()
            zeros += int((lin.weight == 0).sum())
    total = sum(p.numel() for p in model.parameters())
    return {"prunable_params": prunable, "zeros": zeros, "total_params": total,
            "sparsity_prunable": zeros / max(prunable, 1), "sparsity_all_params": zeros / max(total, 1)}  # fmt: skip


def prune_unstructured(model, cfg: Unstructured, tokens: torch.Tensor | None = None, progress: bool = True) -> dict:
    """Prune in place; `tokens` [n, T] are calibration windows (see calibration_tokens)."""
    model.set_decode_layout(False)  # row-major weights: the rows this code slices and views
    if cfg.needs_calibration and tokens is None:
        raise LeanlmError(f"{cfg.method} pruning needs calibration tokens (calibration_tokens(tokenizer, ...))")
    teacher = copy.deepcopy(model) if cfg.heal_steps else None  # healing distils towards the unpruned model
    n_layers = len(model.layers)
    layer_sparsity = [cfg.sparsity] * n_layers
    report: dict = {"method": cfg.method, "pattern": cfg.pattern, "target_sparsity": cfg.sparsity,
                    "allocation": cfg.allocation}  # fmt: skip
    if cfg.allocation == "owl":
        ratios = owl_outlier_ratios(model, tokens, cfg.owl_m, progress)
        layer_sparsity = owl_layer_sparsity(ratios, cfg.sparsity, cfg.owl_lambda)
        report["owl_outlier_ratios"] = ratios
    report["layer_sparsity"] = layer_sparsity
    if cfg.method == "magnitude":
        for i, layer in enumerate(model.layers):
            for name, lin in block_linears(layer).items():
                _prune_matrix(layer, name, lin, cfg, layer_sparsity[i], None)
    else:
        runner = BlockRunner(model, tokens)
        report["calibration_tokens"] = runner.n_tokens
        for i in tqdm(range(n_layers), desc=f"{cfg.method} blocks", disable=not progress, leave=False):
            layer = model.layers[i]
            stats, _ = _collect(runner, i, layer, hessian=cfg.method == "sparsegpt")
            for name, lin in block_linears(layer).items():
                _prune_matrix(layer, name, lin, cfg, layer_sparsity[i], stats[name])
            runner.advance(runner.run(i))  # the next block sees this block's pruned outputs
    if teacher is not None:
        with torch.enable_grad():
            report["heal"] = heal(model, teacher, tokens, steps=cfg.heal_steps, keep_zeros=True, progress=progress)
        del teacher
    report.update(sparsity_report(model))
    record(model, cfg, {k: report[k] for k in ("sparsity_prunable", "sparsity_all_params")})
    return report


@register(Unstructured)
def _apply_unstructured(model, cfg: Unstructured, calib, progress: bool) -> dict:
    return prune_unstructured(model, cfg, None if calib is None else calib.tokens(), progress)
