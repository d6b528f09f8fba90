"""3-bit table grids (8 int8 levels, one bf16 scale per group): the IQ3 table, the 12-byte block layout, the
q_linear_codebook3 kernel, GPTQ / RTN onto 8 levels, a 3-bit model's save / load and fused decode."""

import json

import pytest
import torch
from test_quant import _correlated, _kl, tiny64  # noqa: F401 (fixture)
from test_quant_grids import _kernel_reference, _weights, assert_fused_decode_matches

from leanlm import LeanlmError, ops
from leanlm.evaluate.speed import weight_bytes
from leanlm.hardware import Plan
from leanlm.model import load_model
from leanlm.ops import LinearKind
from leanlm.quant import GPTQ, RTN, CodebookLinear, QSpec, QuantLinear, make_config, quantize, rtn, save_quantized
from leanlm.quant.awq import output_error
from leanlm.quant.codebook import (IQ3, LLOYD_MAX_LAPLACE_8, _search_scales_torch, codebook_rtn, derive_iq3,
                                   learn_table, nearest_level, pack_blocks3, search_scales, tile_codes3, tiled3_rows,
                                   unpack_blocks3, untile_codes3)  # fmt: skip
from leanlm.quant.gptq import gptq

native = pytest.mark.skipif(not ops.available(), reason="no C++ compiler for the kernels")
CB3 = QSpec(3, 32, True, "iq3")


def test_bits_per_weight_count_codes_scales_and_padding():
    assert CB3.bits_per_weight(896) == 3.5 and CB3.label() == "cb3-iq3-g32"
    assert QSpec(3, 64, True, "learned").bits_per_weight(4864) == 3.25
    assert QSpec(3, 32, True, "iq3").bits_per_weight(100) == (3 * 128 + 16 * 4) / 100  # a zero-padded last group
    assert QSpec(4, 32, True, "iq4nl").bits_per_weight(896) == 4.5


def test_bad_3bit_settings_raise():
    with pytest.raises(LeanlmError, match="table grids only"):
        QSpec(3, 32, True).validate()
    with pytest.raises(LeanlmError, match="table grids only"):
        make_config("rtn", bits=3, group=32, symmetric=True)
    with pytest.raises(LeanlmError, match="'iq4nl' is a 4-bit table.*'iq3'"):
        QSpec(3, 32, True, "iq4nl").validate()
    with pytest.raises(LeanlmError, match="'iq3' is a 3-bit table"):
        QSpec(4, 32, True, "iq3").validate()
    with pytest.raises(LeanlmError, match="bits=2 is not supported"):
        QSpec(2, 32, True, "learned").validate()
    with pytest.raises(LeanlmError, match="symmetric"):
        QSpec(3, 32, False, "iq3").validate()
    with pytest.raises(LeanlmError, match="group"):
        QSpec(3, 0, True, "learned").validate()
    with pytest.raises(LeanlmError, match="AWQ"):
        make_config("awq", bits=3, group=32, symmetric=True, levels="iq3")
    qw = rtn(_weights(n=8, k=64), CB3)
    with pytest.raises(LeanlmError, match="bits=4 and a table of 8 levels"):
        CodebookLinear(qw.__class__(qw.q, qw.scale, None, QSpec(4, 32, True, "learned"), 64, table=qw.table))
    t, meta = CodebookLinear(qw, backend="none").export()
    with pytest.raises(LeanlmError, match="12-byte blocks"):
        CodebookLinear.from_export({**t, "qweight": t["qweight"][:, :-1]}, meta)


def test_iq3_is_its_derivation_and_beats_plain_lloyd_max():
    """IQ3 is what derive_iq3 gives (the documented derivation), and on heavy-tailed weights it rounds with less
    error than the Lloyd-Max Laplacian levels it starts from; a table learned per tensor does as
    well or better."""
    assert derive_iq3() == IQ3
    half = [round(v * 127 / LLOYD_MAX_LAPLACE_8[-1]) for v in LLOYD_MAX_LAPLACE_8]
    plain = torch.tensor([-v for v in reversed(half)] + half, dtype=torch.float32)
    w = _weights(n=192, k=256, seed=1)
    groups = w.view(192, 8, 32)

    def err(levels):
        d = search_scales(groups, levels).to(torch.bfloat16).float()
        return (groups - d[..., None] * levels[nearest_level(groups / d[..., None], levels)]).square().sum().item()

    e_iq3, e_plain = err(torch.tensor(IQ3, dtype=torch.float32)), err(plain)
    e_learned = err(learn_table(groups, bits=3).float())
    assert e_iq3 < 0.95 * e_plain, (e_iq3, e_plain)
    assert e_learned < 1.02 * e_iq3, (e_learned, e_iq3)


def test_learned_3bit_table_is_sorted_distinct_int8():
    t = learn_table(_weights().view(96, 4, 64), bits=3)
    assert t.dtype == torch.int8 and t.numel() == 8
    assert (t[1:] > t[:-1]).all() and int(t.abs().max()) == 127


def test_block3_layout_bits_and_roundtrip():
    q = torch.randint(0, 8, (5, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    p = pack_blocks3(q)
    assert p.shape == (5, 36) and torch.equal(unpack_blocks3(p), q)
    one = torch.zeros(1, 32, dtype=torch.uint8)
    one[0, 19] = 6  # low bits 2 (column 19 = 8 * 2 + 3: byte 3, bits 4..5), high bit 1 (column 19: bit 19)
    p = pack_blocks3(one)[0]
    assert p[3] == 2 << 4 and int.from_bytes(bytes(p[8:].tolist()), "little") == 1 << 19
    assert int(p.sum()) == (2 << 4) + (1 << 3)


def test_tiled_3bit_layout_bits_rows_and_roundtrip():
    q = torch.randint(0, 8, (37, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    t = tile_codes3(q)
    assert t.shape == (3, 2 * 192) and torch.equal(untile_codes3(t, 64)[:37], q)
    ids = torch.tensor([36, 0, 17, 15])
    assert torch.equal(tiled3_rows(t, 64, ids), q[ids])
    one = torch.zeros(20, 64, dtype=torch.uint8)
    one[18, 32 + 21] = 5  # tile 1, row 2, block 1, column 21 = 16 + 4 * 1 + 1: low 1 at bits 2..3 of byte 4 * 2 + 1 of
    t = tile_codes3(one)  # the second low plane, high 1 at bit 5 (21 = 4 * 5 + 1) of byte 9 of the high plane
    block = t[1, 192:]
    assert block[64 + 9] == 1 << 2 and block[128 + 9] == 1 << 5 and int(t.sum()) == (1 << 2) + (1 << 5)
    if ops.available():  # the module's rows of its tiles: the codes it was given
        qw = rtn(_weights(n=37, k=64), CB3)
        m = CodebookLinear(qw, backend="native")
        assert torch.equal(m.codes(14, 33), qw.q[14:33]) and torch.equal(m.codes(), qw.q)
        assert torch.equal(m.rows(ids), qw.dequantize()[ids])
        assert torch.equal(m.dequantize_rows(30, 37), qw.dequantize()[30:])


@pytest.mark.parametrize("levels", [IQ3, (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)])
@pytest.mark.parametrize("weighted", [False, True])
def test_scale_search_native_matches_torch_reference(levels, weighted):
    """The native search (any table of 2..16 levels) picks the torch reference's scales."""
    if not ops.available():
        pytest.skip("no C++ compiler for the kernels")
    w = _weights(n=64, k=256, seed=3)
    groups, lv = w.view(64, 8, 32), torch.tensor(levels, dtype=torch.float32)
    imp = torch.rand(8, 32, generator=torch.Generator().manual_seed(4)) + 0.1 if weighted else None
    fast, ref = search_scales(groups, lv, imp), _search_scales_torch(groups, lv, imp, 7)
    assert torch.allclose(fast, ref, rtol=1e-4)


def test_gptq_on_a_3bit_table_beats_3bit_rtn():
    x = _correlated(k=256)
    H = x.t() @ x / x.shape[0]
    w = _weights()
    for spec in (CB3, QSpec(3, 64, True, "learned")):
        e_rtn = output_error(w - codebook_rtn(w, spec, H.diagonal()).dequantize(), H)
        for act_order in (False, True):
            qw = gptq(w, H, spec, act_order=act_order)
            assert qw.table is not None and qw.table.numel() == 8 and qw.q.max() <= 7 and qw.zero is None
            assert output_error(w - qw.dequantize(), H) < 0.8 * e_rtn, (spec, act_order)


@native
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("levels", ["iq3", "learned"])
def test_3bit_kernel_matches_its_integer_arithmetic(group, levels):
    w = _weights(n=52, k=320 if group <= 64 else 512)
    m = CodebookLinear(rtn(w, QSpec(3, group, True, levels)))
    assert m.backend == "native" and m.layout == "tiles3" and m.qweight.shape == (4, w.shape[1] // 32 * 192)  # 52 rows
    x = torch.randn(11, w.shape[1], generator=torch.Generator().manual_seed(group)) * 0.5
    x[:, 3] = 9.0  # an outlier input: the activation scale of its group
    y = m(x)
    ref = _kernel_reference(x, m)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    exact = x @ m.dequantize().t()  # the activation rounding stays small
    assert (y - exact).abs().max() < 0.03 * exact.abs().max()


@native
def test_3bit_kernel_refuses_a_table_of_the_wrong_size():
    """(Batch invariance and the two ISA copies: tests/test_quant_grids.py, parametrized over 4 and 3 bits.)"""
    m = CodebookLinear(rtn(_weights(n=40, k=192), QSpec(3, 64, True, "iq3")))
    x = torch.randn(16, 192)
    with pytest.raises(RuntimeError, match="8 int8 values"):
        ops.q_linear_codebook3(x, m.qweight, m.scales, torch.zeros(16, dtype=torch.int8), m.kgroup)


def test_3bit_linear_without_kernel_and_export_roundtrip():
    w = _weights(n=24, k=100)  # a short last group: stored zero-padded
    qw = rtn(w, QSpec(3, 32, True, "learned"))
    plain = CodebookLinear(qw, backend="none")
    assert plain.backend == "none" and torch.equal(plain.dequantize(), qw.dequantize())
    x = torch.randn(3, 100)
    assert torch.allclose(plain(x), x @ qw.dequantize().t(), atol=1e-5)
    t, meta = plain.export()
    assert meta["bits"] == 3 and t["table"].numel() == 8 and t["qweight"].shape == (24, 128 * 3 // 8)
    again = CodebookLinear.from_export(t, meta)
    assert torch.equal(again.dequantize(), qw.dequantize())
    assert torch.equal(again.rows(torch.tensor([5, 0])), qw.dequantize()[[5, 0]])


@pytest.mark.parametrize("cfg", [RTN(bits=3, group=32, symmetric=True, levels="iq3"),
                                 GPTQ(bits=3, group=32, symmetric=True, levels="learned", act_order=True)])  # fmt: skip
def test_3bit_model_save_load_and_fused_decode(tiny64, tmp_path, word_tokenizer, cfg):  # noqa: F811
    base = load_model(tiny64["llama"])
    x = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(3))
    calib = torch.randint(0, 97, (6, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = base(x)
    model = quantize(load_model(tiny64["llama"]), cfg, calib, progress=False)
    down = model.layers[0].mlp.w_down
    assert isinstance(down, CodebookLinear) and down.spec.bits == 3 and down.table.numel() == 8
    assert isinstance(model.lm_head, QuantLinear)  # the head stays uniform int8
    assert model.quantization["layers"]["layers.0.mlp.w_down"]["bits"] == 3
    assert model.quantization["bits_per_weight"] == pytest.approx(3.5)
    with torch.inference_mode():
        out = model(x)
    assert _kl(ref, out) < 0.5
    path = save_quantized(model, word_tokenizer, tmp_path / cfg.levels)
    layer = json.loads((path / "config.json").read_text())["leanlm_quant"]["layers"]["layers.1.attn.wqkv"]
    assert layer["bits"] == 3 and layer["levels"] == cfg.levels
    again = load_model(path, dtype="bfloat16")
    assert isinstance(again.layers[1].attn.wqkv, CodebookLinear) and weight_bytes(again) == weight_bytes(model)
    with torch.inference_mode():
        assert torch.equal(again(x), out)
    if not ops.available():
        return
    args = again.layers[0].attn.wqkv.fused_linear_args(torch.float32, 1)
    assert args.kind is LinearKind.CODEBOOK and args.bits == 3 and args.zeros.numel() == 8
    # decode: every block runs as one C++ call (the 3-bit kernel inside) and gives the module-by-module logits
    assert_fused_decode_matches(load_model(path, dtype="float32"), x)  # (fp32 glue: the paths round bf16 differently)


def test_3bit_config_prices_3bit_weights():
    plan = Plan()
    GPTQ(bits=3, group=32, symmetric=True, levels="iq3").price(plan)
    assert plan.validate().weight_dtype == "int3"
