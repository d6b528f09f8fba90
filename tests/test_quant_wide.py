"""5-bit and 6-bit signed integer grids (leanlm.quant.wide): the file and tile layouts, and the q_linear_wide kernel
(both ISA copies, batch invariance). The fused decode step over 5- and 6-bit CodebookLinears: tests/test_quant_grids.py
(the model test, levels "signed")."""

import pytest
import torch

from leanlm import LeanlmError, ops
from leanlm.quant.packed import pack_int4
from leanlm.quant.wide import (dequantize_wide, mid_code, pack_wide, tile_codes_wide, tiled_wide_rows, unpack_wide,
                               untile_codes_wide)  # fmt: skip

native = pytest.mark.skipif(not ops.available(), reason="no C++ compiler for the kernels")


def _codes(n, k, bits, seed=0):
    return torch.randint(0, 1 << bits, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _rtn(w: torch.Tensor, bits: int, group: int):
    """Round-to-nearest onto the signed grid: codes [N, K] and bf16 scales [N, K / group] (absmax to level mid - 1)."""
    N, K = w.shape
    mid = mid_code(bits)
    s = (w.view(N, K // group, group).abs().amax(-1) / (mid - 1)).clamp_min(1e-8).bfloat16()
    q = torch.round(w.view(N, K // group, group) / s.float()[..., None]) + mid
    return q.clamp(0, 2 * mid - 1).to(torch.uint8).view(N, K), s


def _reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """The kernel's arithmetic in float64: x rounded to int8 per block of 32 columns (x * (127 / amax) in float32, as
    the kernel rounds it), exact integer products with the signed levels, scaled per block and group."""
    N, Kp = q.shape
    xp = torch.nn.functional.pad(x.float(), (0, Kp - x.shape[1])).view(x.shape[0], -1, 32)
    amax = xp.abs().amax(-1)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, 0.0)
    qx = torch.round(xp * inv[..., None]).double()
    levels = (q.double() - mid_code(bits)).view(N, -1, 32)
    dots = torch.einsum("mbk,nbk->mnb", qx, levels) * (amax / 127).double()[:, None, :]
    return (dots * s.double().repeat_interleave(Kp // s.shape[1] // 32, dim=1)[None]).sum(-1)


@pytest.mark.parametrize("bits", [5, 6])
def test_pack_and_tile_round_trips(bits):
    for n, k in [(1, 32), (37, 96), (16, 256), (50, 8 * 4)]:
        q = _codes(n, k, bits, seed=n + k)
        p = pack_wide(q, bits)
        assert p.shape == (n, k * bits // 8) and torch.equal(unpack_wide(p, bits), q)
        assert torch.equal(p[:, : k // 2], pack_int4(q & 15))  # the low nibbles first, pack_int4's bytes
        t = tile_codes_wide(q, bits)
        tiles = -(-n // 16)
        assert t.shape == (tiles, k // 32 * (320 if bits == 5 else 384))
        full = untile_codes_wide(t, bits, k)
        assert full.shape == (tiles * 16, k) and torch.equal(full[:n], q)
        assert bool((full[n:] == mid_code(bits)).all())  # padding rows: level 0
        ids = torch.tensor([n - 1, 0, n // 2])
        assert torch.equal(tiled_wide_rows(t, bits, k, ids), q[ids])


def test_tile_layout_bytes_match_the_kernel_comment():
    """A few bytes of the documented layout, computed by hand (a layout that only round-trips could still be one the
    kernel does not read)."""
    q = torch.zeros(16, 32, dtype=torch.uint8)
    q[3, 6] = 0b10110  # 5 bits: column 6 = step 1, c 2 -> lane 1, byte 4 * 3 + 2
    q[3, 21] = 0b11010  # column 20 + 1: bits 0..2 (010) to lane 0's top, bits 3..4 (11) to lane 1's bits 5..6
    q[5, 30] = 0b11101  # column 28 + 2: bits 0..2 to lane 4's top, bit 3 (1) to lane 1's bit 7, bit 4 (1) to lane 3's
    t = tile_codes_wide(q, 5).view(5, 64)
    assert t[1, 14] == 0b10110 and t[0, 13] == 0b010 << 5 and t[1, 13] == 0b11 << 5
    assert t[4, 22] == 0b101 << 5 and t[1, 22] == 0x80 and t[3, 22] == 0x80
    q6 = torch.zeros(16, 32, dtype=torch.uint8)
    q6[2, 16 + 4 + 1] = 45  # 6 bits: half 1, lane 3 + 1, byte 4 * 2 + 1
    q6[2, 16 + 12 + 1] = 0b100111  # column 16p + 12 + c: bits 2L..2L+1 to the top of lane 3p + L
    t6 = tile_codes_wide(q6, 6).view(6, 64)
    assert t6[4, 9] == 45 | (0b01 << 6) and t6[3, 9] == 0b11 << 6 and t6[5, 9] == 0b10 << 6


def test_bad_wide_input_raises():
    with pytest.raises(LeanlmError, match="bits 5 or 6"):
        pack_wide(_codes(2, 32, 4), 4)
    with pytest.raises(LeanlmError, match="multiple of 32"):
        tile_codes_wide(_codes(2, 40, 5), 5)
    with pytest.raises(LeanlmError, match="damaged"):
        unpack_wide(torch.zeros(2, 21, dtype=torch.uint8), 5)


def _vnni_copy(allowed: bool, fn):
    before = ops.set_q_linear_wide_vnni(allowed)
    try:
        return fn()
    finally:
        ops.set_q_linear_wide_vnni(before)


@native
@pytest.mark.parametrize("bits", [5, 6])
@pytest.mark.parametrize("group", [32, 128])
def test_wide_kernel_matches_its_integer_arithmetic(bits, group):
    g = torch.Generator().manual_seed(bits * group)
    n, k = 52, 512  # 4 tiles, the last one padded
    w = torch.randn(n, k, generator=g) * 0.02
    q, s = _rtn(w, bits, group)
    t = tile_codes_wide(q, bits)
    x = torch.randn(16, k - 7, generator=g)  # K below the stored width: zero-padded
    x[:, 3] = 9.0  # an outlier input: its block's activation scale
    ys = {}
    for vnni in (False, True):
        ys[vnni] = _vnni_copy(vnni, lambda: ops.q_linear_wide(x, t, s, bits, group))
    assert torch.equal(ys[False], ys[True])  # AVX2 and VNNI copies (the same copy twice where the CPU lacks VNNI)
    y = ys[True]
    ref = _reference(x, q, s, bits)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    exact = torch.nn.functional.pad(x, (0, 7)) @ dequantize_wide(q, s, bits).t()  # the activation rounding is small
    assert (y - exact).abs().max() < 0.02 * exact.abs().max()
    for rows in range(1, 16):  # any row count, and a k-row call equals k one-row calls bit for bit
        assert torch.equal(_vnni_copy(True, lambda: ops.q_linear_wide(x[:rows], t, s, bits, group)), y[:rows])
        assert torch.equal(_vnni_copy(False, lambda: ops.q_linear_wide(x[rows : rows + 1], t, s, bits, group)),
                           y[rows : rows + 1])  # fmt: skip


@native
def test_wide_kernel_rejects_bad_arguments():
    q, s = _rtn(torch.randn(16, 64), 5, 32)
    t = tile_codes_wide(q, 5)
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="bits must be 5 or 6"):
        ops.q_linear_wide(x, t, s, 4, 32)
    with pytest.raises(RuntimeError, match="does not match"):
        ops.q_linear_wide(x, t, s, 6, 32)  # 5-bit tiles read as 6-bit ones
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        ops.q_linear_wide(torch.randn(17, 64), t, s, 5, 32)
