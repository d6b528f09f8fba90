"""Packed low-bit Linear modules and the CPU kernels they run on.

`QuantLinear` replaces a runtime Linear. Its buffers hold the packed weight and nothing else,
so `weight_bytes` (parameters + buffers) reports the real resident size. Backends, best first:

- native (leanlm.ops.q_linear, src/leanlm/csrc/qlinear.cpp, built once with the system compiler):
  int4 / int8 codes in the kernel's "tiles" layout (tile_codes: 16 output rows interleaved 4 bytes at a
  time, so one 64-byte load feeds all 16 rows' dot products and the weight streams in one pass), bf16
  `scales`/`zeros` [N, G]; the activation row is quantized to int8 per 32 and the dot products run on
  int8 SIMD (AVX2, or AVX512-VNNI where the CPU has it). Up to NATIVE_MAX_ROWS rows per call. QuantLinear implements the fused decode step's protocol (leanlm.ops) as a QUANT linear.
- torch: `_weight_int8pack_mm` (int8 per channel; an asymmetric zero adds sum(x) * zero) and
  `_weight_int4pack_mm_for_cpu` (int4, torch's tinygemm layout, `scales_zeros` [G, N, 2]); that
  layout depends on the CPU's vector width and is found by packing a probe once.
- none: dequantize and use the float32 GEMM.

Multi-row products (prefill, scoring) of the native layout run on leanlm.ops.q_gemm where the CPU has
AVX512-VNNI (src/leanlm/csrc/gemm_int8.cpp: int8 dot products, activations quantized per block of 32 as the
small-row kernel does; the weight is packed panel by panel per call, no second copy). Elsewhere (AVX2 CPUs,
torch's layouts, autograd) they dequantize to float32 and use the fp32 GEMM, which beat every low-bit
kernel at 512 rows on the AVX2 CPU it was measured on (benchmarks/bench_quant.py --kernels); large
matrices are dequantized in row chunks. Files store a portable layout (save.py); the
in-memory layout is rebuilt at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import FusedLinear, LinearKind
from .config import QSpec
from .rtn import QuantizedWeight

KERNEL_MAX_ROWS = 4  # rows up to which torch's low-bit kernels beat dequantize + fp32 GEMM (measured)
NATIVE_MAX_ROWS = ops.MAX_ROWS  # the native kernel takes up to 16 rows per call (the fused decode step's MAX_ROWS)
CHUNK_ELEMENTS = 1 << 23  # dequantize at most this many weights at a time in the fallback path
KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the int4 CPU kernel accepts


# ---- portable int4 packing ----------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (K even, values < 16) -> [N, K/2]: low nibble = even column."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: [N, K/2] -> uint8 codes [N, K]."""
    return torch.stack([p & 15, p >> 4], dim=-1).view(p.shape[0], -1)


# ---- torch's CPU int4 kernel layout ---------------------------------------------------------
# _convert_weight_to_int4pack_for_cpu stores blocks of BLOCK_N rows (32 with AVX2, 64 with
# AVX512) as [K, BLOCK_N/2] bytes; full blocks pair row r with row r + BLOCK_N/2 ("cat"), a tail
# block of 16/32/48 rows (and builds without vector units) pairs rows 2j and 2j+1 ("pair").
# Which one this build uses is found by packing a probe once.
_LAYOUTS = (("cat", 32), ("cat", 64), ("pair", 32), ("pair", 64))
_int4_layout: tuple | None | str = "unknown"
_int8_ok: bool | None = None


def _unpack_kernel_layout(packed: torch.Tensor, N: int, K: int, layout: tuple) -> torch.Tensor:
    """uint8 codes [N, K] from the kernel layout of N rows (N % 16 == 0)."""
    mode, block = layout
    flat = packed.reshape(-1)
    out = []
    full = N // block
    if full:
        b = flat[: full * block * K // 2].view(full, K, block // 2)
        if mode == "cat":
            rows = torch.cat([b & 15, b >> 4], dim=-1)  # [full, K, block]
        else:
            rows = torch.stack([b & 15, b >> 4], dim=-1).view(full, K, block)
        out.append(rows.permute(0, 2, 1).reshape(full * block, K))
    tail = N - full * block
    if tail:
        b = flat[full * block * K // 2 :].view(K, tail // 2)
        out.append(torch.stack([b & 15, b >> 4], dim=-1).view(K, tail).t())
    return out[0] if len(out) == 1 else torch.cat(out)


def int4_kernel_layout():
    """The kernel layout of this build, or None when the int4 CPU kernel is unavailable."""
    global _int4_layout
    if _int4_layout == "unknown":
        _int4_layout = None
        try:
            g = torch.Generator().manual_seed(0)
            q = torch.randint(0, 16, (144, 64), generator=g, dtype=torch.int32)
            p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            for layout in _LAYOUTS:
                if torch.equal(_unpack_kernel_layout(p, 144, 64, layout), q.to(torch.uint8)):
                    sz = torch.zeros(2, 144, 2, dtype=torch.bfloat16)
                    torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, 64, dtype=torch.bfloat16), p, 32, sz)
                    _int4_layout = layout
                    break
        except (RuntimeError, AttributeError, NotImplementedError):
            _int4_layout = None
    return _int4_layout


def int8_kernel_ok() -> bool:
    global _int8_ok
    if _int8_ok is None:
        try:
            torch.ops.aten._weight_int8pack_mm(
                torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(16, 32, dtype=torch.int8),
                torch.ones(16, dtype=torch.bfloat16))  # fmt: skip
            _int8_ok = True
        except (RuntimeError, AttributeError, NotImplementedError):
            _int8_ok = False
    return _int8_ok


def _kernel_group(K: int) -> tuple[int, int]:
    """(kernel group, K padded for the kernel) for a per-channel int4 weight."""
    Kk = -(-K // 32) * 32
    return next(g for g in KERNEL_GROUPS if Kk % g == 0), Kk


# ---- leanlm's native layout (csrc/qlinear.cpp) ---------------------------------------------
TILE_ROWS = 16  # output rows per tile of the native layout (csrc/qlinear.cpp)


def tile_codes(q: torch.Tensor, bits: int, pad_value: int) -> torch.Tensor:
    """Codes [N, K] (K % 32 == 0; int8 as stored, code - 128) -> the native kernel's tiles [ceil(N/16), 16 K / (8 / bits)]:
    rows padded to a multiple of 16 with `pad_value`; per tile, int8: per 4 columns, 64 bytes = 16 rows x 4 values;
    int4: per 8 columns, 64 bytes, byte 4r + j = column j (low nibble) | column j + 4 (high nibble) of row r."""
    N, K = q.shape
    T = -(-N // TILE_ROWS)
    if T * TILE_ROWS > N:
        q = F.pad(q, (0, 0, 0, T * TILE_ROWS - N), value=pad_value)
    if bits == 8:
        return q.view(T, TILE_ROWS, K // 4, 4).permute(0, 2, 1, 3).reshape(T, TILE_ROWS * K).contiguous()
    v = q.to(torch.uint8).view(T, TILE_ROWS, K // 8, 2, 4)
    packed = v[:, :, :, 0] | (v[:, :, :, 1] << 4)  # [T, 16, K/8, 4]
    return packed.permute(0, 2, 1, 3).reshape(T, TILE_ROWS * K // 2).contiguous()


def untile_codes(t: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of tile_codes (padding rows included): [T * 16, K]."""
    T = t.shape[0]
    if bits == 8:
        return t.view(T, K // 4, TILE_ROWS, 4).permute(0, 2, 1, 3).reshape(T * TILE_ROWS, K)
    b = t.view(T, K // 8, TILE_ROWS, 4)
    codes = torch.stack([b & 15, b >> 4], dim=2)  # [T, K/8, 2, 16, 4]
    return codes.permute(0, 3, 1, 2, 4).reshape(T * TILE_ROWS, K)


def tiled_rows(t: torch.Tensor, bits: int, K: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of tiled codes, [len(ids), K], without untiling the rest."""
    tile, r = ids // TILE_ROWS, ids % TILE_ROWS
    if bits == 8:
        return t.view(-1, K // 4, TILE_ROWS, 4)[tile, :, r, :].reshape(len(ids), K)
    b = t.view(-1, K // 8, TILE_ROWS, 4)[tile, :, r, :]  # [L, K/8, 4]
    return torch.stack([b & 15, b >> 4], dim=2).reshape(len(ids), K)


def _round32(k: int) -> int:
    return -(-k // 32) * 32


# ---- the module -------------------------------------------------------------------------------
def exported_weight(t: dict[str, torch.Tensor], meta: dict) -> QuantizedWeight:
    """The QuantizedWeight (codes in [0, 2**bits), bf16 scales / zeros) of QuantLinear.export()'s tensors."""
    spec = QSpec(meta["bits"], meta["group"], meta["symmetric"])
    q = t["qweight"].view(torch.uint8) ^ 128 if spec.bits == 8 else unpack_int4(t["qweight"])  # (code - 128) -> code
    zero = t["zeros"].to(torch.bfloat16) if "zeros" in t else None
    return QuantizedWeight(q, t["scales"].to(torch.bfloat16), zero, spec, meta["in_features"])


def dequant_mm(layer, x2: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] times a quantized layer's weights, dequantized CHUNK_ELEMENTS at a time (layer.dequantize /
    dequantize_rows), so the fp32 copy of a large weight is never whole."""
    xf = x2.float()
    held = layer.__dict__.get("held_weight")
    if held is not None:
        return F.linear(xf, held)
    N, K = layer.out_features, layer.in_features
    step = max(64, CHUNK_ELEMENTS // max(K, 1) // 64 * 64)
    if step >= N:
        return F.linear(xf, layer.dequantize())
    out = torch.empty(xf.shape[0], N, dtype=torch.float32, device=xf.device)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        torch.matmul(xf, layer.dequantize_rows(n0, n1).t(), out=out[:, n0:n1])
    return out


class RowDequantized(nn.Module):
    """A Linear stored in some packed form that can give back the float weights of any output rows
    (`dequantize_rows(n0, n1, dtype)`): the whole weight and `.weight` follow from it; moving it keeps the
    packed format.

    `held_weight` (a plain attribute, set by hold_weight): the fp32 dequantized weight that multi-row products use
    instead of dequantizing on every call. GPTQ / AWQ hold it while the calibration forwards of a block run through
    its freshly quantized table-grid Linears (8 forwards per Linear), then drop it (release_weight)."""

    def hold_weight(self) -> None:
        self.held_weight = self.dequantize()

    def release_weight(self) -> None:
        self.__dict__.pop("held_weight", None)

    def _apply(self, fn, recurse=True):
        """model.to(dtype) / .float() move devices but keep the packed format (bf16 scales, fp32 bias)."""
        super()._apply(fn, recurse)
        for name in ("scales", "zeros", "scales_zeros"):
            b = self._buffers.get(name)
            if b is not None and b.dtype != torch.bfloat16:
                self._buffers[name] = b.to(torch.bfloat16)
        if self.bias is not None and self.bias.dtype != torch.float32:
            self._buffers["bias"] = self.bias.float()
        return self

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.dequantize_rows(0, self.out_features, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a new float32 tensor; for inspection, not the hot path)."""
        return self.dequantize()


class QuantLinear(RowDequantized):
    """Weight-only quantized Linear (see module docstring). Inputs/outputs in the caller's dtype.

    backend: "auto" (native if built, else torch's kernels), "native", "torch", or "none"
    (always dequantize). Buffers: `qweight`; `scales` / `zeros` bf16 [N, G] (G groups of the
    stored width), except for torch's int4 kernel, which takes `scales_zeros` [G', N, 2].
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None, backend: str = "auto"):
        super().__init__()
        spec = qw.spec
        self.spec = spec
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.padded_in = qw.q.shape[1]
        N, Kp = self.out_features, self.padded_in
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        q, scale, zero = qw.q, qw.scale.contiguous(), None if qw.zero is None else qw.zero.contiguous()
        G = scale.shape[1]
        self.layout, self.backend = "plain", "none"
        want_native = backend in ("auto", "native") and ops.available()
        if spec.bits == 8:
            torch_ok = backend in ("auto", "torch") and G == 1 and int8_kernel_ok()
            # native: whole blocks of 32 (code 128 = 0); torch's AVX-512 kernel reads past a width that is not
            # a multiple of 16 (garbage, even a segfault, with torch 2.13 on an AVX-512 CPU): pad to 16
            Kn = _round32(Kp) if want_native and G == 1 else -(-Kp // 16) * 16 if torch_ok else Kp
            if Kn > Kp:
                q = F.pad(q, (0, Kn - Kp), value=128)
            stored = (q.to(torch.uint8) ^ 128).view(torch.int8)  # code - 128 with no int16 temporary (a head is 2e8 codes)
            native = want_native and Kn % 32 == 0
            self.register_buffer("qweight", tile_codes(stored, 8, 0) if native else stored.contiguous())
            self.register_buffer("scales", scale)
            self.register_buffer("zeros", zero)
            self.kgroup, self.stored_in = Kn // G, Kn
            if native:
                self.layout, self.backend = "tiles", "native"
            elif torch_ok:
                self.backend = "torch"
            return
        if want_native:  # int4 tiles; per-channel widths padded to 32 columns
            Kn = _round32(Kp) if G == 1 else Kp
            if Kn > Kp:
                q = F.pad(q, (0, Kn - Kp), value=spec.mid)
            self.register_buffer("qweight", tile_codes(q, 4, spec.mid))
            self.register_buffer("scales", scale)
            self.register_buffer("zeros", zero)
            self.kgroup, self.stored_in = Kn // G, Kn
            self.layout, self.backend = "tiles", "native"
            return
        layout = int4_kernel_layout() if backend in ("auto", "torch") else None
        if layout is not None and N % 16 == 0:  # torch's tinygemm kernel
            if spec.group:
                kgroup, Kk = spec.group, Kp
                s2, z2 = scale, zero
            else:
                kgroup, Kk = _kernel_group(self.in_features)
                s2 = scale.expand(N, Kk // kgroup)
                z2 = None if zero is None else zero.expand(N, Kk // kgroup)
            if kgroup in KERNEL_GROUPS:
                qk = F.pad(q, (0, Kk - Kp), value=spec.mid) if Kk > Kp else q
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qk.to(torch.int32).contiguous(), 1)
                if torch.equal(_unpack_kernel_layout(packed, N, Kk, layout), qk):  # belt and braces
                    z2 = torch.zeros_like(s2) if z2 is None else z2
                    self.register_buffer("qweight", packed)
                    self.register_buffer("scales_zeros", torch.stack([s2.t(), z2.t()], dim=-1).contiguous())
                    self.kgroup, self.stored_in = kgroup, Kk
                    self.layout, self.backend = layout, "torch"
                    return
        self.register_buffer("qweight", pack_int4(q).contiguous())
        self.register_buffer("scales", scale)
        self.register_buffer("zeros", zero)
        self.kgroup, self.stored_in = Kp // G, Kp

    fused_state = ("backend", "kgroup")  # the protocol's answer depends on these besides the buffers

    @property
    def kernel(self) -> bool:
        return self.backend != "none"

    def fused_linear_args(self, dtype: torch.dtype, rows: int) -> FusedLinear | None:
        """QUANT on the native backend for up to its kernel's rows (the fused decode step's protocol, leanlm.ops)."""
        if self.backend != "native" or rows > self.max_kernel_rows or self.qweight.device.type != "cpu":
            return None
        return FusedLinear(LinearKind.QUANT, self.qweight, self.bias, self.scales, self.zeros, self.spec.bits,
                           self.kgroup)  # fmt: skip

    # ---- dequantization --------------------------------------------------------------
    def _codes(self, n0: int, n1: int) -> torch.Tensor:
        """Codes of rows [n0, n1), width stored_in: int4 uint8 (n0 a multiple of 64 for torch's layout); int8 as
        stored (code - 128)."""
        if self.layout == "tiles":
            t0, t1 = n0 // TILE_ROWS, -(-n1 // TILE_ROWS)
            rows = untile_codes(self.qweight[t0:t1], self.spec.bits, self.stored_in)
            return rows[n0 - t0 * TILE_ROWS : n1 - t0 * TILE_ROWS]
        if self.spec.bits == 8:
            return self.qweight[n0:n1]
        if self.layout == "plain":
            return unpack_int4(self.qweight[n0:n1])
        Kk = self.stored_in
        flat = self.qweight.reshape(-1)[n0 * Kk // 2 : n1 * Kk // 2]
        return _unpack_kernel_layout(flat, n1 - n0, Kk, self.layout)

    def _scale_zero(self, rows) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 scale and zero [n, G] of the given rows (slice or index tensor)."""
        if self.backend == "torch" and self.spec.bits == 4:
            sz = self.scales_zeros[:, rows].float()
            return sz[..., 0].t(), sz[..., 1].t()
        return self.scales[rows].float(), None if self.zeros is None else self.zeros[rows].float()

    def _dequant(self, codes: torch.Tensor, rows) -> torch.Tensor:
        n = codes.shape[0]
        s, z = self._scale_zero(rows)
        G = s.shape[1]
        w = codes.view(n, G, -1).float()
        if self.spec.bits == 4:
            w.sub_(self.spec.mid)
        w.mul_(s[..., None])
        if z is not None:
            w.add_(z[..., None])
        return w.view(n, -1)[:, : self.in_features]

    def dequantize_rows(self, n0: int, n1: int, dtype=torch.float32) -> torch.Tensor:
        """Weights of output rows [n0, n1) as [n1 - n0, in_features]."""
        return self._dequant(self._codes(n0, n1), slice(n0, n1)).to(dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids` (embedding lookup), float32 [len(ids), in_features]."""
        if self.layout == "tiles":
            return self._dequant(tiled_rows(self.qweight, self.spec.bits, self.stored_in, ids), ids)
        if self.spec.bits == 8:
            return self._dequant(self.qweight[ids], ids)
        if self.layout == "plain":
            return self._dequant(unpack_int4(self.qweight[ids]), ids)
        block, Kk, N = self.layout[1], self.stored_in, self.out_features  # torch layout: unpack whole blocks
        full = N // block
        bid = ids // block
        in_full = bid < full
        q = torch.empty(len(ids), Kk, dtype=torch.uint8, device=ids.device)
        if bool(in_full.any()):
            ub, inv = torch.unique(bid[in_full], return_inverse=True)
            blocks = self.qweight.reshape(-1)[: full * block * Kk // 2].view(full, -1)[ub]
            codes = _unpack_kernel_layout(blocks, len(ub) * block, Kk, self.layout).view(len(ub), block, Kk)
            q[in_full] = codes[inv, ids[in_full] % block]
        if not bool(in_full.all()):
            q[~in_full] = self._codes(full * block, N)[ids[~in_full] - full * block]
        return self._dequant(q, ids)

    # ---- forward ---------------------------------------------------------------------
    int8_gemm = True  # class-wide switch; False: multi-row products dequantize + fp32 GEMM (A/B measurements)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.backend != "none" and x2.shape[0] <= self.max_kernel_rows and x.device.type == "cpu":
            y = self._kernel_mm(x2)
        elif "held_weight" not in self.__dict__ and self._gemm_ok(x2):  # bias added in fp32 and rounded to x's dtype inside, as below
            y = ops.q_gemm(x2, self.qweight, self.scales, self.zeros, self.spec.bits, self.kgroup, self.bias)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            y = self._dequant_mm(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _gemm_ok(self, x2: torch.Tensor) -> bool:
        """Multi-row product on the native int8 GEMM (ops.q_gemm): the native layout on a VNNI CPU, no autograd."""
        if not self.int8_gemm or self.backend != "native" or x2.device.type != "cpu" or not ops.q_gemm_usable():
            return False
        return not (torch.is_grad_enabled() and x2.requires_grad)

    @property
    def max_kernel_rows(self) -> int:
        return NATIVE_MAX_ROWS if self.backend == "native" else KERNEL_MAX_ROWS

    def _kernel_mm(self, x2: torch.Tensor) -> torch.Tensor:
        if self.backend == "native":
            return ops.q_linear(x2, self.qweight, self.scales, self.zeros, self.spec.bits, self.kgroup)
        xb = x2.to(torch.bfloat16)
        if self.stored_in > self.in_features:
            xb = F.pad(xb, (0, self.stored_in - self.in_features))
        if self.spec.bits == 8:
            s = self.scales if self.scales.dtype == torch.bfloat16 else self.scales.to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(xb, self.qweight, s.view(-1))
            if self.zeros is not None:
                y = torch.addcmul(y.float(), x2.float().sum(-1, keepdim=True), self.zeros.view(1, -1).float())
            return y
        sz = self.scales_zeros if self.scales_zeros.dtype == torch.bfloat16 else self.scales_zeros.to(torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.qweight, self.kgroup, sz)

    def _dequant_mm(self, x2: torch.Tensor) -> torch.Tensor:
        return dequant_mm(self, x2)

    # ---- export ----------------------------------------------------------------------
    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Portable tensors and metadata (the on-disk layout of save.py)."""
        spec, N, K = self.spec, self.out_features, self.in_features
        meta = {"bits": spec.bits, "group": spec.group, "symmetric": spec.symmetric,
                "in_features": K, "out_features": N}  # fmt: skip
        G = spec.n_groups(K)
        t: dict[str, torch.Tensor] = {}
        if spec.bits == 8:
            t["qweight"] = self._codes(0, N)[:, : self.padded_in]
        else:
            t["qweight"] = pack_int4(self._codes(0, N)[:, : self.padded_in])
        s, z = self._scale_zero(slice(0, N))
        t["scales"] = s[:, :G].to(torch.bfloat16)
        if not spec.symmetric:
            t["zeros"] = z[:, :G].to(torch.bfloat16)
        if self.bias is not None:
            t["bias"] = self.bias
        return {k: v.contiguous() for k, v in t.items()}, meta

    @classmethod
    def from_export(cls, t: dict[str, torch.Tensor], meta: dict, backend: str = "auto") -> "QuantLinear":
        return cls(exported_weight(t, meta), t.get("bias"), backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.label()}, kernel={self.backend}"


class QuantEmbedding(nn.Module):
    """Embedding lookup from a quantized table (shared with the LM head when embeddings are tied).

    `weight` is an empty tensor that only carries dtype and device (the runtime reads
    `tok_embeddings.weight.dtype` for the compute dtype); the table is `self.table`.
    """

    def __init__(self, table: QuantLinear, dtype: torch.dtype):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype, device=table.qweight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self._dtype_probe

    def dense_weight(self) -> torch.Tensor:
        """The dequantized table (float32; for export and inspection)."""
        return self.table.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return self.table.rows(flat).view(*ids.shape, self.embedding_dim).to(self._dtype_probe.dtype)
