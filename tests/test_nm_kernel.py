"""2:4 sparse int8 storage (leanlm.quant.nm) and its decode kernel (csrc/qlinear_nm.cpp)."""

import copy

import pytest
import torch

from conftest import decode_logits

from leanlm import ops
from leanlm.errors import LeanlmError
from leanlm.quant.nm import NMInt8, NMInt8Linear, nm_split, tile_nm, untile_nm

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C++ compiler for the native kernels")


def _nm_values(N, K, seed=0, fewer=True):
    """int8 values [N, K] with at most 2 non-zeros per group of 4 (some groups with 0 or 1 when `fewer`)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int16)
    keep = torch.rand(N, K // 4, 4, generator=g).argsort(-1).argsort(-1) < 2  # 2 random positions of 4
    if fewer:
        keep &= torch.rand(N, K // 4, 4, generator=g) > 0.1
    return (v.view(N, K // 4, 4) * keep).view(N, K).to(torch.int8)


def _dense_reference(x, values, scales, group):
    """The kernel's numerics in plain torch: x quantized per block of 32 (amax / 127, round half even), exact
    integer dot products per block, then sum_b ia * sx (per group) times the scale."""
    M, K = x.shape
    N, Kp = values.shape
    xp = torch.nn.functional.pad(x.float(), (0, Kp - K)).view(M, Kp // 32, 32)
    amax = xp.abs().amax(-1, keepdim=True)
    q = torch.where(amax > 0, torch.round(xp * (127.0 / amax)), torch.zeros_like(xp)).to(torch.int64)
    ia = torch.einsum("mbk,nbk->mnb", q, values.to(torch.int64).view(N, Kp // 32, 32))  # exact int64
    part = ia.double() * (amax.squeeze(-1).double() / 127.0)[:, None, :]
    per_group = part.view(M, N, -1, group // 32).sum(-1)
    return (per_group * scales.double()[None]).sum(-1), ia


def test_layout_round_trip_and_bytes():
    v = _nm_values(37, 96)
    t = tile_nm(v)
    assert t.shape == (3, 96 // 8 * 80)  # 3 tiles of 16 rows, 5 bytes per 8 weights
    assert t.numel() / (48 * 96) == 0.625
    assert torch.equal(untile_nm(t, 96)[:37], v) and not untile_nm(t, 96)[37:].any()
    vals, codes = nm_split(v)
    assert vals.shape == (37, 48) and int(codes.max()) <= 5


@pytest.mark.parametrize("vnni", [True, False])
@pytest.mark.parametrize("N,K,group", [(16, 32, 32), (37, 96, 96), (130, 256, 64), (7, 64, 64)])
def test_kernel_equals_reference_for_1_to_16_rows(vnni, N, K, group):
    v = _nm_values(N, K, seed=N + K)
    G = K // group
    scales = (torch.rand(N, G, generator=torch.Generator().manual_seed(1)) * 0.01 + 1e-3).to(torch.bfloat16)
    w = tile_nm(v)
    before = ops.set_q_linear_nm_vnni(vnni)
    try:
        for M in range(1, 17):
            x = torch.randn(M, K - 3, generator=torch.Generator().manual_seed(M))  # K < padded K: zero tail
            y = ops.q_linear_nm(x, w, scales, group)
            ref, _ = _dense_reference(x, v, scales.float(), group)
            assert y.shape == (M, N)
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
            # rows are independent: a k-row call equals k one-row calls bit for bit
            if M in (3, 16):
                one = torch.cat([ops.q_linear_nm(x[i : i + 1], w, scales, group) for i in range(M)])
                assert torch.equal(one, y)
    finally:
        ops.set_q_linear_nm_vnni(before)


@pytest.mark.parametrize("vnni", [True, False])
def test_kernel_equals_dense_int8_kernel_bit_for_bit(vnni):
    """On the same codes (pruned ones stored as zeros), q_linear_nm == q_linear int8, both copies."""
    from leanlm.quant.packed import tile_codes

    N, K = 48, 128
    v = _nm_values(N, K, seed=3)
    scales = (torch.rand(N, 1) * 0.02 + 1e-3).to(torch.bfloat16)
    x = torch.randn(5, K)
    b1, b2 = ops.set_q_linear_nm_vnni(vnni), ops.native.extension().set_q_linear_vnni(vnni)
    try:
        y = ops.q_linear_nm(x, tile_nm(v), scales, K)
        d = ops.q_linear(x, tile_codes(v, 8, 0), scales, None, 8, K)
    finally:
        ops.set_q_linear_nm_vnni(b1)
        ops.native.extension().set_q_linear_vnni(b2)
    assert torch.equal(y, d)


def test_not_2_4_names_the_fix():
    v = _nm_values(16, 64)
    v[3, 4:7] = 5  # three non-zeros in one group
    with pytest.raises(LeanlmError, match="not 2:4.*prune --pattern 2:4"):
        tile_nm(v, "layers.0.mlp.w_down")
    lin = torch.nn.Linear(64, 16)
    with pytest.raises(LeanlmError, match="not 2:4"):
        NMInt8Linear.from_linear(lin)
    with pytest.raises(LeanlmError, match="2:4 pattern only"):
        NMInt8(pattern="4:8")


def test_module_forward_small_and_many_rows():
    """NMInt8Linear from a pruned float Linear: the kernel (<= 16 rows) and the dequantized path (more rows)
    agree, and both stay within int8 rounding of the float layer."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(72, 40)
    with torch.no_grad():
        w = lin.weight.view(40, 18, 4)
        keep = w.abs().argsort(-1).argsort(-1) >= 2
        lin.weight.copy_((w * keep).view(40, 72))
    m = NMInt8Linear.from_linear(lin)
    assert m.stored_in == 96 and m.qweight.numel() == 48 * 96 * 5 // 8
    x = torch.randn(80, 72)
    with torch.no_grad():
        ref = lin(x)
        y_small = m(x[:4])
        y_mid = m(x[:20])  # kernel, 16 rows per call
        y_many = m(x)  # dequantized
    assert torch.equal(y_mid[:4], y_small)
    assert (y_small - y_many[:4]).abs().max() < 2e-2 * ref.abs().max()
    assert (y_many - ref).abs().max() < 2e-2 * ref.abs().max()
    assert torch.allclose(m.dequantize()[lin.weight == 0], torch.zeros(()))




def test_tiny_model_decode_equals_dense_int8(tiny_dirs, monkeypatch, tmp_path):
    """Prune 2:4, RTN int8 per channel, then NMInt8: decode logits equal the dense int8 model's bit for bit
    (fused whole-block step and per-module path); NMInt8 of the float pruned model matches too."""
    import leanlm
    from leanlm.model import load_model
    from leanlm.prune import Unstructured, prune_unstructured
    from leanlm.quant import RTN, quantize

    model = load_model(tiny_dirs["llama"])
    prune_unstructured(model, Unstructured("magnitude", pattern="2:4"), None, progress=False)
    pruned_float = copy.deepcopy(model)
    quantize(model, RTN(bits=8, group=0, symmetric=True, dtype="float32"), progress=False)
    nm = copy.deepcopy(model)
    result = leanlm.apply(nm, NMInt8())
    assert result["bytes_after"] < 0.7 * result["bytes_before"]
    assert isinstance(nm.layers[0].mlp.w_down, NMInt8Linear)
    calls, decode_layer = [], ops.decode_layer
    monkeypatch.setattr(ops, "decode_layer", lambda *a: calls.append(1) or decode_layer(*a))
    tokens = torch.randint(0, 97, (1, 13), generator=torch.Generator().manual_seed(2))
    dense = decode_logits(model, tokens, True, prompt=5)
    n = len(calls)
    fused = decode_logits(nm, tokens, True, prompt=5)
    assert len(calls) - n == 9 * len(nm.layers)  # prefill (5 rows) + 8 steps, every block in one C++ call
    assert torch.equal(fused, dense)
    assert torch.equal(decode_logits(nm, tokens, False, prompt=5), decode_logits(model, tokens, False, prompt=5))
    # from the float pruned model (RTN inside): the codes and scales of RTN int8 per channel
    leanlm.apply(pruned_float, NMInt8())
    for a, b in zip(pruned_float.layers, nm.layers):
        for x, y in ((a.attn.wqkv, b.attn.wqkv), (a.mlp.w_down, b.mlp.w_down)):
            assert torch.equal(x.qweight, y.qweight) and torch.equal(x.scales, y.scales)
    with pytest.raises(LeanlmError, match="not saved yet"):  # no silent dense or broken file
        leanlm.save(nm, None, tmp_path / "nm")
    # a model that is not 2:4 is refused with the fix
    with pytest.raises(LeanlmError, match="prune --pattern 2:4"):
        leanlm.apply(load_model(tiny_dirs["llama"]), NMInt8())
