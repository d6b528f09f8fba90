"""compressed-tensors export of leanlm-quantized models: the compressed-tensors package unpacks the file to
exactly leanlm's dequantized weights, transformers loads it through its compressed-tensors integration with
those weights, and its logits match leanlm's (tiny models and the real ones)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

import leanlm
from leanlm import LeanlmError
from leanlm.cli import main
from leanlm.export import export_compressed_tensors, export_hf
from leanlm.export.compressed_tensors import pack_int32
from leanlm.quant import RTN, quantize
from leanlm.quant.packed import QuantLinear

from conftest import needs_smollm2

ct = pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (leanlm[deploy])")

# Logit differences, relative to the largest logit. leanlm's int4/int8 kernels quantize activations to int8 per 32
# and a quantized model computes in bf16 by default; transformers runs the dequantized weights in float32. Against
# those kernels the logits differ by up to KERNEL_TOL (measured 0.02-0.055 on the tiny random models, whose weights
# and activations are large; see the real-model test for those); against leanlm's dequantize-and-matmul path in
# float32, by DEQUANT_TOL (measured ~1e-6). A wrong weight, scale or layout gives differences of order 1.
KERNEL_TOL = 0.08
DEQUANT_TOL = 1e-4
REAL_TOL = 0.06  # the real models in bf16 (leanlm's default) against its kernels: measured 0.038 (SmolLM2 W4 g128), 0.025 (Qwen2.5 W8)


def _load_dir(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors"), json.loads((path / "config.json").read_text())


def _leanlm_dequantized(model) -> dict[str, torch.Tensor]:
    """transformers-named float32 weights of leanlm's quantized decoder Linears (their dequantized values)."""
    from leanlm.model.load import leanlm_to_hf

    from leanlm.quant import CodebookLinear

    sd = {"tok_embeddings.weight": torch.zeros(1), "norm.weight": torch.zeros(1)}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, CodebookLinear)) and name.startswith("layers."):
            sd[name + ".weight"] = m.dequantize(torch.float32)
    out = leanlm_to_hf(sd, model.config)
    return {k: v for k, v in out.items() if k.startswith("model.layers.")}


def _decompress_with_library(sd: dict, qcfg: dict, only: str = "") -> dict[str, torch.Tensor]:
    """The quantized modules' weights (those whose names start with `only`), decompressed by compressed-tensors'
    own pack-quantized compressor."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    config = QuantizationConfig.model_validate(qcfg)
    compressor = BaseCompressor.get_value_from_registry(config.format)
    out = {}
    for module in sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_packed") and k.startswith(only)}):
        group = next(g for g in config.config_groups.values() if g.targets == ["Linear"] or module in g.targets)
        scheme = QuantizationScheme(targets=group.targets, weights=group.weights)
        local = {k[len(module) + 1 :]: v for k, v in sd.items() if k.startswith(module + ".") and "bias" not in k}
        out[module + ".weight"] = compressor.decompress(local, scheme)["weight"]
    return out


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _dequantize_path_copy(model):
    """`model` with every QuantLinear / CodebookLinear rebuilt on the dequantize-and-matmul backend (no int8
    activations)."""
    import copy

    from leanlm.calibration import set_module
    from leanlm.quant import CodebookLinear
    clone = copy.deepcopy(model)
    rebuilt = {}  # one new module per table: a tied head and embedding keep sharing it
    for name, m in list(clone.named_modules(remove_duplicate=False)):
        if isinstance(m, (QuantLinear, CodebookLinear)):
            if id(m) not in rebuilt:
                rebuilt[id(m)] = type(m).from_export(*m.export(), backend="none")
            set_module(clone, name, rebuilt[id(m)])
    return clone


def _check_export(model, tok, out, dequantize: bool = False, only: str = "") -> tuple[float, torch.Tensor]:
    """The library decompresses `out` to leanlm's weights exactly; transformers loads it with those weights and
    no missing / unexpected tensor. Returns transformers' logits' relative difference from leanlm's (its kernels)
    and transformers' logits. `dequantize`: load with CompressedTensorsConfig(dequantize=True); `only`: a module
    name prefix that limits the library's check (transformers' weights are always all checked)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    sd, cfg = _load_dir(out)
    ours = _leanlm_dequantized(model)
    theirs = _decompress_with_library(sd, cfg["quantization_config"], only)
    assert set(theirs) == {k for k in ours if k.startswith(only)} and theirs
    for name, w in theirs.items():
        assert torch.equal(w.float(), ours[name]), name
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    hf, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True, **extra)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.inference_mode():
        a = hf(_ids(model)).logits[0].float()  # compressed-tensors decompresses the packed weights on the first forward
        b = model(_ids(model))[0].float()
    params = dict(hf.named_parameters())
    for name, w in ours.items():
        assert torch.equal(params[name].detach().float(), w), name
    return _rel_diff(a, b), a


def _ids(model) -> torch.Tensor:
    return ((torch.arange(12) * 7 + 1) % model.config.vocab_size)[None]


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_pack_int32_is_what_compressed_tensors_unpacks(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    for cols in (32, 48, 37):  # whole words, and widths that end mid-word
        q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, cols), generator=g).to(torch.int8)
        packed = pack_int32(q, bits)
        assert torch.equal(packed, pack_to_int32(q, bits))
        assert torch.equal(unpack_from_int32(packed, bits, torch.Size([6, cols])), q)


@pytest.mark.parametrize("arch", ["qwen2", "llama_untied"])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 0), (8, 0), (8, 32)])
def test_symmetric_export_is_exact_and_loads_in_transformers(tiny_dirs, tmp_path, arch, bits, group):
    """W4A16 / W8A16, grouped and per channel; the tiny models' widths (48, 80) leave a short last group of 32,
    which the export writes as 16-wide groups with repeated scales."""
    model, tok = leanlm.load(tiny_dirs[arch])
    quantize(model, RTN(bits=bits, group=group, symmetric=True, dtype="float32"), progress=False)
    out = export_compressed_tensors(model, tok, tmp_path / "ct")
    qcfg = _load_dir(out)[1]["quantization_config"]
    (scheme,) = qcfg["config_groups"].values()
    assert qcfg["format"] == "pack-quantized" and "lm_head" in qcfg["ignore"]
    assert scheme["weights"]["num_bits"] == bits and scheme["weights"]["strategy"] == ("group" if group else "channel")
    assert scheme["weights"]["group_size"] == (16 if group else None)  # gcd(32, 48) = gcd(32, 80) = 16
    kernel_diff, theirs = _check_export(model, tok, out)
    assert kernel_diff < KERNEL_TOL
    with torch.inference_mode():
        assert _rel_diff(theirs, _dequantize_path_copy(model)(_ids(model))[0]) < DEQUANT_TOL


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_signed_table_exports_exactly_and_loads_in_transformers(tiny_dirs, tmp_path, bits):
    """The signed integer table (levels="signed") is compressed-tensors' symmetric int grid, the code -2**(bits-1)
    included: W4A16 / W5A16 / W6A16 with leanlm's weights exactly; the 4-bit IQ4_NL table has no such form."""
    model, tok = leanlm.load(tiny_dirs["qwen2"])
    quantize(model, RTN(bits=bits, group=32, symmetric=True, levels="signed", dtype="float32"), progress=False)
    out = export_compressed_tensors(model, tok, tmp_path / "ct")
    (scheme,) = _load_dir(out)[1]["quantization_config"]["config_groups"].values()
    assert scheme["weights"]["num_bits"] == bits and scheme["weights"]["symmetric"]
    kernel_diff, theirs = _check_export(model, tok, out)
    with torch.inference_mode():
        assert _rel_diff(theirs, _dequantize_path_copy(model)(_ids(model))[0]) < DEQUANT_TOL
    table, tok = leanlm.load(tiny_dirs["qwen2"])
    quantize(table, RTN(bits=4, group=32, symmetric=True, levels="iq4nl", dtype="float32"), progress=False)
    with pytest.raises(LeanlmError, match="'iq4nl' table"):
        export_compressed_tensors(table, tok, tmp_path / "iq4nl")


def test_asymmetric_whole_step_zeros_export_with_zero_points(tiny_dirs, tmp_path):
    """An asymmetric grid whose zeros are whole scale steps maps exactly (packed integer zero points). transformers
    reads such a file only with dequantize=True: its compressed route allocates unpacked zero points and rejects the
    packed ones the format stores (vllm-project/llm-compressor#1618); vLLM reads them packed."""
    model, tok = leanlm.load(tiny_dirs["qwen2"])
    quantize(model, RTN(bits=4, group=32, dtype="float32"), progress=False)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.zeros is not None:  # zero = k * scale, k a power of two: exact in bf16
            k = torch.tensor([-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0])[torch.randint(0, 7, m.zeros.shape, generator=g)]
            m.zeros.copy_((k * m.scales.float()).to(torch.bfloat16))
    out = export_compressed_tensors(model, tok, tmp_path / "ct")
    sd, cfg = _load_dir(out)
    assert any(k.endswith("weight_zero_point") for k in sd)
    (scheme,) = cfg["quantization_config"]["config_groups"].values()
    assert scheme["weights"]["symmetric"] is False
    kernel_diff, theirs = _check_export(model, tok, out, dequantize=True)
    assert kernel_diff < KERNEL_TOL
    with torch.inference_mode():
        assert _rel_diff(theirs, _dequantize_path_copy(model)(_ids(model))[0]) < DEQUANT_TOL


def test_fractional_zeros_and_dense_models_are_refused(tiny_dirs, tmp_path):
    model, tok = leanlm.load(tiny_dirs["qwen2"])
    with pytest.raises(LeanlmError, match="for quantized models"):
        export_compressed_tensors(model, tok, tmp_path / "dense")
    quantize(model, RTN(bits=4, group=32), progress=False)  # leanlm's default: asymmetric min/max grid
    with pytest.raises(LeanlmError, match="not whole numbers of scale steps.*--sym"):
        export_compressed_tensors(model, tok, tmp_path / "asym")
    assert not (tmp_path / "asym").exists()


def test_export_hf_of_a_quantized_model_writes_compressed_tensors(tiny_dirs, tmp_path, capsys):
    from leanlm.export import check_transformers_load

    model, tok = leanlm.load(tiny_dirs["llama"])
    quantize(model, RTN(bits=8, group=0, symmetric=True), progress=False)
    out = export_hf(model, tok, tmp_path / "api")
    assert _load_dir(out)[1]["quantization_config"]["quant_method"] == "compressed-tensors"
    assert check_transformers_load(out, model).loadable
    q8 = leanlm.save(model, tok, tmp_path / "q8")  # leanlm's own layout, read back and exported by the CLI
    for fmt in ("compressed-tensors", "hf"):
        assert main(["export", str(q8), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0, capsys.readouterr().err
        assert _check_export(leanlm.load(q8)[0], tok, tmp_path / fmt)[0] < KERNEL_TOL
    assert main(["export", str(q8), "--format", "compressed-tensors", "--type", "q4_0", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.real_model
@pytest.mark.parametrize("name,bits,group", [
    pytest.param("smollm2-135m", 4, 128, marks=needs_smollm2),  # 576-wide layers: a short last group of 64
    ("qwen2.5-0.5b", 8, 0),
])  # fmt: skip
def test_real_model_export_matches_leanlm(tmp_path, name, bits, group):
    try:
        model, tok = leanlm.load(name)
    except LeanlmError as e:
        pytest.skip(f"{name} is not installed: {e}")
    quantize(model, RTN(bits=bits, group=group, symmetric=True, head_bits=0), progress=False)  # bf16, as users run it
    out = export_compressed_tensors(model, tok, tmp_path / "ct")
    kernel_diff, theirs = _check_export(model, tok, out, only="model.layers.0.")  # all layers: in the tiny tests
    with torch.inference_mode():
        dequant_diff = _rel_diff(theirs, _dequantize_path_copy(model).float()(_ids(model))[0])
    print(f"{name} W{bits}A16 g{group}: transformers' logits differ from leanlm's kernels by {kernel_diff:.4f} and "
          f"from its float32 dequantize path by {dequant_diff:.2g} of the largest")
    assert kernel_diff < REAL_TOL and dequant_diff < DEQUANT_TOL
