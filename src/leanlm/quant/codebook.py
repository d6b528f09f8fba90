"""Non-uniform 4-bit grids: a table of 16 int8 levels per tensor and one bf16 scale per group.

    w_hat[n, k] = scale[n, g] * T[q[n, k]],   q in [0, 16),   T int8 [16], sorted, in [-127, 127]

Weights are bell-shaped, so 16 levels placed densely near zero and sparsely in the tails round them with
less error than 16 evenly spaced ones, at the same bits: 4 per weight plus one bf16 scale per group (no zero:
the scale's sign and the table's asymmetry cover both tails). Tables:

- "iq4nl": the fixed table of llama.cpp's IQ4_NL format (its published level values; the format's definition,
  so a file quantized here reads the same as one IQ4_NL block of that scale);
- "learned": fitted to each tensor (weighted 1-D k-means of the weights in units of their group scale, starting
  from the IQ4_NL table), stored with the tensor.

Scales: for each group, candidate scales map the group's largest-magnitude weight near either end of the table;
each candidate rounds the group to its nearest levels, then takes the least-squares scale for those levels
(weighted by input-channel importance, e.g. the Hessian diagonal under GPTQ); the candidate with the least
weighted error wins (the search llama.cpp's IQ4_NL quantizer does, re-derived here). GPTQ then rounds columns onto
these static grids with its error feedback (gptq.py).

The kernel (csrc/qlinear_codebook.cpp) streams the int4 block layout of packed.py and looks the indices up with
one byte shuffle per 32 weights; `CodebookLinear` is the module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import LeanlmError
from ..ops import FusedLinear, LinearKind
from .config import QSpec
from .packed import NATIVE_MAX_ROWS, RowDequantized, dequant_mm, pack_int4, unpack_int4
from .rtn import QuantizedWeight, pad_columns

# llama.cpp's IQ4_NL levels (ggml-common.h kvalues_iq4nl): the format's definition
IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
SCALE_TRIES = 7  # candidate scales per table end: the end level +- this many units
KMEANS_SAMPLES = 1 << 21  # weights a learned table is fitted on (a strided subsample of bigger tensors)
KMEANS_ITERS = 12


def fixed_table(name: str) -> torch.Tensor:
    if name == "iq4nl":
        return torch.tensor(IQ4NL, dtype=torch.int8)
    raise LeanlmError(f"no fixed table named {name!r}")


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted float `levels` [16] for every entry of x (ties go down)."""
    return torch.bucketize(x, (levels[1:] + levels[:-1]) * 0.5)



# The codebook kernel's layout (csrc/qlinear_codebook.cpp): per row, per 32 columns, 16 bytes; byte j = column j |
# column j + 16 << 4, so one 16-byte load and one shift give 32 table indices in column order.
def pack_blocks(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (K % 32 == 0) -> [N, K/2] in the block layout above."""
    N, K = q.shape
    b = q.to(torch.uint8).view(N, K // 32, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_blocks(p: torch.Tensor) -> torch.Tensor:
    N = p.shape[0]
    b = p.view(N, -1, 16)
    out = torch.empty(N, b.shape[1], 32, dtype=torch.uint8, device=p.device)
    torch.bitwise_and(b, 15, out=out[..., :16])
    torch.bitwise_right_shift(b, 4, out=out[..., 16:])
    return out.view(N, -1)

def search_scales(groups: torch.Tensor, levels: torch.Tensor, importance: torch.Tensor | None = None,
                  tries: int = SCALE_TRIES) -> torch.Tensor:  # fmt: skip
    """Per group of `groups` [N, G, g] the float32 scale d minimising sum imp * (x - d * T[nearest(x / d)])^2.

    importance: [G, g] (per input column) or None (uniform). Returns [N, G] float32 (not yet rounded to bf16).
    The native kernel (csrc/codebook_search.cpp) runs the same search one group at a time; torch's version below
    is the reference and the fallback."""
    x = groups.float()
    if ops.available() and bool((levels == levels.round()).all()):
        N, G, g = x.shape
        imp = None if importance is None else importance.float().reshape(G, g)
        return ops.codebook_search_scales(x.reshape(N * G, g), imp, levels, tries).view(N, G)
    return _search_scales_torch(x, levels, importance, tries)


def _search_scales_torch(x: torch.Tensor, levels: torch.Tensor, importance: torch.Tensor | None,
                         tries: int) -> torch.Tensor:  # fmt: skip
    imp = torch.ones(1, *x.shape[1:]) if importance is None else importance.float().clamp_min(1e-12)[None]
    imp = imp.expand_as(x)
    idx = x.abs().argmax(-1, keepdim=True)
    m = x.gather(-1, idx).squeeze(-1)  # signed largest-magnitude weight of each group
    m = torch.where(m == 0, torch.ones_like(m), m)  # all-zero groups: any scale gives zero error
    lo, hi = float(levels[0]), float(levels[-1])
    best_err = torch.full(m.shape, float("inf"))
    best = m / lo
    for end in (lo, hi):
        for t in range(-tries, tries + 1):
            level = end + (t if end < 0 else -t)
            if level == 0 or (level > 0) != (end > 0):
                continue
            d = m / level
            v = levels[nearest_level(x / d[..., None], levels)]
            wv = imp * v
            d_ls = (wv * x).sum(-1) / (wv * v).sum(-1).clamp_min(1e-20)
            d_ls = torch.where(d_ls == 0, d, d_ls)
            err = (imp * (x - d_ls[..., None] * v).square()).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, d_ls, best)
    return best


def round_scales(d: torch.Tensor) -> torch.Tensor:
    """bf16 scales (never zero: an all-zero group keeps a tiny scale and rounds to the level nearest 0)."""
    b = d.to(torch.bfloat16)
    return torch.where(b == 0, torch.full_like(b, 1e-10), b)


def learn_table(groups: torch.Tensor, importance: torch.Tensor | None = None, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """A table fitted to `groups` [N, G, g]: weighted k-means of the weights in units of the IQ4_NL grid's scales
    (weights imp * d^2, so the fit minimises the error in weight units), rounded to int8 and sorted."""
    start = torch.tensor(IQ4NL, dtype=torch.float32)
    d = search_scales(groups, start, importance)
    u = (groups.float() / d[..., None]).reshape(-1)
    imp = torch.ones_like(groups, dtype=torch.float32) if importance is None else importance.float()[None].expand_as(groups)
    w = (imp * d[..., None].square()).reshape(-1)
    if u.numel() > KMEANS_SAMPLES:
        step = u.numel() // KMEANS_SAMPLES
        u, w = u[::step], w[::step]
    u = u.clamp(-127.0, 127.0)
    c = start.clone()
    for _ in range(iters):
        a = nearest_level(u, c)
        num = torch.zeros(16).index_add_(0, a, w * u)
        den = torch.zeros(16).index_add_(0, a, w)
        c = torch.where(den > 0, num / den.clamp_min(1e-30), c)
        c, _ = torch.sort(c)
    c = c * (127.0 / c.abs().max().clamp_min(1e-12))
    t = torch.round(c).clamp(-127, 127)
    for i in range(1, 16):  # distinct levels after rounding
        t[i] = torch.maximum(t[i], t[i - 1] + 1)
    if t[-1] > 127:
        t = t - (t[-1] - 127)
    return t.to(torch.int8)


def table_for(spec: QSpec, groups: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    return learn_table(groups, importance) if spec.levels == "learned" else fixed_table(spec.levels)


def codebook_grid(W: torch.Tensor, spec: QSpec, importance: torch.Tensor | None = None):
    """(table int8 [16], bf16 scales [N, G]) of W [N, K]; importance: per input column [K] or None."""
    N, K = W.shape
    g, Kp = spec.group_size(K), spec.padded(K)
    groups = pad_columns(W.float(), Kp).view(N, Kp // g, g)
    imp = None
    if importance is not None:
        imp = F.pad(importance.float(), (0, Kp - K)).view(Kp // g, g)
    table = table_for(spec, groups, imp)
    return table, round_scales(search_scales(groups, table.float(), imp))


def codebook_rtn(W: torch.Tensor, spec: QSpec, importance: torch.Tensor | None = None) -> QuantizedWeight:
    """Round each weight to its group's nearest table level (scales from search_scales)."""
    N, K = W.shape
    g, Kp = spec.group_size(K), spec.padded(K)
    table, scale = codebook_grid(W, spec, importance)
    x = pad_columns(W.float(), Kp).view(N, Kp // g, g) / scale.float()[..., None]
    levels = table.float()
    q = nearest_level(x, levels)
    residual = (x - levels[q]).view(N, Kp).half()
    return QuantizedWeight(q.view(N, Kp).to(torch.uint8), scale, None, spec, K, residual, table)


def dequantize_table(q: torch.Tensor, scale: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """float32 [N, Kp] = scale * table[q] from indices [N, Kp] and scales [N, G]."""
    N, Kp = q.shape
    G = scale.shape[1]
    w = table.float()[q.long()].view(N, G, Kp // G) * scale.float()[..., None]
    return w.view(N, Kp)


class CodebookLinear(RowDequantized):
    """A Linear with a 4-bit table-coded weight (see the module docstring). Buffers: `qweight` (indices in the int4
    block layout on the native backend, else plain pairs), `scales` bf16 [N, G], `table` int8 [16].

    backend: "auto" (native if built), "native", or "none" (always dequantize). Products of up to NATIVE_MAX_ROWS
    rows run on ops.q_linear_codebook; more rows dequantize (in row chunks) and use the fp32 GEMM."""

    fused_state = ("backend", "kgroup")
    # class-wide: True runs products of more than NATIVE_MAX_ROWS rows on the kernel too, 16 rows per call (the decode
    # path's numerics, activations rounded to int8, on whole windows: what bench_quality.py measures); False
    # dequantizes them and uses the fp32 GEMM (faster prefill)
    kernel_all_rows = False

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None, backend: str = "auto"):
        super().__init__()
        if qw.table is None:
            raise LeanlmError("CodebookLinear needs a QuantizedWeight with a table (codebook_rtn / gptq on a table grid)")
        self.spec = qw.spec
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.padded_in = qw.q.shape[1]
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("table", qw.table.to(torch.int8).contiguous())
        self.register_buffer("scales", qw.scale.to(torch.bfloat16).contiguous())
        G = self.scales.shape[1]
        self.kgroup, self.stored_in = self.padded_in // G, self.padded_in
        native = backend in ("auto", "native") and ops.available() and self.kgroup % 32 == 0
        if backend == "native" and not native:
            raise LeanlmError("the native codebook kernel is unavailable here (no compiled kernels, or a group that "
                              "is not a multiple of 32); use backend='auto' or 'none'")  # fmt: skip
        self.backend = "native" if native else "none"
        self.layout = "blocks" if native else "plain"
        self.register_buffer("qweight", (pack_blocks(qw.q) if native else pack_int4(qw.q)).contiguous())

    @property
    def kernel(self) -> bool:
        return self.backend != "none"

    @property
    def max_kernel_rows(self) -> int:
        return NATIVE_MAX_ROWS if self.backend == "native" else 0

    def fused_linear_args(self, dtype: torch.dtype, rows: int) -> FusedLinear | None:
        """CODEBOOK on the native backend for up to NATIVE_MAX_ROWS rows (the fused decode step's protocol)."""
        if self.backend != "native" or rows > NATIVE_MAX_ROWS or self.qweight.device.type != "cpu":
            return None
        return FusedLinear(LinearKind.CODEBOOK, self.qweight, self.bias, self.scales, self.table, 4, self.kgroup)

    def codes(self, n0: int = 0, n1: int | None = None) -> torch.Tensor:
        """uint8 table indices of rows [n0, n1), width stored_in."""
        p = self.qweight[n0:n1]
        return unpack_blocks(p) if self.layout == "blocks" else unpack_int4(p)

    def dequantize_rows(self, n0: int, n1: int, dtype=torch.float32) -> torch.Tensor:
        w = dequantize_table(self.codes(n0, n1), self.scales[n0:n1], self.table)
        return w[:, : self.in_features].to(dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        q = unpack_blocks(self.qweight[ids]) if self.layout == "blocks" else unpack_int4(self.qweight[ids])
        return dequantize_table(q, self.scales[ids], self.table)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        native = self.backend == "native" and x.device.type == "cpu"
        if native and x2.shape[0] <= NATIVE_MAX_ROWS:
            y = ops.q_linear_codebook(x2, self.qweight, self.scales, self.table, self.kgroup)
        elif native and self.kernel_all_rows and not (torch.is_grad_enabled() and x2.requires_grad):
            y = torch.cat([ops.q_linear_codebook(x2[i : i + NATIVE_MAX_ROWS], self.qweight, self.scales, self.table,
                                                 self.kgroup) for i in range(0, x2.shape[0], NATIVE_MAX_ROWS)])  # fmt: skip
        else:
            y = self._dequant_mm(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _dequant_mm(self, x2: torch.Tensor) -> torch.Tensor:
        return dequant_mm(self, x2)

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Portable tensors (save.py): qweight uint8 [N, Kp/2] (pack_int4 of the indices), scales, table, bias."""
        spec = self.spec
        meta = {"bits": 4, "group": spec.group, "symmetric": True, "levels": spec.levels, "in_features": self.in_features,
                "out_features": self.out_features}  # fmt: skip
        t = {"qweight": pack_int4(self.codes()[:, : self.padded_in]), "scales": self.scales, "table": self.table}
        if self.bias is not None:
            t["bias"] = self.bias
        return {k: v.contiguous() for k, v in t.items()}, meta

    @classmethod
    def from_export(cls, t: dict[str, torch.Tensor], meta: dict, backend: str = "auto") -> "CodebookLinear":
        spec = QSpec(4, meta["group"], True, meta["levels"])
        if "table" not in t:
            raise LeanlmError(f"a {spec.label()} layer is missing its table; the file is incomplete")
        qw = QuantizedWeight(unpack_int4(t["qweight"]), t["scales"].to(torch.bfloat16), None, spec, meta["in_features"],
                             table=t["table"].to(torch.int8))  # fmt: skip
        return cls(qw, t.get("bias"), backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.label()}, kernel={self.backend}"
