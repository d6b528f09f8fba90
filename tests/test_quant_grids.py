"""Grids beyond uniform per-channel: 4-bit tables (quant/codebook.py, csrc/qlinear_codebook.cpp) and group-wise int8."""

import json

import pytest
import torch
from test_quant import _correlated, _kl, tiny64  # noqa: F401 (fixture)

from leanlm import LeanlmError, ops
from leanlm.evaluate.speed import weight_bytes
from leanlm.model import load_model
from leanlm.quant import GPTQ, RTN, CodebookLinear, QSpec, QuantLinear, make_config, quantize, rtn, save_quantized
from leanlm.quant.awq import output_error
from leanlm.quant.codebook import IQ4NL, codebook_rtn, learn_table, search_scales
from leanlm.quant.gptq import gptq
from leanlm.quant.pipeline import average_bits, head_spec

native = pytest.mark.skipif(not ops.available(), reason="no C++ compiler for the kernels")
CB64 = QSpec(4, 64, True, "iq4nl")


def _weights(n=96, k=256, seed=0):
    """Heavy-tailed rows (Student-t like), as real weights are: where a table beats even levels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02 / (0.5 + torch.rand(n, k, generator=g))


def _kernel_reference(x: torch.Tensor, m: CodebookLinear) -> torch.Tensor:
    """The kernel's arithmetic in float64: x rounded to int8 per block of min(group, 64) columns (amax / 127; the
    rounding itself in float32 as the kernel does it, x * (127 / amax), so ties land alike), integer products with
    the table, scaled per block and group."""
    q = m.codes()
    G, g = m.scales.shape[1], m.kgroup
    a = min(g, 64)
    xp = torch.nn.functional.pad(x.float(), (0, m.stored_in - x.shape[1])).view(x.shape[0], -1, a)
    amax = xp.abs().amax(-1)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, 0.0)  # (127 / amax would take 1 / amax first)
    qx = torch.round(xp * inv[..., None]).double()
    d = (amax / 127).double()
    wt = m.table.double()[q.long()].view(q.shape[0], -1, a)
    dots = torch.einsum("mak,nak->mna", qx, wt) * d[:, None, :]
    scale = m.scales.double().repeat_interleave(g // a, dim=1)
    return (dots * scale[None]).sum(-1)


def test_table_rtn_beats_uniform_at_equal_bits():
    """iq4nl g64 and a learned table store 4.25 bits/weight like uniform asymmetric g128, with less error; the
    least-squares scale search beats the plain absmax scale."""
    w = _weights()
    assert CB64.bits_per_weight(256) == QSpec(4, 128, False).bits_per_weight(256) == 4.25
    err = {s.label(): (w - rtn(w, s).dequantize()).square().mean().item()
           for s in (QSpec(4, 128, False), QSpec(4, 64, True), CB64, QSpec(4, 64, True, "learned"))}  # fmt: skip
    assert err["cb4-iq4nl-g64"] < 0.8 * err["int4-g128-asym"], err
    assert err["cb4-learned-g64"] < 1.02 * err["cb4-iq4nl-g64"], err
    groups = w.view(96, 4, 64)
    levels = torch.tensor(IQ4NL, dtype=torch.float32)
    m = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0]
    absmax = m / -127.0  # the largest-magnitude weight on the table's far end: one of the searched candidates
    best = search_scales(groups, levels)

    def err_of(d):
        v = levels[torch.bucketize(groups / d[..., None], (levels[1:] + levels[:-1]) / 2)]
        return (groups - d[..., None] * v).square().sum(-1)

    assert (err_of(best) <= err_of(absmax) + 1e-12).all()
    assert err_of(best).sum() < 0.95 * err_of(absmax).sum()


def test_learned_table_is_sorted_distinct_int8():
    t = learn_table(_weights().view(96, 4, 64))
    assert t.dtype == torch.int8 and t.numel() == 16
    assert (t[1:] > t[:-1]).all() and int(t.abs().max()) == 127


def test_gptq_on_a_table_grid_beats_table_rtn():
    x = _correlated(k=256)
    H = x.t() @ x / x.shape[0]
    w = _weights()
    for spec in (CB64, QSpec(4, 32, True, "learned")):
        e_rtn = output_error(w - codebook_rtn(w, spec, H.diagonal()).dequantize(), H)
        for act_order in (False, True):
            qw = gptq(w, H, spec, act_order=act_order)
            assert qw.table is not None and qw.q.max() <= 15 and qw.zero is None
            assert output_error(w - qw.dequantize(), H) < 0.8 * e_rtn, (spec, act_order)


@native
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("levels", ["iq4nl", "learned"])
def test_codebook_kernel_matches_its_integer_arithmetic(group, levels):
    w = _weights(n=52, k=320 if group <= 64 else 512)
    m = CodebookLinear(rtn(w, QSpec(4, group, True, levels)))
    assert m.backend == "native"
    x = torch.randn(11, w.shape[1]) * 0.5
    x[:, 3] = 9.0  # an outlier input: the activation scale of its group
    y = m(x)
    ref = _kernel_reference(x, m)
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    exact = x @ m.dequantize().t()  # the activation rounding stays small
    assert (y - exact).abs().max() < 0.03 * exact.abs().max()


@native
@pytest.mark.parametrize("spec", [CB64, QSpec(3, 64, True, "iq3")], ids=["4bit", "3bit"])
def test_codebook_kernel_rows_batch_invariant_and_vnni_paths_equal(spec):
    """The 4-bit and 3-bit table kernels: a k-row call equals k one-row calls, the AVX2 copy equals the VNNI one, and
    kernel_all_rows runs more than 16 rows 16 per call."""
    w = _weights(n=40, k=192)
    m = CodebookLinear(rtn(w, spec))
    x = torch.randn(16, 192)
    batch = m(x)
    rows = torch.cat([m(x[i : i + 1]) for i in range(16)])
    assert torch.equal(batch, rows)
    lib = ops._lib()
    before = lib.set_q_linear_codebook_vnni(False)
    try:
        portable = m(x)
    finally:
        lib.set_q_linear_codebook_vnni(before)
    assert torch.equal(portable, batch)
    CodebookLinear.kernel_all_rows = True  # more than 16 rows: 16 per kernel call
    try:
        x40 = torch.randn(40, 192)
        chunked = m(x40)
    finally:
        CodebookLinear.kernel_all_rows = False
    assert torch.equal(chunked[16:32], m(x40[16:32]))
    assert not torch.equal(chunked, m(x40))  # the default: dequantize + fp32 GEMM


@native
@pytest.mark.parametrize("group,levels", [(32, "iq4nl"), (64, "learned"), (128, "iq4nl")])
def test_tiled_4bit_kernel_odd_rows_every_batch_both_copies(group, levels):
    """37 output rows (the last tile of 16 padded), K = 320 (a multiple of 32; short of the padded width at g128),
    1..16 activation rows on each copy of the kernel (VNNI + VBMI, VNNI, where the CPU has them, and AVX2): the
    integer reference and the dequantized product agree, the copies are equal bit for bit, and a k-row call equals
    the first k rows of a 16-row call."""
    w = _weights(n=37, k=320, seed=group)
    qw = rtn(w, QSpec(4, group, True, levels))
    m = CodebookLinear(qw)
    Kp = m.stored_in
    assert m.layout == "tiles4" and m.qweight.shape == (3, 16 * Kp // 2)  # 37 rows -> 3 tiles
    assert torch.equal(m.codes(), qw.q) and torch.equal(m.codes(14, 33), qw.q[14:33])
    ids = torch.tensor([36, 0, 17, 15])
    assert torch.equal(m.rows(ids), qw.dequantize()[ids])
    x = torch.randn(16, 320, generator=torch.Generator().manual_seed(1)) * 0.5
    x[:, 5] = -7.0  # an outlier input
    lib, out = ops._lib(), {}
    for copy, (vnni, vbmi) in {"vbmi": (True, True), "vnni": (True, False), "avx2": (False, False)}.items():
        before = lib.set_q_linear_codebook_vnni(vnni), lib.set_q_linear_codebook_vbmi(vbmi)
        try:
            out[copy] = [m(x[:rows]) for rows in range(1, 17)]
        finally:
            lib.set_q_linear_codebook_vnni(before[0])
            lib.set_q_linear_codebook_vbmi(before[1])
    exact = x @ qw.dequantize().t()  # the weights as quantized, not read back through the module's tiles
    for rows in range(1, 17):
        y = out["vbmi"][rows - 1]
        ref = _kernel_reference(x[:rows], m)
        assert y.shape == (rows, 37)
        assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), rows
        assert (y - exact[:rows]).abs().max() < 0.03 * exact.abs().max(), rows
        assert torch.equal(out["vnni"][rows - 1], y) and torch.equal(out["avx2"][rows - 1], y), rows
        assert torch.equal(y, out["vbmi"][15][:rows]), rows


def test_codebook_linear_without_kernel_and_export_roundtrip():
    w = _weights(n=24, k=100)  # a short last group: stored zero-padded
    qw = rtn(w, QSpec(4, 32, True, "learned"))
    plain = CodebookLinear(qw, backend="none")
    assert plain.backend == "none" and torch.equal(plain.dequantize(), qw.dequantize())
    x = torch.randn(3, 100)
    assert torch.allclose(plain(x), x @ qw.dequantize().t(), atol=1e-5)
    t, meta = plain.export()
    assert meta["levels"] == "learned" and t["table"].dtype == torch.int8
    again = CodebookLinear.from_export(t, meta)
    assert torch.equal(again.dequantize(), qw.dequantize())
    assert torch.equal(again.rows(torch.tensor([5, 0])), qw.dequantize()[[5, 0]])


@pytest.mark.parametrize("cfg", [RTN(bits=4, group=32, symmetric=True, levels="iq4nl"),
                                 GPTQ(bits=4, group=32, symmetric=True, levels="learned", act_order=True),
                                 GPTQ(bits=5, group=32, symmetric=True, levels="signed", act_order=True),
                                 RTN(bits=6, group=32, symmetric=True, levels="signed")])  # fmt: skip
def test_quantize_model_with_a_table_grid_save_load_and_fused_decode(tiny64, tmp_path, word_tokenizer, cfg):  # noqa: F811
    base = load_model(tiny64["llama"])
    x = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(3))
    calib = torch.randint(0, 97, (6, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = base(x)
    model = quantize(load_model(tiny64["llama"]), cfg, calib, progress=False)
    assert isinstance(model.layers[0].mlp.w_down, CodebookLinear) and model.layers[0].mlp.w_down.backend == (
        "native" if ops.available() else "none")
    assert isinstance(model.lm_head, QuantLinear)  # the head stays uniform int8
    assert model.quantization["layers"]["layers.0.mlp.w_down"]["levels"] == cfg.levels
    assert model.quantization["bits_per_weight"] == pytest.approx(cfg.bits + 0.5)  # codes and a bf16 scale per 32
    with torch.inference_mode():
        out = model(x)
    assert _kl(ref, out) < 0.2
    path = save_quantized(model, word_tokenizer, tmp_path / f"{cfg.levels}{cfg.bits}")
    assert json.loads((path / "config.json").read_text())["leanlm_quant"]["layers"]["layers.1.attn.wqkv"]["levels"]
    again = load_model(path, dtype="bfloat16")
    assert isinstance(again.layers[1].attn.wqkv, CodebookLinear) and weight_bytes(again) == weight_bytes(model)
    with torch.inference_mode():
        assert torch.equal(again(x), out)
    if not ops.available():
        return
    # decode: every block runs as one C++ call (the codebook kernel inside) and gives the module-by-module logits
    assert_fused_decode_matches(load_model(path, dtype="float32"), x)  # (fp32 glue: the paths round bf16 differently)


def assert_fused_decode_matches(model, x: torch.Tensor) -> None:
    """A 6-token prefill and 6 decode steps with the fused decode step and module by module: every block of the fused
    run goes through ops.decode_layer, and the logits agree. The two paths' glue rounds alike to ~1e-7, but the
    kernels' int8 activation rounding turns a last-bit difference at a rounding tie into one code step, and a tiny
    random model carries that into the later steps' cache (about a third of the prompts show a 1-3% step somewhere):
    the prefill is compared tightly, the steps to 5% (a wrong layout or kernel is off by 100%)."""
    calls, decode_layer = [], ops.decode_layer

    def counting(*args):
        calls.append(1)
        return decode_layer(*args)

    steps = {}
    for on in (True, False):
        model.fused_decode = on
        model.setup_cache(1, 32)
        with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
            mp.setattr(ops, "decode_layer", counting)
            steps[on] = [model(x[:, :6], 0)] + [model(x[:, p : p + 1], p) for p in range(6, 12)]
        model.clear_cache()
    assert len(calls) == 7 * len(model.layers)  # the 6-token prefill and 6 steps, fused runs only
    err = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
           for a, b in zip(steps[True], steps[False])]  # fmt: skip
    assert err[0] <= 1e-4 and max(err) <= 0.05, err


def test_table_grid_bad_settings():
    with pytest.raises(LeanlmError, match="symmetric"):
        make_config("rtn", bits=4, group=64, levels="iq4nl")  # asymmetric by default
    with pytest.raises(LeanlmError, match="4-bit table"):
        make_config("rtn", bits=8, group=64, symmetric=True, levels="iq4nl")
    with pytest.raises(LeanlmError, match="group"):
        make_config("rtn", bits=4, group=0, symmetric=True, levels="learned")
    with pytest.raises(LeanlmError, match="not supported"):
        make_config("rtn", bits=4, group=64, symmetric=True, levels="nf5")
    with pytest.raises(LeanlmError, match="AWQ"):
        make_config("awq", bits=4, group=64, symmetric=True, levels="iq4nl")
    with pytest.raises(LeanlmError, match="levels='signed' only"):
        make_config("rtn", bits=5, group=32, symmetric=True, levels="learned")
    with pytest.raises(LeanlmError, match="bits=7 is not supported"):
        make_config("rtn", bits=7, group=32, symmetric=True, levels="signed")
    with pytest.raises(LeanlmError, match="not supported"):
        make_config("rtn", bits=5, group=32, symmetric=True)  # no uniform 5-bit grid: the signed table holds it
    with pytest.raises(LeanlmError, match="drop clip"):
        make_config("gptq", bits=4, group=64, symmetric=True, levels="iq4nl", clip=True)
    with pytest.raises(LeanlmError, match="head_group"):
        make_config("rtn", bits=8, group=32, symmetric=True, head_group=48)


def test_int8_groups_bits_and_head_follow_the_decoder_group():
    """int8 g32 stores 8.5 bits/weight like llama.cpp's Q8_0, and its head / embeddings take g32 too."""
    assert QSpec(8, 32, True).bits_per_weight(896) == 8.5
    assert head_spec(8, RTN(bits=8, group=32, symmetric=True)) == QSpec(8, 32, True)
    assert head_spec(8, RTN(bits=4, group=128)) == QSpec(8, 0, True)  # an int4 model keeps its int8 head per channel
    assert head_spec(8, RTN(bits=4, group=128, head_group=64)) == QSpec(8, 64, True)
    w = _weights(k=256)
    e = {g: (w - rtn(w, QSpec(8, g, True)).dequantize()).square().mean().item() for g in (0, 64, 32)}
    assert e[32] < e[64] < 0.8 * e[0], e


def test_int8_group_model_runs_native_and_is_closer(tiny64):  # noqa: F811
    base = load_model(tiny64["llama"])
    x = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = base(x)
    kl = {}
    for group in (0, 32):
        model = quantize(load_model(tiny64["llama"]), RTN(bits=8, group=group, symmetric=True), progress=False)
        layers = model.quantization["layers"]
        assert layers["lm_head"]["group"] == group and layers["layers.0.mlp.w_down"]["group"] == group
        bits = average_bits({n: m for n, m in layers.items() if n.startswith("layers.")})
        assert bits == 8.5 if group else 8 < bits < 8.5
        if ops.available():
            assert model.layers[0].mlp.w_down.backend == "native"
        with torch.inference_mode():
            kl[group] = _kl(ref, model(x))
    assert kl[32] < kl[0], kl


@native
@pytest.mark.parametrize("g", [32, 20])
@pytest.mark.parametrize("weighted", [False, True])
def test_native_scale_search_matches_the_torch_search(g, weighted):
    """The kernel (csrc/codebook_search.cpp) runs search_scales' candidates with a lookup for the nearest level: the
    same scales (up to float summation order on near-ties), never a worse total error; a group that is not a
    multiple of 8 takes the scalar tail; an all-zero group keeps a finite scale."""
    from leanlm.quant.codebook import _search_scales_torch

    w = _weights(64, g * 6, seed=3)
    w[0, :g] = 0.0
    groups = w.view(64, 6, g)
    levels = torch.tensor(IQ4NL, dtype=torch.float32)
    imp = torch.rand(6, g, generator=torch.Generator().manual_seed(1)) + 0.05 if weighted else None
    got, want = search_scales(groups, levels, imp), _search_scales_torch(groups, levels, imp, 7)
    assert torch.isfinite(got).all() and got.shape == (64, 6)
    close = torch.isclose(got, want, rtol=1e-5)
    assert close.float().mean() > 0.99, (got - want).abs().max()

    def err(d):
        v = levels[torch.bucketize(groups / d[..., None], (levels[1:] + levels[:-1]) / 2)]
        e = (groups - d[..., None] * v).square()
        return (e if imp is None else e * imp).sum()

    assert err(got) <= err(want) * (1 + 1e-5)


@native
def test_native_scale_search_refuses_non_integer_levels():
    with pytest.raises(RuntimeError, match="integers"):
        ops.codebook_search_scales(torch.randn(4, 32), None, torch.linspace(-1, 1, 16), 7)


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_signed_table_is_all_integers_and_gptq_beats_rtn(bits):
    """The signed table holds every code's integer (-2**(bits-1) .. 2**(bits-1)-1, the top code of a negative group
    extreme used); GPTQ on it has less output error than RTN; the module's kernel and dequantized product agree."""
    from leanlm.quant.codebook import fixed_table

    t = fixed_table("signed", bits)
    assert t.tolist() == list(range(-(1 << (bits - 1)), 1 << (bits - 1)))
    x = _correlated(k=256)
    H = x.t() @ x / x.shape[0]
    w = _weights()
    spec = QSpec(bits, 32, True, "signed").validate()
    e_rtn = output_error(w - codebook_rtn(w, spec, H.diagonal()).dequantize(), H)
    qw = gptq(w, H, spec, act_order=True)
    assert torch.equal(qw.table, t) and qw.q.max() < 1 << bits and qw.zero is None
    assert output_error(w - qw.dequantize(), H) < 0.8 * e_rtn
    m = CodebookLinear(qw, None, "auto")
    y_ref = x[:5] @ qw.dequantize().T
    assert (m(x[:5]) - y_ref).abs().max() <= 0.02 * y_ref.abs().max()  # kernel: activations rounded to int8
    t, meta = m.export()
    assert torch.equal(CodebookLinear.from_export(t, meta).dequantize(), m.dequantize())
    if bits > 4:  # a truncated file is refused, not read shifted
        with pytest.raises(LeanlmError, match="damaged"):
            CodebookLinear.from_export({**t, "qweight": t["qweight"][:, :-1]}, meta)
