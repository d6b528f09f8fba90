"""Pruning masks: scores (magnitude, Wanda), unstructured and N:M selection, OWL allocation.

A mask is a bool tensor shaped like the weight, True = keep. Weights are [out, in]
(rows = output features); N:M groups run along the input dimension, as sparse tensor cores
and every 2:4 kernel expect: at most N nonzeros in each run of M consecutive inputs of a row.
"""

from __future__ import annotations

import torch

from ..errors import LeanlmError


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep at most N of every M consecutive weights. None/'' -> None."""
    if not pattern:
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise LeanlmError(f"bad N:M pattern '{pattern}'; write it as N:M with N < M, e.g. --pattern 2:4 or 4:8") from None
    if not 0 < n < m:
        raise LeanlmError(f"bad N:M pattern '{pattern}': need 0 < N < M (N kept of every M), e.g. 2:4 or 4:8")
    return n, m


def check_sparsity(s: float, what: str = "sparsity") -> float:
    if not 0.0 <= s < 1.0:
        raise LeanlmError(f"{what} must be in [0, 1), got {s}; e.g. --{what} 0.5 prunes half the weights")
    return float(s)


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().abs()


def wanda_scores(w: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2: a weight matters as much as the input it multiplies (Sun et al. 2023)."""
    return w.detach().float().abs() * input_sq_norm.float().clamp_min(0).sqrt()[None, :]


def _keep_top(scores: torch.Tensor, n_prune: int, dim: int | None) -> torch.Tensor:
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune <= 0:
        return mask
    if dim is None:  # one threshold for the whole tensor: exactly n_prune pruned (ties by index)
        idx = torch.topk(scores.flatten(), n_prune, largest=False, sorted=False).indices
        mask.view(-1)[idx] = False
    else:
        idx = torch.topk(scores, n_prune, dim=dim, largest=False, sorted=False).indices
        mask.scatter_(dim, idx, False)
    return mask


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Prune the lowest-scoring `round(sparsity * n)` weights, per output row or over the matrix."""
    check_sparsity(sparsity)
    if per_row:
        return _keep_top(scores, round(sparsity * scores.shape[1]), dim=1)
    return _keep_top(scores, round(sparsity * scores.numel()), dim=None)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise LeanlmError(f"N:M pattern {n}:{m} needs the input width ({cols}) to be a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    return _keep_top(groups, m - n, dim=2).reshape(rows, cols)


def owl_layer_sparsity(outlier_ratios: list[float], target: float, lam: float = 0.08) -> list[float]:
    """OWL (Yin et al. 2024): layers with more activation outliers keep more weights.

    Outlier ratios are mapped linearly onto [-lam, +lam] of density around the target, so the
    mean sparsity over layers stays `target` and every layer is within target +- lam.
    """
    check_sparsity(target)
    r = torch.tensor(outlier_ratios, dtype=torch.float64)
    span = r.max() - r.min()
    if len(r) < 2 or span <= 0:
        return [target] * len(outlier_ratios)
    density = (r - r.min()) / span * 2 * lam
    density = density - density.mean() + (1 - target)
    return [min(max(1 - d, 0.0), 0.99) for d in density.tolist()]


def outlier_ratio(score_mats: list[torch.Tensor], m: float = 5.0) -> float:
    """Fraction of a block's Wanda scores above m x their mean (OWL's layerwise outlier density)."""
    flat = torch.cat([s.flatten() for s in score_mats])
    return (flat > m * flat.mean()).float().mean().item()
