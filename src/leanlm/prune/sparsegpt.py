"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS-style reconstruction.

For a linear layer with calibration inputs X, the layer-wise objective is
||W X - W' X||^2 with W' sparse, whose Hessian is H = 2 X X^T (shared by all rows).
Columns are processed left to right in blocks; when column j is pruned, the error
(w_j - q_j) / [H^-1]_jj is spread over the not-yet-processed columns through row j of the
upper Cholesky factor of H^-1, so the remaining weights compensate for the pruned ones.
Masks are chosen per block ("adaptive mask selection") by the OBS saliency w^2 / [H^-1]_jj^2,
or per group of M columns for N:M patterns.
"""

from __future__ import annotations

import torch

from ..quant.gptq import inverse_hessian_factor, single_thread
from .masks import _keep_top


class HessianAccumulator:
    """Running H = (2 / n) sum_t x_t x_t^T over calibration tokens."""

    def __init__(self, columns: int):
        self.H = torch.zeros(columns, columns, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:  # x: [tokens, columns]; fp32 sums (fp64 GEMM is slow on CPU)
        x = x.float()
        self.H.addmm_(x.T, x)
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.H.double() * (2.0 / max(self.n, 1))


def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
                    blocksize: int = 128, damp: float = 0.01,
                    keep_pruned_values: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Return (new weight, keep mask) for a [rows, cols] weight and its [cols, cols] Hessian.

    keep_pruned_values: the pruned entries of the returned weight hold the value they had when they were
    pruned (the original plus the compensation of the columns pruned before them) instead of zero; the
    kept entries are the same. A method that chooses another mask over the compensated weights (MaskLLM
    with a SparseGPT prior) starts from these."""
    # The column loop is thousands of small ops: one thread avoids a parallel-region
    # barrier per op, which on a busy 2-core CPU made it 30x slower.
    threads = torch.get_num_threads()  # the factorisation of a large Hessian uses them all
    with single_thread(), torch.no_grad():
        return _sparsegpt(weight, H, sparsity, nm, blocksize, damp, threads, keep_pruned_values)


def _sparsegpt(weight, H, sparsity, nm, blocksize, damp, threads, keep_pruned_values=False):
    W = weight.detach().float().clone()
    cols = W.shape[1]
    owned = H.dtype != torch.float64  # widened here: a copy of ours, whose storage the factorisation reuses
    H = H.double()
    dead = H.diagonal() == 0  # inputs never active: their weights can go for free
    W[:, dead] = 0.0
    Hinv = inverse_hessian_factor(H, damp, dead, what="SparseGPT", threads=threads, overwrite=owned).float()
    if nm is not None:
        n, m = nm
        blocksize = max(m, blocksize - blocksize % m)
    keep = torch.ones_like(W, dtype=torch.bool)
    pruned = torch.zeros_like(W) if keep_pruned_values else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        if nm is None:
            keep1 = _keep_top(W1**2 / d[None, :] ** 2, round(sparsity * W1.numel()), dim=None)
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        for j in range(i2 - i1):
            if nm is not None and j % m == 0:
                sal = W1[:, j : j + m] ** 2 / d[None, j : j + m] ** 2
                keep1[:, j : j + m] = _keep_top(sal, m - n, dim=1)
            w = W1[:, j]
            q = w * keep1[:, j]
            err = (w - q) / Hinv1[j, j]
            if pruned is not None:
                pruned[:, i1 + j] = w - q  # before the in-place update below changes w
            W1[:, j:] -= err[:, None] * Hinv1[j, j:][None, :]
            W1[:, j] = q  # exact zeros where pruned
            Err1[:, j] = err
        W[:, i1:i2] = W1
        keep[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W = W * keep
    return (W + pruned if pruned is not None else W), keep
