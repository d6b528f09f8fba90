"""KV-cache policies (leanlm.attention) on tiny random models."""

import pytest
import torch

from leanlm.attention import KVPolicy, KVStore, cache_bytes, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from leanlm.decode.generate import generate_tokens
from leanlm.errors import LeanlmError
from leanlm.model import load_model

TOL = 1e-4


def _chunked(model, tokens, policy, chunk):
    model.setup_cache(1, tokens.shape[1], cache_cls=policy)
    outs = [model(tokens[:, s : s + chunk], start=s)[0] for s in range(0, tokens.shape[1], chunk)]
    return torch.cat(outs)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "mistral"])
@pytest.mark.parametrize("spec", ["full", "sinks:4,window:64", "h2o:64,window:8", "snapkv:64"])
def test_policy_larger_than_sequence_equals_full_attention(arch, spec, tiny_dirs):
    """With room for every token, each policy is exact (prefill chunks and single-token decode),
    including the layers' own sliding windows (gemma3, mistral)."""
    model = load_model(tiny_dirs[arch])
    tokens = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    pol = KVPolicy.parse(spec)
    with torch.inference_mode():
        full = model(tokens)[0]
        for chunk in (7, 1):
            assert (_chunked(model, tokens, pol, chunk) - full).abs().max().item() <= TOL


def test_window_policy_is_exact_sliding_window_attention(tiny_dirs):
    """sinks:0,window:W decoded token by token == full attention restricted to the last W keys."""
    model = load_model(tiny_dirs["llama"])
    tokens = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for layer in model.layers:  # reference: the runtime's own sliding-window mask
            layer.attn.window = 5
        ref = model(tokens)[0]
        for layer in model.layers:
            layer.attn.window = None
        got = _chunked(model, tokens, KVPolicy.parse("sinks:0,window:4"), 1)  # 4 kept + the new one
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("spec", ["h2o:10,window:4", "snapkv:10,obs:3"])
def test_eviction_keeps_exactly_the_budget(spec, tiny_dirs):
    model = load_model(tiny_dirs["llama"])
    tokens = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    pol = KVPolicy.parse(spec)
    with torch.inference_mode():
        model.setup_cache(1, 40, cache_cls=pol)
        model(tokens[:, :16], start=0)
        for pos in range(16, 40):
            model(tokens[:, pos : pos + 1], start=pos)
            for layer in model.layers:
                c = layer.attn.cache
                assert c.n == 10 and c.store.slots == 10
                p = c.pos[0]
                assert (p >= 0).all() and all(len(set(h.tolist())) == 10 for h in p)  # 10 distinct tokens per head
                recent = 4 if spec.startswith("h2o") else 3
                for h in p:  # the newest tokens are always kept
                    assert set(range(pos + 1 - recent, pos + 1)) <= set(h.tolist())


def test_int8_and_int4_round_trip_error_within_bound():
    x = torch.randn(2, 3, 50, 64) * 3
    q, s = quantize_int8(x)
    assert q.dtype == torch.int8 and s.shape == (2, 3, 50, 1)
    err8 = (dequantize_int8(q, s) - x).abs()
    # half a step per element (+ fp16 rounding of the scale)
    assert (err8 <= x.abs().amax(-1, keepdim=True) / 127 * 0.5 * 1.01 + 1e-6).all()
    p, s4, z4 = quantize_int4(x, 32)
    assert p.dtype == torch.uint8 and p.shape == (2, 3, 50, 32)
    err4 = (dequantize_int4(p, s4, z4, 32) - x).abs()
    g = x.view(2, 3, 50, 2, 32)
    step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(32, -1)
    assert (err4 <= step * 0.5 * 1.02 + 1e-3).all()
    assert err8.mean() < err4.mean() < 0.25


def test_quantized_store_bytes():
    f = KVStore(1, 3, 100, 64, torch.float32)
    s8 = KVStore(1, 3, 100, 64, torch.float32, bits=8)
    s4 = KVStore(1, 3, 100, 64, torch.float32, bits=4)
    assert f.nbytes() == 2 * 3 * 100 * 64 * 4
    assert s8.nbytes() == 2 * 3 * 100 * (64 + 2)
    assert s4.nbytes() == 2 * 3 * 100 * (32 + 2 * 2 * 2)


@pytest.mark.parametrize("spec", ["int8", "int4", "sinks:2,window:8,int8"])
def test_quantized_cache_close_to_full(spec, tiny_dirs):
    model = load_model(tiny_dirs["llama"])
    tokens = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = torch.log_softmax(model(tokens)[0], -1)
        got = torch.log_softmax(_chunked(model, tokens, KVPolicy.parse(spec), 1), -1)
    kl = (full.exp() * (full - got)).sum(-1).mean().item()
    assert kl < (0.01 if "int8" in spec else 0.1)


def test_window_generation_runs_past_cache_with_constant_memory(tiny_dirs):
    """Generation with sinks+window runs far past the cache size (and past the model's 256-token
    context) while the cache never grows."""
    model = load_model(tiny_dirs["llama"])
    pol = KVPolicy.parse("sinks:2,window:14")
    sizes = []
    gen = generate_tokens(model, [5, 6, 7], max_new_tokens=300, eos_ids=set(), kv=pol)
    for i, _ in enumerate(gen):
        if i % 50 == 10:
            sizes.append(cache_bytes(model))
    assert i + 1 == 300 and len(set(sizes)) == 1
    assert all(layer.attn.cache is None for layer in model.layers)  # released at the end
    slots = 2 + 14 + 1  # sinks + window + the ring's slot for the key a decode query still sees
    assert sizes[0] == sum(2 * 2 * slots * 8 * 4 + slots * 4 for _ in model.layers)  # k,v fp32 + int32 positions


def test_long_prompt_chunked_prefill_in_generation(tiny_dirs):
    """A bounded policy prefills a long prompt in chunks (never more than budget + chunk keys)."""
    model = load_model(tiny_dirs["llama"])
    out = list(generate_tokens(model, [5] * 200, max_new_tokens=5, eos_ids=set(), kv=KVPolicy.parse("h2o:32")))
    assert len(out) == 5


def test_parse_errors():
    assert KVPolicy.parse(None) is None
    p = KVPolicy.parse("sinks:4,window:1024,int8")
    assert (p.method, p.sinks, p.window, p.bits) == ("window", 4, 1024, 8)
    assert KVPolicy.parse("h2o:256").window == 128
    for bad in ["int3", "h2o", "foo:3", "h2o:8,window:8", "sinks:4,window:0"]:
        with pytest.raises(LeanlmError):
            KVPolicy.parse(bad)


def test_cli_kv_options(tiny_dirs, capsys, tmp_path):
    import json

    from conftest import DATA

    from leanlm.cli import main

    d = str(tiny_dirs["llama"])
    assert main(["generate", d, "--prompt", "w1 w2 w3", "--no-chat", "--max-new-tokens", "40",
                 "--kv", "sinks:2,window:8,int8", "--json", "-"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["new_tokens"] >= 1
    assert main(["generate", d, "--prompt", "w1", "--kv", "int3"]) == 2
    assert "int3" in capsys.readouterr().err
    if (DATA / "wikitext-2-raw").is_dir():
        code = main(["eval", d, "--ppl", "--memory", "--seq-len", "24", "--windows", "2", "--kv", "sinks:2,window:6",
                     "--kv-chunk", "5", "--json", "-"])  # fmt: skip
        r = json.loads(capsys.readouterr().out)
        assert code == 0 and r["perplexity"]["kv"] == "sinks:2,window:6" and r["perplexity"]["tokens"] == 46
        assert r["memory"]["kv_bytes_per_token"] < 3 * 2 * 2 * 8 * 4
