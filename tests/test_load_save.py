"""Loading, saving and the clear errors for bad checkpoints."""

import json
import os

import pytest
import torch
from conftest import make_tiny_hf

from leanlm import LeanlmError
from leanlm.model import load_model, save
from leanlm.model.config import ModelConfig


def test_save_reloads_in_transformers_and_leanlm(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "qwen2", "gemma3"):
        model = load_model(tiny_dirs[arch])
        out = save(model, None, tmp_path / arch)
        tokens = torch.randint(0, 97, (1, 11))
        with torch.inference_mode():
            ours = model(tokens)
            hf = AutoModelForCausalLM.from_pretrained(out).eval()(tokens).logits
            again = load_model(out)(tokens)
        assert torch.equal(ours, again)
        assert (ours - hf).abs().max() <= 1e-4


def test_save_refuses_to_overwrite(tiny_dirs, tmp_path):
    model = load_model(tiny_dirs["llama"])
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(LeanlmError, match="--force"):
        save(model, None, target)
    assert (target / "keep.txt").read_text() == "precious"
    with pytest.raises(LeanlmError, match="not a directory leanlm wrote"):  # --force replaces only leanlm's outputs
        save(model, None, target, force=True)
    assert (target / "keep.txt").read_text() == "precious"
    mine = tmp_path / "mine"
    save(model, None, mine)
    with pytest.raises(LeanlmError, match="--force"):
        save(model, None, mine)
    save(model, None, mine, force=True)
    assert (mine / "model.safetensors").exists()


def test_failed_save_leaves_nothing(tiny_dirs, tmp_path, monkeypatch):
    import safetensors.torch

    model = load_model(tiny_dirs["llama"])

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(RuntimeError):
        save(model, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_nonuniform_layers_roundtrip(tiny_dirs, tmp_path):
    """Per-layer shapes (what pruning produces) survive save/load through leanlm_layers."""
    model = load_model(tiny_dirs["llama"])
    spec = model.config.layers[1]
    keep = 40
    mlp = model.layers[1].mlp
    with torch.no_grad():
        gu = mlp.w_gate_up.weight
        mlp.w_gate_up.weight = torch.nn.Parameter(torch.cat([gu[:keep], gu[spec.ffn_dim : spec.ffn_dim + keep]]))
        mlp.w_down.weight = torch.nn.Parameter(mlp.w_down.weight[:, :keep].contiguous())
    spec.ffn_dim = keep
    tokens = torch.randint(0, 97, (1, 9))
    with torch.inference_mode():
        before = model(tokens)
    out = save(model, None, tmp_path / "pruned")
    assert json.loads((out / "config.json").read_text())["leanlm_layers"][1]["ffn_dim"] == keep
    with torch.inference_mode():
        assert torch.equal(load_model(out)(tokens), before)


def test_missing_path():
    with pytest.raises(LeanlmError, match="not found"):
        load_model("/nonexistent/model")


def test_directory_without_config(tmp_path):
    with pytest.raises(LeanlmError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(LeanlmError, match="unsupported architecture 'gpt2'.*llama.*gemma3_text"):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16 casts each tensor as it is read
def test_truncated_safetensors(tiny_dirs, tmp_path, dtype):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(tiny_dirs["llama"], d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LeanlmError, match="truncated or corrupt"):
        load_model(d, dtype=dtype)


def _mapped(path) -> bool:
    """Is the file mapped into this process (Linux /proc/self/maps)?"""
    return any(str(path) in line for line in open("/proc/self/maps"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loaded_weights_do_not_keep_the_file_mapped(quantizable_dir, word_tokenizer, tmp_path, dtype):
    """The weights own their memory: with safetensors' default mmap backend every tensor is a view of one mapping
    of the whole file, so freed weights (each block GPTQ replaces) kept their pages resident (the 1.5B's GPTQ
    peak: 7.0 GB against a 5.0 GB bound)."""
    import shutil

    from safetensors import safe_open

    from leanlm.quant import RTN, quantize, save_quantized

    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps (Linux)")
    d = tmp_path / "model"
    shutil.copytree(quantizable_dir, d)
    try:
        safe_open(d / "model.safetensors", framework="pt", backend="pread").__enter__().__exit__(None, None, None)
    except TypeError:
        pytest.skip("safetensors < 0.8 has no pread backend")
    model = load_model(d, dtype=dtype)
    assert not _mapped(d / "model.safetensors"), [l for l in open("/proc/self/maps") if "safetensors" in l]
    out = save_quantized(quantize(model, RTN(bits=4, group=32), progress=False), word_tokenizer, tmp_path / "q")
    again = load_model(out)
    assert not _mapped(out / "model.safetensors")
    assert again.quantization["format"] == model.quantization["format"]


def test_pickled_weights_are_refused(tiny_dirs, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LeanlmError, match="never loads"):
        load_model(d)


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(LeanlmError, match="not a GGUF file"):
        load_model(f)


def test_truncated_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 20)
    with pytest.raises(LeanlmError, match="truncated or corrupt"):
        load_model(f)
    assert not list((tmp_path / "cache").glob("converted/*"))


def test_config_from_hf_fields():
    cfg = ModelConfig.from_hf(make_tiny_hf("gemma3").config)
    assert cfg.family == "gemma3" and cfg.norm_plus_one and cfg.qk_norm and cfg.sandwich_norms
    assert [l.sliding_window for l in cfg.layers] == [6, 6, None, 6]
    assert {l.rope_key for l in cfg.layers} == {"sliding_attention", "full_attention"}
    assert cfg.kv_bytes_per_token(4) == 4 * 2 * 2 * 8 * 4


def test_pruned_head_count_that_transformers_rejects_still_loads(tmp_path, word_tokenizer):
    """Gemma 3 configs must have hidden_size % num_attention_heads == 0 in transformers; keeping 4
    of 6 query heads of a 42-wide model (42 % 4 != 0) is leanlm's own shape and must load back."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    import leanlm
    from leanlm.prune.structured import shrink_attention

    cfg = Gemma3TextConfig(vocab_size=97, hidden_size=42, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=8, sliding_window=6,
                           layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base", safe_serialization=True)
    word_tokenizer.save_pretrained(tmp_path / "base")
    model, tok = leanlm.load(tmp_path / "base")
    for i in range(len(model.layers)):  # 2 KV groups of 3 query heads -> 2 + 2
        shrink_attention(model, i, keep_q=[0, 1, 3, 4], keep_kv=[0, 1])
    save(model, tok, tmp_path / "m")
    back, tok2 = leanlm.load(tmp_path / "m")
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        assert torch.allclose(back(ids), model(ids), atol=1e-5)
    assert back.config.layers[0].n_heads == 4 and tok2 is not None
