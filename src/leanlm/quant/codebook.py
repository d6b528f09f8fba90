"""Non-uniform 4-bit and 3-bit grids: a table of 2**bits int8 levels per tensor and one bf16 scale per group.

    w_hat[n, k] = scale[n, g] * T[q[n, k]],   q in [0, 2**bits),   T int8 [2**bits], sorted, in [-127, 127]

Weights are bell-shaped, so levels placed densely near zero and sparsely in the tails round them with less error
than evenly spaced ones, at the same bits: 4 (or 3) per weight plus one bf16 scale per group (no zero: the scale's
sign and the table's asymmetry cover both tails). Tables:

- "iq4nl" (4 bits): the fixed table of llama.cpp's IQ4_NL format (its published level values; the format's
  definition, so a file quantized here reads the same as one IQ4_NL block of that scale);
- "iq3" (3 bits): a fixed 8-level table derived here (IQ3 below: the Lloyd-Max levels of a unit Laplacian under
  this module's per-group scale search; derive_iq3 re-derives it);
- "learned" (3 or 4 bits): fitted to each tensor (weighted 1-D k-means of the weights in units of their group
  scale, starting from the fixed table of those bits), stored with the tensor.

Scales: for each group, candidate scales map the group's largest-magnitude weight near either end of the table;
each candidate rounds the group to its nearest levels, then takes the least-squares scale for those levels
(weighted by input-channel importance, e.g. the Hessian diagonal under GPTQ); the candidate with the least
weighted error wins (the search llama.cpp's IQ4_NL quantizer does, re-derived here). GPTQ then rounds columns onto
these static grids with its error feedback (gptq.py).

The kernels look the indices up with byte shuffles over tiles of 16 rows, one shuffle per 16 rows x 4 columns:
csrc/qlinear_codebook.cpp reads the 4-bit indices in the uniform int4 kernel's tiles (packed.tile_codes: 16 bytes
per row and 32 weights), csrc/qlinear_codebook3.cpp the 3-bit ones in tiles of their own (tile_codes3: 12 bytes per
row and 32 weights, in a low-2-bit and a high-bit plane). Files keep per-row forms (4 bits: pack_int4; 3 bits:
pack_blocks3, a per-row form of the same planes), tiled when a module is built. `CodebookLinear` is the module for
both widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..errors import LeanlmError
from ..ops import FusedLinear, LinearKind
from .config import QSpec
from .packed import (NATIVE_MAX_ROWS, TILE_ROWS, RowDequantized, dequant_mm, pack_int4, tile_codes, tiled_rows,
                     unpack_int4, untile_codes)  # fmt: skip
from .rtn import QuantizedWeight, pad_columns
from .wide import pack_wide, tile_codes_wide, tiled_wide_rows, unpack_wide, untile_codes_wide

# llama.cpp's IQ4_NL levels (ggml-common.h kvalues_iq4nl): the format's definition
IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# The 3-bit table "iq3", derived (derive_iq3 re-derives it; a test checks it): start from the Lloyd-Max levels of a
# unit Laplacian (LLOYD_MAX_LAPLACE_8), scaled so the extreme level is +-127; then, on 2**20 samples of a unit
# Laplacian in groups of 32, alternate this module's per-group scale search with learn_table's weighted k-means until
# the levels stop moving: the Lloyd-Max levels of Laplacian weights as they land on the code axis after the scale
# search (the group's largest magnitude near an end of the table, on either sign). The fit comes out asymmetric with
# a level near zero, as IQ4_NL is. On Qwen2.5-0.5B it rounds with less error than the plain Lloyd-Max levels
# (+-9, 33, 67, 127), within about 5% of a table learned per tensor (benchmarks/bench_3bit.py --modes tables).
IQ3 = (-127, -85, -45, -16, 5, 30, 66, 123)
FIXED_TABLES = {"iq4nl": IQ4NL, "iq3": IQ3}
SCALE_TRIES = 7  # candidate scales per table end: the end level +- this many units
KMEANS_SAMPLES = 1 << 21  # weights a learned table is fitted on (a strided subsample of bigger tensors)
KMEANS_ITERS = 12


def fixed_table(name: str, bits: int | None = None) -> torch.Tensor:
    """A fixed table by name; "signed" (all 2**bits signed integers) needs its bits."""
    if name == "signed":
        if bits is None:
            raise LeanlmError("the 'signed' table has one entry per code: give its bits")
        return torch.arange(-(1 << (bits - 1)), 1 << (bits - 1), dtype=torch.int8)
    if name in FIXED_TABLES:
        return torch.tensor(FIXED_TABLES[name], dtype=torch.int8)
    raise LeanlmError(f"no fixed table named {name!r}; use one of {', '.join(FIXED_TABLES)} or 'signed'")


def start_table(bits: int) -> tuple[int, ...]:
    """The fixed table a learned table of `bits` starts from."""
    return IQ3 if bits == 3 else IQ4NL


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted float `levels` for every entry of x (ties go down)."""
    return torch.bucketize(x, (levels[1:] + levels[:-1]) * 0.5)


# The portable 3-bit layout (files, and the module without the kernel): per row, per 32 columns, 12 bytes: bytes 0..7
# the low 2 bits (byte i, bits 2s..2s+1 = column 8s + i), bytes 8..11 the high bits (bit j of their little-endian
# uint32 = column j).
def pack_blocks3(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 8) (K % 32 == 0) -> [N, K * 3 / 8] in the layout above."""
    N, K = q.shape
    b = q.to(torch.uint8).view(N, K // 32, 32)
    low = (b & 3).view(N, -1, 4, 8)  # [.., s, i]: column 8s + i
    lo = low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)
    high = (b >> 2).view(N, -1, 4, 8)  # [.., i, j]: column 8i + j, at bit j of byte i
    hi = torch.zeros_like(high[..., 0])
    for j in range(8):
        hi |= high[..., j] << j
    return torch.cat([lo, hi], -1).reshape(N, K // 32 * 12)


def unpack_blocks3(p: torch.Tensor) -> torch.Tensor:
    N = p.shape[0]
    b = p.view(N, -1, 12)
    lo, hi = b[..., :8], b[..., 8:]
    low = torch.stack([(lo >> (2 * s)) & 3 for s in range(4)], 2)  # [.., s, i]
    high = torch.stack([(hi >> j) & 1 for j in range(8)], -1)  # [.., i, j]
    return (low.reshape(N, -1, 32) | (high.reshape(N, -1, 32) << 2)).view(N, -1)


# The 3-bit kernel's layout (csrc/qlinear_codebook3.cpp, which says why): rows padded to a multiple of 16, then per
# tile of 16 rows, per 32 columns, 192 bytes in three planes of 64 whose byte 4r + c belongs to row r: the low 2 bits
# of columns 0..15 (bits 2s..2s+1 = column 4s + c), of columns 16..31 (column 16 + 4s + c), and the high bits (bit
# j = column 4j + c).
def tile_codes3(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 8) (K % 32 == 0) -> [ceil(N / 16), K / 32 * 192] in the layout above."""
    N, K = q.shape
    T = -(-N // TILE_ROWS)
    q = F.pad(q.to(torch.uint8), (0, 0, 0, T * TILE_ROWS - N)).view(T, TILE_ROWS, K // 32, 32)
    low, high = q & 3, (q >> 2).view(T, TILE_ROWS, K // 32, 8, 4)  # high: [.., j, c]
    planes = []
    for half in (low[..., :16], low[..., 16:]):
        h = half.reshape(T, TILE_ROWS, K // 32, 4, 4)  # [.., s, c]
        planes.append(h[..., 0, :] | (h[..., 1, :] << 2) | (h[..., 2, :] << 4) | (h[..., 3, :] << 6))
    hi = torch.zeros_like(planes[0])
    for j in range(8):
        hi |= high[..., j, :] << j
    planes.append(hi)  # each [T, 16, K/32, 4]
    return torch.stack(planes, 2).permute(0, 3, 2, 1, 4).reshape(T, K // 32 * 192).contiguous()


def untile_codes3(t: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of tile_codes3 (padding rows included): [T * 16, K]."""
    return _untile3(t.view(t.shape[0], K // 32, 3, TILE_ROWS, 4).permute(0, 3, 1, 2, 4)).reshape(-1, K)


def tiled3_rows(t: torch.Tensor, K: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of tiled 3-bit codes, [len(ids), K], without untiling the rest."""
    b = t.view(t.shape[0], K // 32, 3, TILE_ROWS, 4)[ids // TILE_ROWS, :, :, ids % TILE_ROWS]  # [L, K/32, 3, 4]
    return _untile3(b).reshape(len(ids), K)


def _untile3(b: torch.Tensor) -> torch.Tensor:
    """[..., 3, 4] plane bytes of one row and block -> [..., 32] codes."""
    low = torch.cat([torch.stack([(b[..., p, :] >> (2 * s)) & 3 for s in range(4)], -2).flatten(-2)
                     for p in (0, 1)], -1)  # fmt: skip
    high = torch.stack([(b[..., 2, :] >> j) & 1 for j in range(8)], -2).flatten(-2)  # [.., j, c] -> column 4j + c
    return low | (high << 2)


def search_scales(groups: torch.Tensor, levels: torch.Tensor, importance: torch.Tensor | None = None,
                  tries: int = SCALE_TRIES) -> torch.Tensor:  # fmt: skip
    """Per group of `groups` [N, G, g] the float32 scale d minimising sum imp * (x - d * T[nearest(x / d)])^2.

    levels: the sorted table (2 to 64 levels: the 3- to 6-bit grids). importance: [G, g] (per input column) or
    None (uniform). Returns [N, G] float32 (not yet rounded to bf16). The native kernel (csrc/codebook_search.cpp)
    runs the same search one group at a time; torch's version below is the reference and the fallback."""
    x = groups.float()
    if ops.available() and 2 <= levels.numel() <= 64 and bool((levels == levels.round()).all()):
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


def learn_table(groups: torch.Tensor, importance: torch.Tensor | None = None, iters: int = KMEANS_ITERS, bits: int = 4,
                start: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """A table of 2**bits levels fitted to `groups` [N, G, g]: weighted k-means of the weights in units of the scales
    of the `start` grid (default the fixed table of those bits: IQ4_NL, IQ3), weights imp * d^2 so the fit minimises
    the error in weight units, rounded to int8 and sorted."""
    start = torch.tensor(start_table(bits), dtype=torch.float32) if start is None else start.float()
    L = start.numel()
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
        num = torch.zeros(L).index_add_(0, a, w * u)
        den = torch.zeros(L).index_add_(0, a, w)
        c = torch.where(den > 0, num / den.clamp_min(1e-30), c)
        c, _ = torch.sort(c)
    c = c * (127.0 / c.abs().max().clamp_min(1e-12))
    t = torch.round(c).clamp(-127, 127)
    for i in range(1, L):  # distinct levels after rounding
        t[i] = torch.maximum(t[i], t[i - 1] + 1)
    if t[-1] > 127:
        t = t - (t[-1] - 127)
    return t.to(torch.int8)


# Lloyd-Max levels (output points) of an 8-level quantizer for a unit-variance Laplacian, the positive half (Paez &
# Glisson, "Minimum mean-squared-error quantization in speech PCM and DPCM systems", 1972): derive_iq3's start
LLOYD_MAX_LAPLACE_8 = (0.222, 0.785, 1.576, 2.994)


def derive_iq3(samples: int = 1 << 20, group: int = 32, rounds: int = 30, seed: int = 0) -> tuple[int, ...]:
    """The IQ3 table, derived (see IQ3): the Lloyd-Max Laplacian levels scaled to +-127, then rounds of learn_table
    (this module's scale search, then weighted k-means in scale units) on `samples` unit-Laplacian values in groups
    of `group`, each round starting from the last table, until a round returns its start."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(samples, generator=g, dtype=torch.float64) - 0.5
    x = (-torch.sign(u) * torch.log1p(-2 * u.abs()).clamp_min(-40)).float()  # inverse CDF of a Laplacian
    half = torch.tensor(LLOYD_MAX_LAPLACE_8) * (127 / LLOYD_MAX_LAPLACE_8[-1])
    table = torch.round(torch.cat([-half.flip(0), half])).to(torch.int8)
    groups = x[: samples // group * group].view(1, -1, group)
    for _ in range(rounds):
        new = learn_table(groups, start=table.float())
        if torch.equal(new, table):
            break
        table = new
    return tuple(int(v) for v in table)


def table_for(spec: QSpec, groups: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    if spec.levels == "learned":
        return learn_table(groups, importance, bits=spec.bits)
    return fixed_table(spec.levels, spec.bits)


def codebook_grid(W: torch.Tensor, spec: QSpec, importance: torch.Tensor | None = None):
    """(table int8 [2**bits], bf16 scales [N, G]) of W [N, K]; importance: per input column [K] or None."""
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
    """A Linear with a 4-bit or 3-bit table-coded weight (see the module docstring). Buffers: `qweight` (the indices:
    on the native backend the kernel's tiles of 16 rows: 4 bits in the uniform int4 tiles (packed.tile_codes), 3 bits
    in tile_codes3's; else per row: 4 bits in plain pairs, 3 bits in the portable 12-byte blocks), `scales` bf16
    [N, G], `table` int8 [2**bits].

    backend: "auto" (native if built), "native", or "none" (always dequantize). Products of up to NATIVE_MAX_ROWS
    rows run on ops.q_linear_codebook (4 bits) / ops.q_linear_codebook3 (3 bits); more rows dequantize (in row
    chunks) and use the fp32 GEMM."""

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
        bits = self.spec.bits
        if bits not in (3, 4, 5, 6) or qw.table.numel() != 1 << bits:
            raise LeanlmError(f"CodebookLinear takes tables of 2**bits levels at 3 to 6 bits, got bits={bits} and a "
                              f"table of {qw.table.numel()} levels")  # fmt: skip
        if bits > 4 and not torch.equal(qw.table.to(torch.int8), fixed_table("signed", bits)):
            raise LeanlmError(f"a {bits}-bit table grid must be the 'signed' table (no other {bits}-bit table exists)")
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
        if bits > 4:  # the signed integer tables (wide.py)
            self.layout = "tiles_wide" if native else "wide"
            packed = tile_codes_wide(qw.q, bits) if native else pack_wide(qw.q, bits)
        elif bits == 3:  # (groups are multiples of 32, so the stored width is whole blocks)
            self.layout = "tiles3" if native else "blocks3"
            packed = tile_codes3(qw.q) if native else pack_blocks3(qw.q)
        else:
            self.layout = "tiles4" if native else "plain"  # (padding rows: index 0, scale 0)
            packed = tile_codes(qw.q, 4, 0) if native else pack_int4(qw.q)
        self.register_buffer("qweight", packed.contiguous())

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
        return FusedLinear(LinearKind.CODEBOOK, self.qweight, self.bias, self.scales, self.table, self.spec.bits,
                           self.kgroup)  # fmt: skip

    def _unpack(self, p: torch.Tensor) -> torch.Tensor:
        if self.layout == "wide":
            return unpack_wide(p, self.spec.bits)
        return unpack_blocks3(p) if self.layout == "blocks3" else unpack_int4(p)

    def codes(self, n0: int = 0, n1: int | None = None) -> torch.Tensor:
        """uint8 table indices of rows [n0, n1), width stored_in."""
        n1 = self.out_features if n1 is None else n1
        if self.layout in ("tiles3", "tiles4", "tiles_wide"):  # the tiles that hold the rows, untiled
            t0, tiles = n0 // TILE_ROWS, self.qweight[n0 // TILE_ROWS : -(-n1 // TILE_ROWS)]
            K = self.stored_in
            if self.layout == "tiles_wide":
                q = untile_codes_wide(tiles, self.spec.bits, K)
            else:
                q = untile_codes3(tiles, K) if self.layout == "tiles3" else untile_codes(tiles, 4, K)
            return q[n0 - t0 * TILE_ROWS : n1 - t0 * TILE_ROWS]
        return self._unpack(self.qweight[n0:n1])

    def dequantize_rows(self, n0: int, n1: int, dtype=torch.float32) -> torch.Tensor:
        w = dequantize_table(self.codes(n0, n1), self.scales[n0:n1], self.table)
        return w[:, : self.in_features].to(dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.layout == "tiles3":
            q = tiled3_rows(self.qweight, self.stored_in, ids)
        elif self.layout == "tiles4":
            q = tiled_rows(self.qweight, 4, self.stored_in, ids)
        elif self.layout == "tiles_wide":
            q = tiled_wide_rows(self.qweight, self.spec.bits, self.stored_in, ids)
        else:
            q = self._unpack(self.qweight[ids])
        return dequantize_table(q, self.scales[ids], self.table)[:, : self.in_features]

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        if self.spec.bits > 4:
            return ops.q_linear_wide(x2, self.qweight, self.scales, self.spec.bits, self.kgroup)
        product = ops.q_linear_codebook3 if self.spec.bits == 3 else ops.q_linear_codebook
        return product(x2, self.qweight, self.scales, self.table, self.kgroup)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        native = self.backend == "native" and x.device.type == "cpu"
        if native and x2.shape[0] <= NATIVE_MAX_ROWS:
            y = self._kernel(x2)
        elif native and self.kernel_all_rows and not (torch.is_grad_enabled() and x2.requires_grad):
            y = torch.cat([self._kernel(x2[i : i + NATIVE_MAX_ROWS]) for i in range(0, x2.shape[0], NATIVE_MAX_ROWS)])
        else:
            y = self._dequant_mm(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _dequant_mm(self, x2: torch.Tensor) -> torch.Tensor:
        return dequant_mm(self, x2)

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Portable tensors (save.py): qweight uint8 (4 bits: [N, Kp/2], pack_int4 of the indices; 3 bits:
        [N, Kp*3/8], pack_blocks3's layout), scales, table, bias."""
        spec = self.spec
        meta = {"bits": spec.bits, "group": spec.group, "symmetric": True, "levels": spec.levels,
                "in_features": self.in_features, "out_features": self.out_features}  # fmt: skip
        if spec.bits > 4:
            codes = pack_wide(self.codes()[:, : self.padded_in], spec.bits)
        elif spec.bits == 3:
            codes = pack_blocks3(self.codes())
        else:
            codes = pack_int4(self.codes()[:, : self.padded_in])
        t = {"qweight": codes, "scales": self.scales, "table": self.table}
        if self.bias is not None:
            t["bias"] = self.bias
        return {k: v.contiguous() for k, v in t.items()}, meta

    @classmethod
    def from_export(cls, t: dict[str, torch.Tensor], meta: dict, backend: str = "auto") -> "CodebookLinear":
        bits = meta.get("bits", 4)
        spec = QSpec(bits, meta["group"], True, meta["levels"]).validate()
        if "table" not in t:
            raise LeanlmError(f"a {spec.label()} layer is missing its table; the file is incomplete")
        if bits == 3 and t["qweight"].shape[-1] % 12:
            raise LeanlmError(f"a {spec.label()} layer's qweight is not whole 12-byte blocks; the file is damaged")
        if bits > 4 and t["qweight"].shape[-1] % (4 * bits):
            raise LeanlmError(f"a {spec.label()} layer's qweight is not whole {4 * bits}-byte blocks; the file is damaged")
        if bits > 4:
            q = unpack_wide(t["qweight"], bits)
        else:
            q = unpack_blocks3(t["qweight"]) if bits == 3 else unpack_int4(t["qweight"])
        qw = QuantizedWeight(q, t["scales"].to(torch.bfloat16), None, spec, meta["in_features"],
                             table=t["table"].to(torch.int8))  # fmt: skip
        return cls(qw, t.get("bias"), backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.label()}, kernel={self.backend}"
