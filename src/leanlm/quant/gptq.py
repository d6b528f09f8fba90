"""GPTQ for one weight matrix (Frantar et al., "GPTQ", 2022).

Minimises ||X W^T - X W_hat^T||^2 given H = X^T X / n from calibration inputs: columns are
rounded one at a time onto the group grid and each rounding error is spread over the columns
not yet quantized, weighted by the inverse Hessian (its upper Cholesky factor). Updates are
applied lazily per block of columns, so the big matrix is touched once per block.

Options: dampening (a fraction of the mean diagonal added to H), act-order (columns in order
of decreasing H diagonal; group grids then come from the unmodified weights up front, "static
groups", so storage and kernels keep the natural column order), and `shrink`: per (row, group)
clipping factors of those static grids (awq.search_clip's output-error search; AWQ + GPTQ).
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import LeanlmError
from .config import QSpec
from .rtn import QuantizedWeight, grid_params, pad_columns


# Factorisations of K x K matrices below this size run on one thread (OpenMP wake-ups cost more than they
# save); larger ones (an MLP's down projection: 4864 on Qwen2.5-0.5B, 8960 on the 1.5B) use every thread.
PARALLEL_FACTOR_MIN_K = 4096


def flip_in_place(M: torch.Tensor) -> torch.Tensor:
    """M[::-1, ::-1] written into M's own storage, a band of rows at a time (no second K x K copy)."""
    K, band = M.shape[0], 256
    for a in range(0, K // 2, band):
        b = min(a + band, K // 2)
        top, bottom = M[a:b].flip(0, 1), M[K - b : K - a].flip(0, 1)  # copies of two bands
        M[a:b], M[K - b : K - a] = bottom, top
    if K % 2:
        M[K // 2] = M[K // 2].flip(0)
    return M


def inverse_hessian_factor(H: torch.Tensor, damp: float, dead: torch.Tensor | None = None, what: str = "GPTQ",
                           threads: int | None = None, overwrite: bool = False) -> torch.Tensor:  # fmt: skip
    """Upper triangular U with U^T U = (H + damp * mean(diag H) I)^-1, retrying with more dampening; `dead`
    (bool [K]) marks inputs never active, whose diagonal is taken as 1. overwrite: H's storage is reused (U is
    returned in it; H is then gone), else H is left unchanged.

    Why the flip: with J the exchange matrix, chol(J H J) = L gives H = R R^T with R = J L J upper, so
    H^-1 = R^-T R^-1 and U = R^-1 = J L^-1 J. One Cholesky and one triangular inverse (2/3 K^3 flops) replace
    Cholesky, inverse and a second Cholesky (4/3 K^3), and with `overwrite` two K x K matrices are alive at
    the peak, H's storage and L (the 1.5B's 8960 x 8960 Hessian is 321 MB in fp32). threads: for a large K
    (default: torch's count)."""
    K = H.shape[0]
    diag = H.diagonal().clone()
    if dead is not None:
        diag[dead] = 1.0
    mean_diag = diag.mean().clamp_min(1e-8)
    threads = threads or torch.get_num_threads()
    with torch.no_grad():
        Hf = flip_in_place(H) if overwrite else H.flip(0, 1)  # J H J; its off-diagonal is never written below
        for attempt in range(6):
            Hf.diagonal().copy_(diag.flip(0) + damp * (10**attempt) * mean_diag)
            with parallel(threads if K >= PARALLEL_FACTOR_MIN_K else 1):
                L, info = torch.linalg.cholesky_ex(Hf)
                if int(info) != 0:
                    continue
                Hf.zero_().diagonal().fill_(1.0)  # J H J is no longer needed: its storage becomes L^-1
                torch.linalg.solve_triangular(L, Hf, upper=False, out=Hf)
            del L
            U = flip_in_place(Hf)
            if torch.isfinite(U).all():
                return U
            break
    raise LeanlmError(f"{what}: the {K}x{K} calibration Hessian is not positive definite even with heavy dampening; "
                      "use more calibration samples")  # fmt: skip


@contextlib.contextmanager
def parallel(threads: int):
    """torch's intra-op thread count set to `threads` inside the block."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def single_thread():
    """GPTQ is thousands of small ops plus LAPACK calls on K x K matrices: one thread avoids OpenMP
    wake-ups (measured on the 2-core machine: with 2 threads the column loop ran 10x slower in wall
    time, and cholesky_inverse of a 1536 x 1536 Hessian took 580 ms instead of 130 ms)."""
    with parallel(1):
        yield


@torch.no_grad()
def gptq(W: torch.Tensor, H: torch.Tensor, spec: QSpec, damp: float = 0.01, block_size: int = 128,
         act_order: bool = False, shrink: torch.Tensor | None = None, overwrite_h: bool = False) -> QuantizedWeight:  # fmt: skip
    """Quantize W [N, K] with Hessian H [K, K] (mean of x x^T over calibration rows); shrink [N, G] clips the
    (then static) group grids. overwrite_h: H (fp32) is the caller's to lose and its storage is reused (one
    K x K matrix less at the peak), else it is left unchanged."""
    threads = torch.get_num_threads()  # the factorisation of a large Hessian uses them all
    with single_thread():
        return _gptq(W, H, spec, damp, block_size, act_order, shrink, threads, overwrite_h)


def _gptq(W, H, spec: QSpec, damp: float, block_size: int, act_order: bool, shrink=None,
          threads: int = 1, overwrite: bool = False) -> QuantizedWeight:  # fmt: skip
    N, K = W.shape
    W = W.detach().float().clone()
    overwrite = overwrite or H.dtype != torch.float32  # a widened copy is ours anyway
    H = H.detach().float()
    g, G, Kp = spec.group_size(K), spec.n_groups(K), spec.padded(K)
    dead = H.diagonal() == 0
    W[:, dead] = 0.0
    if spec.codebook:
        return _gptq_table(W, H, spec, damp, block_size, act_order, dead, threads, overwrite)

    scale = torch.empty(N, G)
    zero = None if spec.symmetric else torch.empty(N, G)
    col_group = None
    if act_order or shrink is not None:
        s, z = grid_params(pad_columns(W, Kp).view(N, G, g), spec, shrink)  # static groups
        scale.copy_(s)
        if zero is not None:
            zero.copy_(z)
        col_group = [c // g for c in range(K)]
    W, U, perm, order_groups = _ordered_factor(W, H, dead, g, act_order, damp, threads, overwrite)
    del H
    col_group = order_groups or col_group

    bs = max(block_size // g, 1) * g if spec.group else block_size  # groups never straddle blocks
    q, residual = _columns(W, U, scale, zero, spec, bs, col_group)
    if perm is not None:
        inverse = torch.argsort(perm)
        q, residual = q[:, inverse], residual[:, inverse]
    if Kp > K:
        q = torch.nn.functional.pad(q, (0, Kp - K), value=float(spec.mid))
        residual = torch.nn.functional.pad(residual, (0, Kp - K))
    return QuantizedWeight(q.to(torch.uint8), scale.to(torch.bfloat16), None if zero is None else zero.to(torch.bfloat16),
                           spec, K, residual.half())  # fmt: skip


def _ordered_factor(W, H, dead, g: int, act_order: bool, damp: float, threads: int, overwrite: bool):
    """(W, U, perm, col_group) in the column order GPTQ walks: act-order permutes columns by decreasing Hessian
    diagonal (perm and each column's static group; else None for both) and factors the permuted copy, which is
    ours to overwrite."""
    perm = col_group = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H, dead = W[:, perm], H[perm][:, perm], dead[perm]
        col_group = (perm // g).tolist()
        overwrite = True
    return W, inverse_hessian_factor(H, damp, dead, threads=threads, overwrite=overwrite), perm, col_group


def _gptq_table(W, H, spec: QSpec, damp: float, block_size: int, act_order: bool, dead,
                threads: int = 1, overwrite: bool = False) -> QuantizedWeight:  # fmt: skip
    """GPTQ onto a table grid (codebook.py, 16 or 8 levels): static per-group scales searched on the weights, weighted
    by the Hessian diagonal (each input's mean square), then each column rounded to its nearest scaled level."""
    from .codebook import codebook_grid

    N, K = W.shape
    g, Kp = spec.group_size(K), spec.padded(K)
    table, scale = codebook_grid(W, spec, H.diagonal())
    W, U, perm, col_group = _ordered_factor(W, H, dead, g, act_order, damp, threads, overwrite)
    del H
    col_group = col_group or [c // g for c in range(K)]
    bs = max(block_size // g, 1) * g
    q, residual = _columns(W, U, scale.float(), None, spec, bs, col_group, table.float())
    if perm is not None:
        inverse = torch.argsort(perm)
        q, residual = q[:, inverse], residual[:, inverse]
    if Kp > K:
        q = torch.nn.functional.pad(q, (0, Kp - K), value=float(int(table.abs().argmin())))
        residual = torch.nn.functional.pad(residual, (0, Kp - K))
    return QuantizedWeight(q.to(torch.uint8), scale, None, spec, K, residual.half(), table)


def _columns(W, U, scale, zero, spec: QSpec, bs: int, col_group, levels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ column loop with lazy block updates; returns codes and rounding residuals (the
    error-compensated weight's position on the code axis minus its code). col_group: the static
    group of each (permuted) column, or None: dynamic groups, whose scale/zero are filled in here. levels: a
    table grid's sorted levels (float [2**bits]; codes are then table indices, w_hat = scale * levels[code])."""
    N, K = W.shape
    g = spec.group_size(K)
    q, residual = torch.empty(N, K), torch.empty(N, K)
    mid, qmax = float(spec.mid), float(spec.qmax)
    mids = None if levels is None else (levels[1:] + levels[:-1]) * 0.5
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        W1 = W[:, i1:i2].clone()
        Err = torch.empty(N, i2 - i1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col_group is None:
                gi = col // g
                if col % g == 0:  # a new group: its grid from the columns as updated so far
                    cols = W1[:, i : i + g] if spec.group else W[:, col : col + g]
                    s, z = grid_params(cols[:, None, :], spec)
                    scale[:, gi] = s[:, 0]
                    if zero is not None:
                        zero[:, gi] = z[:, 0]
            else:
                gi = col_group[col]
            s = scale[:, gi]
            w = W1[:, i]
            z = 0.0 if zero is None else zero[:, gi]
            if levels is None:
                x = (w - z) / s + mid
                c = torch.clamp(torch.round(x), 0, qmax)
                wq = (c - mid) * s + z
                q[:, col], residual[:, col] = c, x - c
            else:
                x = w / s
                c = torch.bucketize(x, mids)
                v = levels[c]
                wq = v * s
                q[:, col], residual[:, col] = c.float(), x - v
            err = (w - wq) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Err[:, i] = err
        if i2 < K:
            W[:, i2:].addmm_(Err, U[i1:i2, i2:], alpha=-1.0)
    return q, residual
