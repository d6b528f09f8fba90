"""5-bit and 6-bit signed integer grids (llama.cpp Q5_0-like): the codes' layouts for files and for the kernel.

    w_hat[n, k] = (q[n, k] - 2**(bits-1)) * scale[n, g],   q in [0, 2**bits),   one bf16 scale per group

so the levels are -16..15 at 5 bits and -32..31 at 6 bits (symmetric, no zero point). Two layouts of the codes:

- `pack_wide` (files, and a module without the kernel): per row, the low nibbles as pack_int4 packs them (byte i =
  column 2i | column 2i + 1 << 4; K / 2 bytes), then the high bits: 5 bits: bit j of byte i = bit 4 of column 8i + j
  (K / 8 bytes); 6 bits: bits 2j..2j+1 of byte i = bits 4..5 of column 4i + j (K / 4 bytes). 20 (24) bytes per 32
  codes.
- `tile_codes_wide` (csrc/qlinear_wide.cpp's tiles, which say why): rows padded to a multiple of 16 with the mid code
  (level 0), then per tile of 16 rows, per block of 32 columns, lanes of 64 bytes whose byte 4r + c belongs to row r:
    5 bits, 5 lanes (320 bytes): lane L's bits 0..4 = column 4L + c; the lanes' top 3 bits s_L hold columns 20..31:
      column 20 + c = s_0 | (s_1 & 3) << 3,   column 24 + c = s_2 | (s_3 & 3) << 3,
      column 28 + c = s_4 | (s_1 >> 2) << 3 | (s_3 >> 2) << 4
    6 bits, 6 lanes (384 bytes), halves p of 16 columns: lane 3p + L (L < 3) bits 0..5 = column 16p + 4L + c, bits
      6..7 = bits 2L..2L+1 of column 16p + 12 + c.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LeanlmError
from .packed import TILE_ROWS, pack_int4, unpack_int4

WIDE_BITS = (5, 6)
LANES = {5: 5, 6: 6}  # 64-byte lanes per tile and block of 32 columns
BLOCK_BYTES = {b: 64 * n for b, n in LANES.items()}  # 320, 384


def mid_code(bits: int) -> int:
    """The code of level 0: 2**(bits-1)."""
    return 1 << (bits - 1)


def _check_bits(bits: int) -> None:
    if bits not in WIDE_BITS:
        raise LeanlmError(f"the signed integer grids take bits 5 or 6, got bits={bits}")


def _check_width(K: int, multiple: int, what: str) -> None:
    if K % multiple:
        raise LeanlmError(f"{what} needs a width that is a multiple of {multiple}, got {K}; pad the columns first "
                          "(the stored width is a whole number of groups)")  # fmt: skip


def pack_wide(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 2**bits) (K % 8 == 0) -> [N, K * bits / 8] in the file layout above."""
    _check_bits(bits)
    N, K = q.shape
    _check_width(K, 8, "pack_wide")
    q = q.to(torch.uint8)
    high = (q >> 4).view(N, -1, 8 // (bits - 4))  # 5 bits: 8 one-bit values per byte; 6 bits: 4 two-bit values
    packed = torch.zeros(high.shape[:2], dtype=torch.uint8)
    for j in range(high.shape[-1]):
        packed |= high[..., j] << ((bits - 4) * j)
    return torch.cat([pack_int4(q & 15), packed], 1)


def unpack_wide(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_wide: [N, K * bits / 8] -> uint8 codes [N, K]."""
    _check_bits(bits)
    N, B = p.shape
    if B % bits:
        raise LeanlmError(f"a {bits}-bit packed row of {B} bytes is not whole groups of 8 codes; the data is damaged")
    K = B * 8 // bits
    hb = bits - 4  # high bits per code
    high = torch.stack([(p[:, K // 2 :] >> (hb * j)) & ((1 << hb) - 1) for j in range(8 // hb)], -1).view(N, K)
    return unpack_int4(p[:, : K // 2].contiguous()) | (high << 4)


def tile_codes_wide(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 2**bits) (K % 32 == 0) -> the kernel's tiles [ceil(N / 16), K / 32 * 64 * lanes]
    (the layout above; padding rows hold the mid code)."""
    _check_bits(bits)
    N, K = q.shape
    _check_width(K, 32, "tile_codes_wide")
    T = -(-N // TILE_ROWS)
    q = F.pad(q.to(torch.uint8), (0, 0, 0, T * TILE_ROWS - N), value=mid_code(bits))
    s = q.view(T, TILE_ROWS, K // 32, 8, 4)  # [.., step j, c]: column 4j + c of the block
    if bits == 5:
        c20, c24, c28 = s[..., 5, :], s[..., 6, :], s[..., 7, :]
        top = [c20 & 7, (c20 >> 3) | ((c28 >> 3) & 1) << 2, c24 & 7, (c24 >> 3) | (c28 >> 4) << 2, c28 & 7]
        lanes = [s[..., L, :] | (top[L] << 5) for L in range(5)]
    else:
        top = [s[..., 4 * p + 3, :] for p in (0, 1)]  # column 16p + 12 + c, spread over the half's 3 lanes
        lanes = [s[..., 4 * p + L, :] | (((top[p] >> (2 * L)) & 3) << 6) for p in (0, 1) for L in range(3)]
    t = torch.stack(lanes, 3)  # [T, 16, K/32, lanes, 4]
    return t.permute(0, 2, 3, 1, 4).reshape(T, K // 32 * BLOCK_BYTES[bits]).contiguous()


def untile_codes_wide(t: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of tile_codes_wide (padding rows included): [T * 16, K]."""
    _check_bits(bits)
    L = LANES[bits]
    b = t.view(t.shape[0], K // 32, L, TILE_ROWS, 4).permute(0, 3, 1, 2, 4)  # [T, 16, K/32, lanes, 4]
    return _untile(b, bits).reshape(-1, K)


def tiled_wide_rows(t: torch.Tensor, bits: int, K: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of tiled codes, [len(ids), K], without untiling the rest."""
    _check_bits(bits)
    b = t.view(t.shape[0], K // 32, LANES[bits], TILE_ROWS, 4)[ids // TILE_ROWS, :, :, ids % TILE_ROWS]
    return _untile(b, bits).reshape(len(ids), K)


def _untile(b: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., lanes, 4] lane bytes of one row and block -> [..., 32] codes in column order."""
    if bits == 5:
        low = [b[..., L, :] & 31 for L in range(5)]
        top = [b[..., L, :] >> 5 for L in range(5)]
        c20 = top[0] | (top[1] & 3) << 3
        c24 = top[2] | (top[3] & 3) << 3
        c28 = top[4] | (top[1] >> 2) << 3 | (top[3] >> 2) << 4
        return torch.stack([*low, c20, c24, c28], -2).flatten(-2)
    steps = []
    for p in (0, 1):
        lanes = [b[..., 3 * p + L, :] for L in range(3)]
        steps += [v & 63 for v in lanes]
        steps.append((lanes[0] >> 6) | (lanes[1] >> 6) << 2 | (lanes[2] >> 6) << 4)
    return torch.stack(steps, -2).flatten(-2)


def dequantize_wide(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 [N, Kp] = (q - 2**(bits-1)) * scale from codes [N, Kp] and scales [N, G]."""
    N, Kp = q.shape
    G = scale.shape[1]
    w = (q.float() - mid_code(bits)).view(N, G, Kp // G) * scale.float()[..., None]
    return w.view(N, Kp)
