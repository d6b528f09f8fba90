"""2:4 sparse int8 weights that decode faster than dense int8: `NMInt8Linear` and the `NMInt8` config.

Why: a 2:4-pruned matrix (leanlm.prune Unstructured(pattern="2:4")) stored dense streams its zeros, so the
pruned model decodes no faster. Here every group of 4 consecutive input weights of a row keeps its 2 values
(int8, symmetric, per-channel or per-group bf16 scales as leanlm.quant's int8) plus a 3-bit code of their
positions (one of the 6 pairs, stored in a nibble): 5 bytes per 8 weights, 0.625 of dense int8. The decode
kernel (leanlm.ops.q_linear_nm, src/leanlm/csrc/qlinear_nm.cpp) gathers the activation bytes of the kept
positions with `pshufb` and runs the int8 dot products of the dense kernel; it gives the dense int8 kernel's
numbers on the same codes bit for bit.

    leanlm.apply(model, Unstructured("wanda", pattern="2:4"), calib)   # prune
    leanlm.apply(model, NMInt8())                                      # 2:4 int8 storage of the block linears

`NMInt8` takes the block linears as they are: float ones are quantized (RTN int8, symmetric, `group`), int8
QuantLinear ones (leanlm.apply(model, RTN(bits=8, ...)) after pruning) keep their codes. A matrix that is not
2:4 raises LeanlmError. Not saved by leanlm.save yet (save the pruned model and apply NMInt8 after loading).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..apply import record, register
from ..errors import LeanlmError
from ..ops import FusedLinear, LinearKind
from .config import QSpec
from .packed import TILE_ROWS, QuantLinear, RowDequantized, dequant_mm
from .rtn import rtn

PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))  # pair code -> kept positions (csrc/qlinear_nm.cpp)
KERNEL_ROWS = 64  # rows up to which forward runs the kernel 16 rows at a time; more: dequantize + fp32 GEMM
STEP_BYTES = 80  # per tile of 16 rows and 8 columns: 64 value bytes + 16 code bytes
_CODE = torch.full((16,), -1, dtype=torch.int64)
for _c, (_a, _b) in enumerate(PAIRS):
    _CODE[_a * 4 + _b] = _c
_FIRST = torch.tensor([a for a, _ in PAIRS])
_SECOND = torch.tensor([b for _, b in PAIRS])


def not_nm_error(name: str, worst: int) -> LeanlmError:
    return LeanlmError(f"{name} is not 2:4 sparse (a group of 4 consecutive input weights has {worst} non-zeros); "
                       "prune it first: leanlm prune --pattern 2:4, or leanlm.apply(model, Unstructured(pattern='2:4'))")  # fmt: skip


def nm_split(q: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values [N, K] (K % 8 == 0, at most 2 non-zeros per group of 4 columns) -> (kept values int8
    [N, K / 2], pair codes int64 [N, K / 4]). Groups with fewer non-zeros keep zeros at the first free positions."""
    N, K = q.shape
    g = q.view(N, K // 4, 4)
    nz = g != 0
    worst = int(nz.sum(-1).max()) if nz.numel() else 0
    if worst > 2:
        raise not_nm_error(name, worst)
    key = nz.to(torch.int8) * 8 + torch.arange(3, -1, -1, dtype=torch.int8)  # non-zeros first, then low positions
    pos = key.topk(2, dim=-1).indices.sort(dim=-1).values  # [N, K/4, 2]
    codes = _CODE[pos[..., 0] * 4 + pos[..., 1]]
    return g.gather(-1, pos).reshape(N, K // 2), codes


def tile_nm(q: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """2:4 int8 values [N, K] (K % 32 == 0) -> the kernel's tiles uint8 [ceil(N/16), K / 8 * 80]: rows padded to a
    multiple of 16 with zeros; per tile and 8 columns, 64 bytes (row r's 4 kept values at 4r) + 16 bytes (row r's
    codes: first group in the low nibble)."""
    N, K = q.shape
    T = -(-N // TILE_ROWS)
    vals, codes = nm_split(q, name)
    if T * TILE_ROWS > N:
        vals = F.pad(vals, (0, 0, 0, T * TILE_ROWS - N))
        codes = F.pad(codes, (0, 0, 0, T * TILE_ROWS - N))
    v = vals.view(torch.uint8).view(T, TILE_ROWS, K // 8, 4).permute(0, 2, 1, 3).reshape(T, K // 8, 64)
    c = codes.view(T * TILE_ROWS, K // 8, 2)
    cb = (c[..., 0] | (c[..., 1] << 4)).to(torch.uint8).view(T, TILE_ROWS, K // 8).permute(0, 2, 1)
    return torch.cat([v, cb], dim=-1).reshape(T, K // 8 * STEP_BYTES).contiguous()


def untile_nm(t: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of tile_nm: int8 values [T * 16, K] (zeros where pruned)."""
    T = t.shape[0]
    s = t.view(T, K // 8, STEP_BYTES)
    v = s[..., :64].reshape(T, K // 8, TILE_ROWS, 4).permute(0, 2, 1, 3).contiguous().view(torch.int8)
    cb = s[..., 64:].permute(0, 2, 1).to(torch.int64)  # [T, 16, K/8]
    c = torch.stack([cb & 15, cb >> 4], dim=-1)  # [T, 16, K/8, 2]
    first, second = _FIRST[c], _SECOND[c]
    out = torch.zeros(T, TILE_ROWS, K // 8, 2, 4, dtype=torch.int8)
    vv = v.view(T, TILE_ROWS, K // 8, 2, 2)
    out.scatter_(-1, first.unsqueeze(-1), vv[..., 0:1])
    out.scatter_(-1, second.unsqueeze(-1), vv[..., 1:2])
    return out.view(T * TILE_ROWS, K)


class NMInt8Linear(RowDequantized):
    """2:4 sparse int8 Linear (see the module docstring). Buffers: `qweight` (uint8 tiles, tile_nm), `scales`
    bf16 [N, G], `bias` fp32 or None. Up to KERNEL_ROWS rows run on the native kernel (16 per call), more are
    dequantized to float32 (dequant_mm). Implements the fused decode step's protocol (leanlm.ops) as an NM linear."""

    fused_state = ("kgroup",)

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, in_features: int, bias: torch.Tensor | None = None,
                 name: str = "weight"):  # fmt: skip
        """values: int8 [N, Kp] (w = value * scale of its group; Kp % 32 == 0, 2:4 along Kp), scales [N, G]."""
        super().__init__()
        N, Kp = values.shape
        G = scales.shape[1]
        if Kp % 32 or Kp % G or (Kp // G) % 32:
            raise LeanlmError(f"{name}: the 2:4 int8 kernel needs a stored width ({Kp}) and group ({Kp // G}) in "
                              "multiples of 32; use a per-channel scale (group=0) or a group of 32 / 64 / 128")  # fmt: skip
        self.in_features, self.out_features, self.stored_in, self.kgroup = in_features, N, Kp, Kp // G
        self.register_buffer("qweight", tile_nm(values.to(torch.int8), name))
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_quant(cls, ql: QuantLinear, name: str = "weight") -> "NMInt8Linear":
        """The same codes and scales as a symmetric int8 QuantLinear in the native layout (pruned codes: value 0)."""
        if ql.spec.bits != 8 or ql.zeros is not None or ql.layout != "tiles":
            raise LeanlmError(f"{name}: 2:4 int8 storage takes a symmetric int8 QuantLinear on the native kernel "
                              f"({ql.spec.label()}, kernel={ql.backend}); quantize with RTN(bits=8, symmetric=True)")  # fmt: skip
        values = ql._codes(0, ql.out_features)[:, : ql.stored_in]
        return cls(values, ql.scales, ql.in_features, ql.bias, name)

    @classmethod
    def from_linear(cls, lin: nn.Linear, group: int = 0, name: str = "weight") -> "NMInt8Linear":
        """RTN int8 (symmetric, per channel or `group`) of a 2:4-pruned float Linear."""
        w = lin.weight.detach().float()
        N, K = w.shape
        if K % 4 == 0 and w.numel():
            worst = int((w.view(N, K // 4, 4) != 0).sum(-1).max())
            if worst > 2:
                raise not_nm_error(name, worst)
        qw = rtn(w, QSpec(8, group, True))
        q = qw.q.to(torch.int16) - 128
        q[:, K:] = 0  # group padding repeats the last column: keep the pattern
        Kp = q.shape[1]
        if group == 0 and Kp % 32:
            q = F.pad(q, (0, 32 - Kp % 32))
        return cls(q.to(torch.int8), qw.scale, K, lin.bias, name)

    def fused_linear_args(self, dtype: torch.dtype, rows: int) -> FusedLinear | None:
        if rows > ops.MAX_ROWS or self.qweight.device.type != "cpu" or not ops.available():
            return None
        return FusedLinear(LinearKind.NM, self.qweight, self.bias, self.scales, None, 8, self.kgroup)

    def values(self, n0: int = 0, n1: int | None = None) -> torch.Tensor:
        """int8 values of rows [n0, n1) (zeros where pruned), width stored_in."""
        n1 = self.out_features if n1 is None else n1
        t0, t1 = n0 // TILE_ROWS, -(-n1 // TILE_ROWS)
        return untile_nm(self.qweight[t0:t1], self.stored_in)[n0 - t0 * TILE_ROWS : n1 - t0 * TILE_ROWS]

    def dequantize_rows(self, n0: int, n1: int, dtype=torch.float32) -> torch.Tensor:
        v = self.values(n0, n1).float()
        s = self.scales[n0:n1].float()
        w = (v.view(n1 - n0, s.shape[1], -1) * s[..., None]).view(n1 - n0, -1)
        return w[:, : self.in_features].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        M = x2.shape[0]
        kernel = M <= KERNEL_ROWS and x.device.type == "cpu" and ops.available()
        if kernel and not (torch.is_grad_enabled() and x2.requires_grad):  # 16 rows per call (rows are independent)
            y = torch.cat([ops.q_linear_nm(x2[i : i + ops.MAX_ROWS], self.qweight, self.scales, self.kgroup)
                           for i in range(0, M, ops.MAX_ROWS)])  # fmt: skip
        else:
            y = dequant_mm(self, x2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 2:4, group={self.kgroup}"


@dataclass
class NMInt8:
    """2:4 sparse int8 storage of every block linear (NMInt8Linear). group: 0 = per-channel scales, else columns
    per scale (a multiple of 32); used for float linears, int8 QuantLinears keep theirs."""

    pattern: str = "2:4"
    group: int = 0

    needs_calibration = False

    def __post_init__(self):
        if self.pattern != "2:4":
            raise LeanlmError(f"NMInt8 stores the 2:4 pattern only, got {self.pattern!r}; prune with pattern='2:4'")
        if self.group < 0 or self.group % 32:
            raise LeanlmError(f"NMInt8 group must be 0 (per channel) or a multiple of 32, got {self.group}")

    def price(self, plan) -> None:
        """Cost model: int8 weights, half of them stored (0.625 bytes per weight with the positions)."""
        plan.weight_dtype = "int8"
        plan.sparsity = 0.5
        plan.sparsity_pattern = "2:4"


def nm_int8(model, cfg: NMInt8 | None = None) -> dict:
    """Replace every block linear with its NMInt8Linear (in place); returns bytes before / after."""
    from ..calibration import LINEARS, get_module, set_module

    cfg = cfg or NMInt8()
    before = after = 0
    for i, layer in enumerate(model.layers):
        for lin in LINEARS:
            m = get_module(layer, lin)
            name = f"layers.{i}.{lin}"
            size = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
            if isinstance(m, NMInt8Linear):
                continue
            if isinstance(m, QuantLinear):
                new = NMInt8Linear.from_quant(m, name)
            elif isinstance(m, nn.Linear):
                new = NMInt8Linear.from_linear(m, cfg.group, name)
            else:
                raise LeanlmError(f"{name} is a {type(m).__name__}; 2:4 int8 storage takes a Linear or an int8 "
                                  "QuantLinear (apply NMInt8 before other methods that replace the linears)")
            set_module(layer, lin, new)
            before += size
            after += sum(t.numel() * t.element_size() for t in new.buffers())
    result = {"bytes_before": before, "bytes_after": after}
    record(model, cfg, result)
    return result


@register(NMInt8)
def _apply_nm_int8(model, cfg: NMInt8, calib, progress: bool) -> dict:
    return nm_int8(model, cfg)
