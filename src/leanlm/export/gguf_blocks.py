"""ggml block formats the `gguf` package cannot write: K-quants (Q4_K, Q5_K, Q6_K) and IQ4_NL from float rows,
and Q8_0 / Q4_0 / Q5_0 / IQ4_NL blocks from a leanlm-quantized model's own codes (no second rounding).

Layouts are ggml's (the `gguf` package's dequantizers read them; tests round-trip through those):
- Q8_0 (34 bytes / 32 weights): fp16 d, 32 int8;                    w = d * q
- Q4_0 (18 / 32): fp16 d, 16 bytes, byte j = q[j] | q[j+16] << 4;  w = d * (q - 8)
- Q5_0 (22 / 32): fp16 d, 4 bytes of fifth bits (bit j: q[j]), Q4_0's 16 bytes of low nibbles;  w = d * (q - 16)
- IQ4_NL (18 / 32): as Q4_0 with table indices;                     w = d * T[q], T = codebook.IQ4NL
- Q4_K (144 / 256): fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales and mins (8 sub-blocks of 32), 128 bytes
  of nibbles (per 64 weights: sub-block 2c in the low nibbles, 2c+1 in the high);  w = d * sc * q - dmin * m
- Q5_K (176 / 256): as Q4_K plus 32 bytes holding the fifth bit (bit i of byte l: sub-block i, weight l)
- Q6_K (210 / 256): 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 int8 scales (sub-blocks of 16),
  fp16 d;  w = d * sc * (q - 32)

The K-quant quantizers here are round-to-nearest with a small per-sub-block scale search (least-squares scale and
offset for each of a few candidate grids, the one with the least squared error kept), then the sub-block scales
rounded to 6 / 8 bits under one fp16 super-block scale. No importance matrix: uniform weights.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
CHUNK = 1 << 21  # weights quantized at a time (bounds the temporaries of big tensors)
CANDIDATES = np.linspace(-1.0, 1.0, 9)  # grid widths tried per sub-block: nmax + delta levels over the range


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(d.astype(np.float16)).view(np.uint8).reshape(*d.shape, 2)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) | (hi.astype(np.uint8) << 4)).astype(np.uint8)


def _chunked(fn, rows: np.ndarray, block: int) -> np.ndarray:
    """fn over row chunks of `rows` [N, K] (K % block == 0): fn takes [n, K] float32 and returns [n, bytes]."""
    rows = np.asarray(rows, dtype=np.float32)
    N, K = rows.shape
    assert K % block == 0, (K, block)
    step = max(1, CHUNK // K)
    return np.concatenate([fn(rows[i : i + step]) for i in range(0, N, step)]) if N else np.zeros((0, 0), np.uint8)


# ---- from a quantized model's codes ----------------------------------------------------------------
def pack_q8_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """int8 codes [N, K] and fp16-representable scales [N, K/32] -> Q8_0 bytes [N, K/32 * 34]."""
    N, K = q.shape
    out = np.empty((N, K // 32, 34), np.uint8)
    out[..., :2] = _f16_bytes(d)
    out[..., 2:] = q.astype(np.int8).view(np.uint8).reshape(N, K // 32, 32)
    return out.reshape(N, -1)


def pack_q4_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Codes in [0, 16) [N, K] (w = d * (q - 8)) or IQ4_NL table indices -> Q4_0 / IQ4_NL bytes [N, K/32 * 18]."""
    N, K = q.shape
    b = q.astype(np.uint8).reshape(N, K // 32, 2, 16)
    out = np.empty((N, K // 32, 18), np.uint8)
    out[..., :2] = _f16_bytes(d)
    out[..., 2:] = _nibbles(b[:, :, 0], b[:, :, 1])
    return out.reshape(N, -1)


def pack_q5_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Codes in [0, 32) [N, K] (w = d * (q - 16)) -> Q5_0 bytes [N, K/32 * 22]: fp16 d, 4 bytes whose bit j is the
    fifth bit of q[j], then Q4_0's nibbles of the low four bits."""
    N, K = q.shape
    b = q.astype(np.uint8).reshape(N, K // 32, 32)
    out = np.empty((N, K // 32, 22), np.uint8)
    out[..., :2] = _f16_bytes(d)
    high = ((b >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    out[..., 2:6] = high.astype("<u4").view(np.uint8).reshape(N, K // 32, 4)
    low = b & 15
    out[..., 6:] = _nibbles(low[..., :16], low[..., 16:])
    return out.reshape(N, -1)


# ---- IQ4_NL from floats ---------------------------------------------------------------------------------
def quantize_iq4_nl(rows: np.ndarray) -> np.ndarray:
    """float rows [N, K] (K % 32 == 0) -> IQ4_NL bytes. Per block of 32: candidate scales map the block's
    largest-magnitude weight near either end of the table (-127 or 113, +- 3 units); each candidate rounds the block to its
    nearest levels and takes the least-squares scale for them; the least squared error wins (the search of
    quant/codebook.py, here in numpy with fewer candidates). The scale is rounded to fp16 before the final rounding."""
    from ..quant.codebook import IQ4NL

    levels = np.array(IQ4NL, np.float32)
    # where the block's largest-magnitude weight may land: either end of the (asymmetric) table, +- 3 units
    CANDIDATE_LEVELS = [levels[0] + t for t in range(-3, 4)] + [levels[-1] + t for t in range(-3, 4)]
    # nearest level by table lookup: every midpoint between levels is a multiple of 1/2, so all of [k/2, (k+1)/2)
    # rounds to one level; 2x the table's range covers every x/d a candidate scale gives
    lut = np.searchsorted((levels[1:] + levels[:-1]) / 2, (np.arange(-512, 512) + 0.25) / 2)

    def nearest(u: np.ndarray) -> np.ndarray:
        return lut[np.clip(np.floor(u * 2).astype(np.int32) + 512, 0, 1023)]

    def one(x: np.ndarray) -> np.ndarray:
        g = x.reshape(-1, 32)
        amax = g[np.arange(g.shape[0]), np.abs(g).argmax(1)]
        zero = amax == 0
        amax = np.where(zero, 1.0, amax)
        best_err, best = np.full(g.shape[0], np.inf, np.float32), amax / levels[0]
        for level in CANDIDATE_LEVELS:
            v = levels[nearest(g / (amax / level)[:, None])]
            d = (v * g).sum(1) / np.maximum((v * v).sum(1), 1e-30)
            err = ((g - d[:, None] * v) ** 2).sum(1)
            better = err < best_err
            best_err, best = np.where(better, err, best_err), np.where(better, d, best)
        d = np.where(zero, 0.0, best).astype(np.float16)
        df = d.astype(np.float32)
        q = nearest(g / np.where(df == 0, 1.0, df)[:, None])
        return pack_q4_0(q.reshape(x.shape[0], -1), d.reshape(x.shape[0], -1))

    return _chunked(one, rows, 32)


# ---- K-quants -------------------------------------------------------------------------------------------
def _fit_offset(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x [B, n]: (scale >= 0, offset <= 0) with x ~ scale * q + offset, q in [0, nmax], trying the
    CANDIDATES grids over the row's range [min(x, 0), max(x)] and refitting scale and offset by least squares."""
    n = x.shape[1]
    lo = np.minimum(x.min(1), 0.0)
    span = np.maximum(x.max(1) - lo, 1e-30)
    best_err = np.full(x.shape[0], np.inf, np.float32)
    best_s, best_m = span / nmax, lo
    Sx = x.sum(1)
    for delta in CANDIDATES:
        iscale = (nmax + delta) / span
        q = np.clip(np.rint((x - lo[:, None]) * iscale[:, None]), 0, nmax)
        Sq, Sqq, Sqx = q.sum(1), (q * q).sum(1), (q * x).sum(1)
        det = n * Sqq - Sq * Sq
        ok = det > 0
        det = np.where(ok, det, 1.0)
        s = np.where(ok, (n * Sqx - Sq * Sx) / det, 1.0 / iscale)
        m = np.where(ok, (Sqq * Sx - Sq * Sqx) / det, lo)
        pos = m > 0  # the format stores -offset >= 0: refit the scale alone
        s = np.where(pos, Sqx / np.maximum(Sqq, 1e-30), s)
        m = np.where(pos, 0.0, m)
        s = np.maximum(s, 0.0)
        err = ((s[:, None] * q + m[:, None] - x) ** 2).sum(1)
        better = err < best_err
        best_err, best_s, best_m = np.where(better, err, best_err), np.where(better, s, best_s), np.where(better, m, best_m)
    return best_s.astype(np.float32), best_m.astype(np.float32)


def _k_scales(x: np.ndarray, nmax: int):
    """x [B, 256] -> (d fp16 [B], dmin fp16 [B], sc uint8 [B, 8], mn uint8 [B, 8], q uint8 [B, 8, 32])."""
    B = x.shape[0]
    sub = x.reshape(B * 8, 32)
    s, m = _fit_offset(sub, nmax)
    s, mins = s.reshape(B, 8), (-m).reshape(B, 8)
    d = (s.max(1) / 63).astype(np.float16)
    dmin = (mins.max(1) / 63).astype(np.float16)
    df, dmf = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.rint(s / np.where(df > 0, df, 1)[:, None]), 0, 63)
    mn = np.clip(np.rint(mins / np.where(dmf > 0, dmf, 1)[:, None]), 0, 63)
    step = (df[:, None] * sc)[..., None]  # [B, 8, 1]
    off = (dmf[:, None] * mn)[..., None]
    xs = x.reshape(B, 8, 32)
    q = np.where(step > 0, np.clip(np.rint((xs + off) / np.where(step > 0, step, 1)), 0, nmax), 0)
    return d, dmin, sc.astype(np.uint8), mn.astype(np.uint8), q.astype(np.uint8)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block -> the 12 bytes of Q4_K / Q5_K: bytes 0-3 scales 0-3 (high bits of
    scales 4-7 in bits 6-7), 4-7 mins 0-3 (high bits of mins 4-7), 8-11 low nibbles of scales / mins 4-7."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _q45_k(rows: np.ndarray, bits: int) -> np.ndarray:
    def one(x: np.ndarray) -> np.ndarray:
        N = x.shape[0]
        d, dmin, sc, mn, q = _k_scales(x.reshape(-1, QK_K), (1 << bits) - 1)
        B = q.shape[0]
        parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn)]
        if bits == 5:
            hb = (q >> 4).reshape(B, 8, 32)  # bit i of byte l = the fifth bit of sub-block i, weight l
            parts.append(sum((hb[:, i] << i) for i in range(8)).astype(np.uint8))
        lo = (q & 15).reshape(B, 4, 2, 32)
        parts.append(_nibbles(lo[:, :, 0], lo[:, :, 1]).reshape(B, 128))
        return np.concatenate(parts, axis=1).reshape(N, -1)

    return _chunked(one, rows, QK_K)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """float rows [N, K] (K % 256 == 0) -> Q4_K bytes [N, K/256 * 144]."""
    return _q45_k(rows, 4)


def quantize_q5_k(rows: np.ndarray) -> np.ndarray:
    """float rows [N, K] (K % 256 == 0) -> Q5_K bytes [N, K/256 * 176]."""
    return _q45_k(rows, 5)


def _fit_symmetric(x: np.ndarray) -> np.ndarray:
    """Per row of x [B, 16]: the signed scale s with x ~ s * q, q in [-32, 31]: candidate grids mapping the
    largest-magnitude weight to about -32, each refit by least squares; the least squared error wins."""
    amax = x[np.arange(x.shape[0]), np.abs(x).argmax(1)]
    amax = np.where(amax == 0, 1e-30, amax)
    best_err = np.full(x.shape[0], np.inf, np.float32)
    best = -amax / 32
    for delta in CANDIDATES:
        iscale = -(32 + delta) / amax
        q = np.clip(np.rint(x * iscale[:, None]), -32, 31)
        qq = (q * q).sum(1)
        s = np.where(qq > 0, (q * x).sum(1) / np.maximum(qq, 1e-30), 1.0 / iscale)
        err = ((s[:, None] * q - x) ** 2).sum(1)
        better = err < best_err
        best_err, best = np.where(better, err, best_err), np.where(better, s, best)
    return best.astype(np.float32)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """float rows [N, K] (K % 256 == 0) -> Q6_K bytes [N, K/256 * 210]."""

    def one(x: np.ndarray) -> np.ndarray:
        N = x.shape[0]
        xb = x.reshape(-1, 16, 16)
        B = xb.shape[0]
        s = _fit_symmetric(xb.reshape(B * 16, 16)).reshape(B, 16)
        smax = s[np.arange(B), np.abs(s).argmax(1)]
        d = np.where(smax == 0, 0.0, smax / -128).astype(np.float16)
        df = d.astype(np.float32)
        sc = np.clip(np.rint(s / np.where(df != 0, df, 1)[:, None]), -128, 127)
        step = (df[:, None] * sc)[..., None]
        q = np.where(step != 0, np.clip(np.rint(xb / np.where(step != 0, step, 1)), -32, 31), 0)
        q = (q + 32).astype(np.uint8).reshape(B, 8, 32)  # 0..63; rows of 32 in the order the format interleaves
        lo, hi = q & 15, q >> 4
        lo = lo.reshape(B, 2, 2, 2, 32)  # (half, nibble, 32-row within the half's 64 bytes, weight)
        ql = _nibbles(lo[:, :, 0], lo[:, :, 1]).reshape(B, 128)
        hi = hi.reshape(B, 2, 4, 32)
        qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).astype(np.uint8).reshape(B, 64)
        out = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)
        return out.reshape(N, -1)

    return _chunked(one, rows, QK_K)
