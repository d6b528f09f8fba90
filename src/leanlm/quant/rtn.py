"""The quantization grid and round-to-nearest (RTN).

Every method in this package ends in the same representation, `QuantizedWeight`: integer codes
q in [0, 2**bits) per weight, and per (output row, input group) a bfloat16 `scale` and, when
asymmetric, a bfloat16 `zero`:  w_hat = (q - 2**(bits-1)) * scale + zero.

Scales are rounded *up* to bfloat16 and, for asymmetric groups, re-derived after the zero is
rounded, so the stored grid always covers the group's [min, max]: the rounding error of every
weight is then at most scale / 2 (the bound the tests check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import QSpec


@dataclass
class QuantizedWeight:
    q: torch.Tensor  # uint8 [N, Kp] codes in [0, 2**bits); Kp = in_features padded to whole groups
    scale: torch.Tensor  # bfloat16 [N, G]
    zero: torch.Tensor | None  # bfloat16 [N, G], None when symmetric
    spec: QSpec
    in_features: int
    # float16 [N, Kp]: where each weight sat on the code axis before rounding, minus its code (the
    # rounding error, in code steps; learnable rounding starts from it). Not stored, not packed.
    residual: torch.Tensor | None = None
    table: torch.Tensor | None = None  # int8 [2**bits]: table grids (codebook.py), w_hat = scale * table[q]

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, in_features] weights on the stored grid."""
        if self.table is not None:
            from .codebook import dequantize_table

            return dequantize_table(self.q, self.scale, self.table)[:, : self.in_features].to(dtype)
        return dequantize_codes(self.q, self.scale, self.zero, self.spec)[:, : self.in_features].to(dtype)


def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest bfloat16 >= x (x > 0), returned as float32."""
    b = x.to(torch.bfloat16)
    up = (b.view(torch.int16) + 1).view(torch.bfloat16)
    return torch.where(b.float() < x, up, b).float()


def pad_columns(w: torch.Tensor, padded: int) -> torch.Tensor:
    """Right-pad columns by repeating the last one (group min/max are unchanged)."""
    if padded == w.shape[1]:
        return w
    return F.pad(w[None], (0, padded - w.shape[1]), mode="replicate")[0]


def grid_params(groups: torch.Tensor, spec: QSpec, shrink: torch.Tensor | float | None = None):
    """Scale and zero (float32 holding bf16 values) of each group of `groups` [N, G, g].

    `shrink` (scalar or [N, G]) scales the group's range towards zero: the clipping that AWQ and
    MSE searches tune. The returned grid always covers the (shrunk) range.
    """
    groups = groups.float()
    if spec.symmetric:
        amax = groups.abs().amax(-1)
        if shrink is not None:
            amax = amax * shrink
        scale = bf16_ceil((amax / (spec.mid - 1)).clamp_min(1e-10))
        return scale, None
    lo, hi = groups.amin(-1), groups.amax(-1)
    if shrink is not None:
        lo, hi = lo * shrink, hi * shrink
    scale = ((hi - lo) / spec.qmax).clamp_min(1e-10)
    zero = (lo + spec.mid * scale).to(torch.bfloat16).float()
    # after rounding the zero, make sure [zero - mid*s, zero + (qmax-mid)*s] still covers [lo, hi]
    need = torch.maximum((hi - zero) / (spec.qmax - spec.mid), (zero - lo) / spec.mid)
    scale = bf16_ceil(torch.maximum(scale, need).clamp_min(1e-10))
    return scale, zero


def codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QSpec) -> torch.Tensor:
    """Integer codes (float tensor) of `groups` [..., g] on the grid of scale/zero [...]."""
    z = 0.0 if zero is None else zero[..., None]
    return torch.clamp(torch.round((groups - z) / scale[..., None]) + spec.mid, 0, spec.qmax)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QSpec) -> torch.Tensor:
    """float32 [N, Kp] from codes [N, Kp] and per-group scale/zero [N, G]."""
    N, Kp = q.shape
    G = scale.shape[1]
    w = (q.view(N, G, Kp // G).float() - spec.mid) * scale.float()[..., None]
    if zero is not None:
        w = w + zero.float()[..., None]
    return w.view(N, Kp)


def fake_quantize(w: torch.Tensor, spec: QSpec, shrink=None) -> torch.Tensor:
    """Quantize-dequantize [N, K] with RTN (for searches and sensitivity): float32 [N, K]."""
    return rtn(w, spec, shrink).dequantize()


def rtn(w: torch.Tensor, spec: QSpec, shrink: torch.Tensor | float | None = None,
        residual: bool = False) -> QuantizedWeight:  # fmt: skip
    """Round-to-nearest on the min/max grid of each group (optionally shrunk); `residual` also
    returns the rounding errors (learnable rounding starts from them; searches that call this
    many times skip them). Table grids (spec.codebook) go to codebook.codebook_rtn (no shrink)."""
    if spec.codebook:
        if shrink is not None:
            raise ValueError("table grids search their own scales; shrink applies to uniform grids only")
        from .codebook import codebook_rtn

        return codebook_rtn(w, spec)
    N, K = w.shape
    g, Kp = spec.group_size(K), spec.padded(K)
    groups = pad_columns(w.float(), Kp).view(N, Kp // g, g)
    scale, zero = grid_params(groups, spec, shrink)
    q = codes(groups, scale, zero, spec)
    err = None
    if residual:
        z = 0.0 if zero is None else zero[..., None]
        err = ((groups - z) / scale[..., None] + spec.mid - q).view(N, Kp).half()
    return QuantizedWeight(q.view(N, Kp).to(torch.uint8), scale.to(torch.bfloat16),
                           None if zero is None else zero.to(torch.bfloat16), spec, K, err)  # fmt: skip
