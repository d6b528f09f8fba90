"""GGUF export for every architecture and type: block formats, exact codes of quantized models, per-architecture
metadata, and llama.cpp runs of the tiny and the four real models (skipped without llama-cpp-python).

Tolerances of the llama.cpp comparisons, per type (what each allows and why):
- F32 export, F32 KV cache, tiny models: logits within 1e-4 (same math, other summation order); 5e-3 for Gemma 3
  (ggml's GELU is an fp16 table lookup);
- tiny model, every type: llama.cpp's logits against leanlm's forward of the file's own (dequantized) weights,
  largest difference / logit spread below TYPE_TOL (llama.cpp rounds activations to fp16 / 8 bits);
- real models, Q8_0 export: the same next token at >= 90% of the prompt's positions (and at its end), mean KL
  (leanlm fp32 || llama.cpp) < 0.05, last-position logits correlated at >= 0.995;
- SmolLM2 at every type: mean KL below TYPE_KL (the types' own rounding error, measured, with a margin);
- leanlm int8 / int4 g32 symmetric models exported with their own codes (Q8_0 / Q4_0): KL to the quantized model's
  own logits < 0.02 (same weights; only activation rounding differs).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import leanlm
from leanlm import LeanlmError
from leanlm.export import export_gguf
from leanlm.export import gguf as G
from leanlm.export import gguf_blocks as B

from conftest import make_word_tokenizer, needs_gemma3, needs_smollm2

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="pip install llama-cpp-python")


def _read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def _deq(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """A tiny Llama whose widths are multiples of 256 (K-quant super-blocks) and of 32."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
                      tie_word_embeddings=False)  # fmt: skip
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    d = tmp_path_factory.mktemp("wide")
    hf.save_pretrained(d, safe_serialization=True)
    make_word_tokenizer().save_pretrained(d)
    return d


# ---- block formats ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,qt,bound", [("q4_k", Q.Q4_K, 0.08), ("q5_k", Q.Q5_K, 0.04), ("q6_k", Q.Q6_K, 0.02),
                                           ("iq4_nl", Q.IQ4_NL, 0.08)])  # fmt: skip
def test_block_quantizers_read_back_through_ggml_layout(name, qt, bound):
    """gguf's own dequantizers (ggml's layouts) read what gguf_blocks writes: a wrong bit or nibble order would
    give errors of the order of the weights themselves; edge rows (all zero, all positive, one spike) included."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((48, 512)) * 0.05).astype(np.float32)
    x[1] = 0.0
    x[2] = np.abs(x[2]) + 0.1
    x[3, 7] = 3.0
    fn = getattr(B, f"quantize_{name}")
    b = fn(x)
    assert b.dtype == np.uint8 and b.shape == (48, 512 // gguf.GGML_QUANT_SIZES[qt][0] * gguf.GGML_QUANT_SIZES[qt][1])
    y = gguf.quants.dequantize(b, qt)
    assert np.array_equal(y[1], x[1])
    rows = [0, *range(4, 48)]
    rel = np.sqrt(((y[rows] - x[rows]) ** 2).mean() / (x[rows] ** 2).mean())
    assert rel < bound, rel
    assert np.abs(y[2] - x[2]).max() < 0.05 and y[2].min() >= 0  # offsets stay on the right side
    assert abs(y[3, 7] - 3.0) < 0.1


def test_k_quants_beat_or_match_the_32_blocks_of_the_same_bits():
    """Sanity of the scale search: Q4_K rounds no worse than Q4_0, Q6_K no worse than Q5_1 would at 6 bits."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 1024)) * 0.02).astype(np.float32)
    err = lambda y: float(((y - x) ** 2).mean())  # noqa: E731
    q4k = err(gguf.quants.dequantize(B.quantize_q4_k(x), Q.Q4_K))
    q40 = err(gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q4_0), Q.Q4_0))
    q6k = err(gguf.quants.dequantize(B.quantize_q6_k(x), Q.Q6_K))
    q51 = err(gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q5_1), Q.Q5_1))
    assert q4k < q40 and q6k < q51 / 2


# ---- exact codes of quantized models -------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,wtype,levels,group", [(8, "q8_0", "uniform", 32), (4, "q4_0", "uniform", 64),
                                                    (4, "iq4_nl", "iq4nl", 32), (5, "q5_0", "signed", 32),
                                                    (4, "q4_0", "signed", 64), (6, "q8_0", "signed", 32)])  # fmt: skip
def test_quantized_model_exports_its_own_codes(wide_dir, tmp_path, bits, wtype, levels, group):
    """int8 / int4 symmetric, the IQ4_NL table grid and the signed integer tables (groups that are multiples of 32)
    write their codes: the file's dequantized weights equal leanlm's bit for bit, and the report says so."""
    from leanlm.quant import quantize
    from leanlm.quant.config import RTN

    model, tok = leanlm.load(wide_dir)
    quantize(model, RTN(bits=bits, group=group, symmetric=True, levels=levels, head_bits=8, head_group=32,
                        dtype="float32"), progress=False)  # fmt: skip
    report = {}
    _, tensors = _read(export_gguf(model, tok, tmp_path / "m.gguf", wtype, report=report))
    dense = G.gguf_tensors(model)
    for name, t in dense.items():
        if t.dim() == 1:
            continue
        assert report[name][1] == G.EXACT, (name, report[name])
        np.testing.assert_array_equal(_deq(tensors[name]), t.float().numpy(), err_msg=name)
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q[wtype.upper()]
    assert tensors["output.weight"].tensor_type == Q.Q8_0  # the int8 g32 head keeps its codes


def test_mismatched_grids_are_requantized_and_reported(wide_dir, tmp_path):
    from leanlm.quant import quantize
    from leanlm.quant.config import RTN

    model, tok = leanlm.load(wide_dir)
    quantize(model, RTN(bits=4, group=32, symmetric=False, dtype="float32"), progress=False)  # asymmetric int4
    report = {}
    export_gguf(model, tok, tmp_path / "a.gguf", "q4_0", report=report)
    assert report["blk.0.ffn_down.weight"] == ("Q4_0", G.REQUANTIZED)
    export_gguf(model, tok, tmp_path / "b.gguf", "q8_0", report=report)
    assert report["blk.0.ffn_down.weight"] == ("Q8_0", G.REQUANTIZED)
    assert "requantized" in G.summarize_report(report)


# ---- types and fallbacks -------------------------------------------------------------------------------------------
def test_k_quant_types_and_fallbacks(wide_dir, quantizable_dir, tmp_path):
    model, tok = leanlm.load(wide_dir)
    ref = G.gguf_tensors(model)
    for wtype, body, head in (("q4_k", Q.Q4_K, Q.Q6_K), ("q5_k", Q.Q5_K, Q.Q6_K), ("q6_k", Q.Q6_K, Q.Q6_K),
                              ("iq4_nl", Q.IQ4_NL, Q.Q6_K)):  # fmt: skip
        fields, tensors = _read(export_gguf(model, tok, tmp_path / f"{wtype}.gguf", wtype))
        assert fields["general.file_type"] == G._FILE_TYPE[wtype]
        assert tensors["blk.0.ffn_down.weight"].tensor_type == body
        assert tensors["output.weight"].tensor_type == head and tensors["token_embd.weight"].tensor_type == head
        for name in ("blk.1.attn_q.weight", "blk.1.ffn_down.weight"):
            t = ref[name].numpy()
            assert np.abs(_deq(tensors[name]) - t).max() < 0.25 * np.abs(t).max(), (wtype, name)
    small, tok = leanlm.load(quantizable_dir)  # hidden 64: not a multiple of 256 -> llama.cpp's fallbacks
    for wtype, fallback in (("q4_k", Q.Q5_0), ("q5_k", Q.Q5_1), ("q6_k", Q.Q8_0)):
        _, tensors = _read(export_gguf(small, tok, tmp_path / f"s-{wtype}.gguf", wtype))
        assert tensors["blk.0.attn_q.weight"].tensor_type == fallback


def test_tokenizer_fields_read_like_ggufreader(tiny_dirs, tmp_path):
    """The header parser that copies a source GGUF's tokenizer reads what gguf.GGUFReader reads."""
    path = export_gguf(*leanlm.load(tiny_dirs["qwen2"]), tmp_path / "m.gguf", "f16")
    r = gguf.GGUFReader(str(path))
    ref = [(k, f.contents(), int(f.types[0]), int(f.types[-1]) if f.types[0] == gguf.GGUFValueType.ARRAY else None)
           for k, f in r.fields.items() if k.startswith("tokenizer.")]  # fmt: skip
    assert G.read_tokenizer_fields(path) == ref and len(ref) >= 5


# ---- architectures -------------------------------------------------------------------------------------------------
def _nonuniform(directory):
    from leanlm.prune import Structured, prune_structured

    model, tok = leanlm.load(directory)
    prune_structured(model, Structured("neurons", ratio=0.5, scope="global", importance="magnitude"), progress=False)
    assert not model.config.is_uniform()
    return model, tok


def test_architecture_metadata(tiny_dirs, tmp_path):
    fields, tensors = _read(export_gguf(*leanlm.load(tiny_dirs["qwen2"]), tmp_path / "q2.gguf", "f32"))
    assert fields["general.architecture"] == "qwen2" and "blk.0.attn_q.bias" in tensors
    model, _ = leanlm.load(tiny_dirs["qwen2"])
    q = model.layers[0].attn.wqkv.weight[: 48].detach()  # NEOX rope: rows as they are (no permutation)
    np.testing.assert_array_equal(_deq(tensors["blk.0.attn_q.weight"]), q.numpy())

    fields, tensors = _read(export_gguf(*leanlm.load(tiny_dirs["qwen3"]), tmp_path / "q3.gguf", "f32"))
    assert fields["general.architecture"] == "qwen3" and "blk.0.attn_q_norm.weight" in tensors

    model, tok = leanlm.load(tiny_dirs["gemma3"])
    fields, tensors = _read(export_gguf(model, tok, tmp_path / "g3.gguf", "f32"))
    assert fields["general.architecture"] == "gemma3"
    assert list(fields["gemma3.attention.sliding_window_pattern"]) == [True, True, False, True]
    assert fields["gemma3.attention.sliding_window"] == 6
    np.testing.assert_allclose(_deq(tensors["blk.1.post_ffw_norm.weight"]),
                               model.layers[1].mlp_post_norm.weight.detach().numpy() + 1.0)  # fmt: skip
    # leanlm's attention scale (query_pre_attn_scalar 8 = head_dim here) needs no folding
    np.testing.assert_allclose(_deq(tensors["blk.0.attn_q_norm.weight"]),
                               model.layers[0].attn.q_norm.weight.detach().numpy() + 1.0, rtol=1e-6)  # fmt: skip

    for arch in ("llama", "qwen2"):  # per-layer widths: llama.cpp's deci architecture
        model, tok = _nonuniform(tiny_dirs[arch])
        fields, tensors = _read(export_gguf(model, tok, tmp_path / f"{arch}-pruned.gguf", "f32"))
        assert fields["general.architecture"] == "deci"
        assert list(fields["deci.feed_forward_length"]) == [l.ffn_dim for l in model.config.layers]
        assert ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2")


def test_unsupported_layouts_are_refused_by_name(tiny_dirs, tmp_path):
    model, tok = leanlm.load(tiny_dirs["mistral"])
    with pytest.raises(LeanlmError, match="sliding-window attention is supported for Gemma 3 only"):
        export_gguf(model, tok, tmp_path / "m.gguf")
    for arch, message in (("qwen3", "qwen3 architecture needs uniform layers"), ("gemma3", "gemma3 architecture needs uniform")):
        model, tok = _nonuniform(tiny_dirs[arch])
        with pytest.raises(LeanlmError, match=message):
            export_gguf(model, tok, tmp_path / f"{arch}.gguf")
    assert not list(tmp_path.iterdir())


# ---- llama.cpp runs ------------------------------------------------------------------------------------------------
def _llama(path, **kw):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False, **kw)


IDS = [1, 7, 30, 55, 12, 90, 4, 4, 61, 33, 20, 70]  # 12 positions: past the tiny Gemma's sliding window of 6


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "llama_untied", "qwen2", "qwen3", "gemma3", "llama-pruned", "qwen2-pruned"])
def test_llama_cpp_runs_every_architecture(tiny_dirs, tmp_path, arch):
    """F32 exports of the tiny models in llama.cpp (F32 KV cache) give leanlm's logits at every position: within
    1e-4, and 5e-3 for Gemma 3, whose GELU ggml's CPU backend looks up in an fp16 table (input and output rounded
    to fp16; ggml-cpu/vec.h, GGML_GELU_FP16)."""
    model, tok = _nonuniform(tiny_dirs[arch.split("-")[0]]) if arch.endswith("pruned") else leanlm.load(tiny_dirs[arch])
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    llm = _llama(path, type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache
    llm.eval(IDS)
    theirs = torch.from_numpy(np.array(llm.scores[: len(IDS)], dtype=np.float32))
    with torch.inference_mode():
        ours = model(torch.tensor([IDS]))[0]
    tol = 5e-3 if arch == "gemma3" else 1e-4
    torch.testing.assert_close(theirs, ours, atol=tol, rtol=tol)


# ---- real models ---------------------------------------------------------------------------------------------------
PROMPT = "The capital of France is Paris. The capital of Italy is"


def _installed_model(name: str) -> bool:
    from leanlm.model.load import DEFAULT_MODELS

    try:
        return DEFAULT_MODELS[name]().is_file()
    except LeanlmError:
        return False


def _compare(model, tok, path) -> dict:
    """leanlm's and llama.cpp's next-token logits on PROMPT (same token ids in): at every position the top-1 and
    KL(leanlm || llama.cpp); at the last one the correlation of the logits."""
    ids = tok(PROMPT).input_ids
    llm = _llama(path)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64))
    with torch.inference_mode():
        ours = model(torch.tensor([ids]))[0].double()
    kl = (ours.log_softmax(-1).exp() * (ours.log_softmax(-1) - theirs.log_softmax(-1))).sum(-1)
    return {"top1": float((ours.argmax(-1) == theirs.argmax(-1)).double().mean()), "kl": float(kl.mean()),
            "top1_last": int(ours[-1].argmax()) == int(theirs[-1].argmax()),
            "corr_last": float(np.corrcoef(ours[-1].numpy(), theirs[-1].numpy())[0, 1])}  # fmt: skip


REAL = [pytest.param("smollm2-135m", marks=needs_smollm2), pytest.param("gemma3-270m", marks=needs_gemma3),
        "qwen2.5-0.5b", "qwen2.5-1.5b"]  # fmt: skip


@needs_llama_cpp
@pytest.mark.real_model
@pytest.mark.parametrize("name", REAL)
def test_llama_cpp_runs_real_models(name, tmp_path):
    """Each real model, exported as Q8_0, runs in llama.cpp with leanlm's next tokens and close logits."""
    if not _installed_model(name):
        pytest.skip(f"{name} is not installed")
    model, tok = leanlm.load(name)
    r = _compare(model, tok, export_gguf(model, tok, tmp_path / "m.gguf", "q8_0"))
    assert r["top1_last"] and r["top1"] >= 0.9 and r["kl"] < 0.05 and r["corr_last"] >= 0.995, r


@needs_llama_cpp
@needs_smollm2
@pytest.mark.real_model
def test_llama_cpp_runs_pruned_real_model(smollm2, tmp_path):
    """SmolLM2 pruned to per-layer FFN widths runs in llama.cpp as `deci` with the pruned model's logits."""
    import copy

    from leanlm.prune import Structured, prune_structured

    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    prune_structured(model, Structured("neurons", ratio=0.25, scope="global", importance="magnitude"), progress=False)
    assert not model.config.is_uniform()
    fields, _ = _read(path := export_gguf(model, tok, tmp_path / "pruned.gguf", "f16"))
    assert fields["general.architecture"] == "deci"
    r = _compare(model, tok, path)
    assert r["top1"] == 1.0 and r["kl"] < 1e-3, r


# mean KL(leanlm fp32 || llama.cpp) over the prompt's positions, per type, on SmolLM2-135M (measured: f16 7e-6,
# q6_k 0.02, q4_k 0.05, q5_k 0.11, q5_0 (see below), iq4_nl 0.31, q4_0 1.0; its source is a Q4_1 GGUF, which Q4_K's sub-block
# minima fit best). The bounds leave a margin over those; a misread block layout gives logits unrelated to
# leanlm's (KL of several nats).
TYPE_KL = {"f16": 1e-3, "q6_k": 0.1, "q4_k": 0.3, "q5_k": 0.3, "q5_0": 0.3, "iq4_nl": 1.0, "q4_0": 2.0}


@needs_llama_cpp
@needs_smollm2
@pytest.mark.real_model
@pytest.mark.parametrize("wtype", list(TYPE_KL))
def test_llama_cpp_runs_every_type(smollm2, tmp_path, wtype):
    model, tok = smollm2
    r = _compare(model, tok, export_gguf(model, tok, tmp_path / f"{wtype}.gguf", wtype))
    assert r["kl"] < TYPE_KL[wtype], r
    if wtype in ("f16", "q6_k"):
        assert r["top1"] == 1.0, r


@needs_llama_cpp
@needs_smollm2
@pytest.mark.real_model
@pytest.mark.parametrize("bits,wtype,levels", [(8, "q8_0", "uniform"), (4, "q4_0", "uniform"), (5, "q5_0", "signed")])
def test_llama_cpp_runs_leanlm_quantized_codes(smollm2, tmp_path, bits, wtype, levels):
    """A leanlm int8 / int4 g32 symmetric model, or one on the 5-bit signed table, in llama.cpp: its own codes, so
    llama.cpp's logits follow the quantized model's (measured KL 0.004 / 0.006; the dense model exported as Q4_0 is
    at 1.0)."""
    import copy

    from leanlm.quant import quantize
    from leanlm.quant.config import RTN

    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    quantize(model, RTN(bits=bits, group=32, symmetric=True, levels=levels, dtype="float32"), progress=False)
    report = {}
    path = export_gguf(model, tok, tmp_path / "m.gguf", wtype, report=report)
    assert report["blk.0.ffn_down.weight"] == (wtype.upper(), G.EXACT)
    r = _compare(model, tok, path)
    assert r["top1"] >= 0.9 and r["kl"] < 0.02 and r["corr_last"] >= 0.995, r


@needs_llama_cpp
@pytest.mark.parametrize("wtype", G.TYPES)
def test_llama_cpp_reads_every_type(wide_dir, tmp_path, wtype):
    """Every type, read by llama.cpp: its logits match leanlm's forward of the file's own weights (the GGUF converted
    back by leanlm, through gguf's dequantizers), so llama.cpp and gguf-py decode the blocks alike."""
    from leanlm.model import convert
    from leanlm.model.load import load_model

    model, tok = leanlm.load(wide_dir)
    path = export_gguf(model, tok, tmp_path / "m.gguf", wtype)
    back = tmp_path / "back"
    back.mkdir()
    convert.convert_weights(path, back)
    tok.save_pretrained(back)
    ref = load_model(back)
    llm = _llama(path, type_k=0, type_v=0)
    llm.eval(IDS)
    theirs = np.array(llm.scores[: len(IDS)], dtype=np.float64)
    with torch.inference_mode():
        ours = ref(torch.tensor([IDS]))[0].double().numpy()
    rel = np.abs(theirs - ours).max() / ours.std()
    assert rel < TYPE_TOL[wtype] and np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] > 0.998, rel


# largest logit difference / the logits' spread. F16: llama.cpp rounds activations to fp16 for F16 matmuls; the
# quantized types: it rounds activations to 8 bits per block (Q8_0 / Q8_K) before the integer dot products
# (measured 0.03-0.06 on this random model; a wrong block layout gives differences of the logits' own size)
TYPE_TOL = {"f32": 1e-4, "f16": 1e-2, "q8_0": 0.15, "q4_0": 0.15, "q5_0": 0.15, "q4_k": 0.15, "q5_k": 0.15,
            "q6_k": 0.15, "iq4_nl": 0.15}
