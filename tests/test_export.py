"""GGUF / HF export: tensor layout, quantized types, errors, CLI, and llama.cpp round trips."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import leanlm
from leanlm import LeanlmError
from leanlm.cli import main
from leanlm.export import export_gguf, export_hf
from leanlm.export.gguf import gguf_tensors, permute_for_llamacpp
from leanlm.model.runtime import apply_rope

from conftest import needs_smollm2

gguf = pytest.importorskip("gguf")
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="pip install llama-cpp-python")


def _read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def _deq(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])


def test_permutation_turns_half_split_rope_into_interleaved():
    """llama.cpp rotates pairs (2i, 2i+1); transformers rotates (i, i+d/2). Permuted rows agree."""
    torch.manual_seed(0)
    n_heads, d, hidden, T = 3, 8, 16, 5
    w = torch.randn(n_heads * d, hidden)
    x = torch.randn(T, hidden)
    pos = torch.arange(T, dtype=torch.float32)[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos * inv  # [T, d/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    signed = sin * torch.cat([-torch.ones(d // 2), torch.ones(d // 2)])
    ours = apply_rope((x @ w.T).view(1, T, n_heads, d), cos[:, None], signed[:, None])[0]
    q = (x @ permute_for_llamacpp(w, n_heads).T).view(T, n_heads, d // 2, 2)  # interleaved pairs
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    rot = torch.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], -1)
    back = rot.view(T, n_heads, d)  # undo the permutation on the output to compare
    inv_perm = permute_for_llamacpp(torch.arange(n_heads * d).float()[:, None], n_heads)[:, 0].long()
    unpermuted = torch.empty_like(back.reshape(T, -1))
    unpermuted[:, inv_perm] = back.reshape(T, -1)
    torch.testing.assert_close(unpermuted.view(T, n_heads, d), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "llama_untied"])
def test_gguf_f32_layout_and_metadata(tiny_dirs, tmp_path, arch):
    model, tok = leanlm.load(tiny_dirs[arch])
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    fields, tensors = _read(path)
    cfg, spec = model.config, model.config.layers[0]
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == cfg.n_layers
    assert fields["llama.attention.head_count"] == spec.n_heads
    assert fields["llama.attention.head_count_kv"] == spec.n_kv_heads
    assert fields["llama.feed_forward_length"] == spec.ffn_dim
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert ("output.weight" in tensors) == (arch == "llama_untied")
    assert ("rope_freqs.weight" in tensors) == (arch == "llama")  # llama3 rope scaling -> frequency divisors
    for name, t in gguf_tensors(model).items():
        np.testing.assert_array_equal(_deq(tensors[name]), t.float().numpy())


def test_gguf_export_of_pruned_and_quantized_model(quantizable_dir, tmp_path):
    """A layer-pruned, int8-quantized model exports its own (dequantized) weights: the F32 file
    holds exactly what leanlm computes with, and fewer blocks."""
    from leanlm.prune.structured import remove_layers
    from leanlm.quant import quantize
    from leanlm.quant.config import RTN

    model, tok = leanlm.load(quantizable_dir)
    n = model.config.n_layers
    remove_layers(model, [n - 1])
    quantize(model, RTN(bits=8, group=0, dtype="float32"), progress=False)
    fields, tensors = _read(export_gguf(model, tok, tmp_path / "pq.gguf", "f32"))
    assert fields["llama.block_count"] == n - 1 and f"blk.{n - 1}.attn_q.weight" not in tensors
    wo = model.layers[0].attn.wo
    assert type(wo).__name__ == "QuantLinear"
    np.testing.assert_array_equal(_deq(tensors["blk.0.attn_output.weight"]), wo.dequantize().numpy())
    np.testing.assert_array_equal(_deq(tensors["token_embd.weight"]), model.tok_embeddings.dense_weight().numpy())


def test_gguf_quantized_types(quantizable_dir, tmp_path):
    model, tok = leanlm.load(quantizable_dir)
    ref = gguf_tensors(model)
    Q = gguf.GGMLQuantizationType
    for wtype, qt, tol in (("f16", Q.F16, 2e-3), ("q8_0", Q.Q8_0, 0.02), ("q4_0", Q.Q4_0, 0.2)):
        _, tensors = _read(export_gguf(model, tok, tmp_path / f"{wtype}.gguf", wtype))
        for name, t in ref.items():
            g = tensors[name]
            if t.dim() == 1:
                assert g.tensor_type == Q.F32
                continue
            want = Q.Q8_0 if (wtype == "q4_0" and name in ("token_embd.weight", "output.weight")) else qt
            assert g.tensor_type == want, name
            err = np.abs(_deq(g) - t.numpy()).max() / np.abs(t.numpy()).max()
            assert err < tol, (wtype, name, err)


def test_gguf_rows_not_multiple_of_block_fall_back_to_f16(tiny_dirs, tmp_path):
    model, tok = leanlm.load(tiny_dirs["llama"])  # hidden 48: not a multiple of 32
    _, tensors = _read(export_gguf(model, tok, tmp_path / "q.gguf", "q8_0"))
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16


def test_gguf_errors(tiny_dirs, tmp_path):
    model, tok = leanlm.load(tiny_dirs["llama"])
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f16")
    with pytest.raises(LeanlmError, match="already exists"):
        export_gguf(model, tok, path, "f16")
    export_gguf(model, tok, path, "f32", force=True)
    with pytest.raises(LeanlmError, match="unknown GGUF type"):
        export_gguf(model, tok, tmp_path / "x.gguf", "q2_k")
    m, t = leanlm.load(tiny_dirs["mistral"])  # sliding window outside Gemma 3
    with pytest.raises(LeanlmError, match="GGUF export"):
        export_gguf(m, t, tmp_path / "mistral.gguf")
    m, t = leanlm.load(tiny_dirs["gemma3"])
    m.config.layers[1].ffn_dim = 40  # pretend non-uniform pruning (llama.cpp's gemma3 has one width)
    with pytest.raises(LeanlmError, match="uniform"):
        export_gguf(m, t, tmp_path / "pruned.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # nothing half-written left


def test_export_hf_roundtrip(tiny_dirs, tmp_path):
    model, tok = leanlm.load(tiny_dirs["llama"])
    out = export_hf(model, tok, tmp_path / "hf")
    m2, _ = leanlm.load(out)
    ids = torch.tensor([[1, 5, 9, 12]])
    torch.testing.assert_close(m2(ids), model(ids))


def test_export_hf_refuses_layouts_transformers_cannot_load(quantizable_dir, tiny_dirs, tmp_path, capsys):
    """A quantized model with fractional zeros (and per-layer widths) gets a clear error instead of a directory
    transformers cannot read; a dense model's export really loads in transformers with leanlm's logits. (Quantized
    models that map exactly go through compressed-tensors: tests/test_export_compressed_tensors.py.)"""
    from leanlm.export import check_transformers_load
    from leanlm.prune import Structured, prune_structured
    from leanlm.quant import RTN, quantize

    model, tok = leanlm.load(quantizable_dir)
    assert check_transformers_load(export_hf(model, tok, tmp_path / "dense"), model).loadable
    quantize(model, RTN(bits=8, group=0), progress=False)  # asymmetric min/max grid: fractional zero points
    message = "asymmetric grid whose zeros are not whole numbers of scale steps.*--sym"
    with pytest.raises(LeanlmError, match=message):
        export_hf(model, tok, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    q8 = leanlm.save(model, tok, tmp_path / "q8")  # leanlm's own quantized directory
    assert main(["export", str(q8), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "not whole numbers of scale steps" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    assert main(["export", str(q8), "--format", "gguf", "--type", "q8_0", "--out", str(tmp_path / "q8.gguf")]) == 0

    pruned, tok = leanlm.load(tiny_dirs["llama"])
    prune_structured(pruned, Structured("neurons", ratio=0.5, scope="global", importance="magnitude"), progress=False)
    with pytest.raises(LeanlmError, match="per-layer widths.*not loadable by transformers yet"):
        export_hf(pruned, tok, tmp_path / "hf")


def test_cli_export(tiny_dirs, tmp_path, capsys):
    src = str(tiny_dirs["llama"])
    out = tmp_path / "m.gguf"
    assert main(["export", src, "--format", "gguf", "--type", "f16", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert main(["export", src, "--format", "gguf", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", src, "--format", "gguf", "--type", "q4_0", "--out", str(out), "--force"]) == 0
    assert main(["export", src, "--format", "hf", "--type", "bf16", "--out", str(tmp_path / "hf")]) == 0
    from safetensors.torch import load_file

    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "hf" / "model.safetensors").values())
    assert main(["export", src, "--format", "hf", "--type", "q8_0", "--out", str(tmp_path / "hf2")]) == 2


def _llama(path, **kw):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False, **kw)


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "llama_untied"])
def test_llama_cpp_logits_match(tiny_dirs, tmp_path, arch):
    """The tiny F32 export in llama.cpp gives leanlm's logits (incl. llama3 rope scaling).

    With llama.cpp's default F16 KV cache the logits differ by ~4e-3; with an F32 cache by ~5e-6."""
    model, tok = leanlm.load(tiny_dirs[arch])
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    llm = _llama(path, type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache
    ids = [1, 7, 30, 55, 12, 90, 4, 4, 61, 33, 20, 70]
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    ours = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


@needs_llama_cpp
@needs_smollm2
@pytest.mark.real_model
def test_llama_cpp_smollm2_f16_greedy(smollm2, tmp_path):
    from leanlm.decode.generate import Sampling, encode_prompt, generate_tokens

    model, tok = smollm2
    path = export_gguf(model, tok, tmp_path / "smollm2-f16.gguf", "f16")
    llm = _llama(path)
    ids = encode_prompt(tok, "What is a GPU?")
    assert llm.tokenize(b"What is a GPU?", add_bos=False, special=True) == tok("What is a GPU?").input_ids
    ours = list(generate_tokens(model, ids, 16, Sampling(), set()))
    llm.reset()
    llm.eval(ids)
    theirs = []
    for _ in range(16):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert theirs == ours
