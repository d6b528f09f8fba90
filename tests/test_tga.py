"""Pooled-global attention (leanlm.attention.tga): against a naive reference, chunk/decode agreement, parse, cost."""

import math
from types import SimpleNamespace

import pytest
import torch

from leanlm.attention import KVPolicy, TGACache, TGAPolicy, cache_bytes
from leanlm.errors import LeanlmError


def reference(q, k, v, window, group, scale, log_bias, layer_window=None, sinks=0):
    """Every query at its own position, keys/values built from scratch: sinks and pooled groups before the
    window, then the window."""
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    out = torch.empty_like(q)
    for p in range(N):
        lw = window if layer_window is None else min(window, layer_window)
        lo = max(0, p - lw + 1)
        keys, vals, bias = [k[:, :, lo : p + 1]], [v[:, :, lo : p + 1]], [torch.zeros(p + 1 - lo)]
        if layer_window is None:
            before = p - window + 1  # positions [0, before) lie before the window
            n_groups = max(0, before - sinks) // group
            if n_groups:
                g = slice(sinks, sinks + n_groups * group)
                keys.insert(0, k[:, :, g].unflatten(2, (n_groups, group)).mean(3))
                vals.insert(0, v[:, :, g].unflatten(2, (n_groups, group)).mean(3))
                bias.insert(0, torch.full((n_groups,), math.log(group) if log_bias else 0.0))
            ns = min(sinks, max(0, before))
            if ns:
                keys.insert(0, k[:, :, :ns]), vals.insert(0, v[:, :, :ns]), bias.insert(0, torch.zeros(ns))
        kk, vv, bb = torch.cat(keys, 2), torch.cat(vals, 2), torch.cat(bias)
        kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
        s = (q[:, :, p : p + 1] @ kk.transpose(-1, -2)) * scale + bb
        out[:, :, p : p + 1] = torch.softmax(s, -1) @ vv
    return out


def run_cache(policy, q, k, v, chunks, layer_window=None):
    B, H, N, D = q.shape
    cache = policy(B, k.shape[1], N, D, torch.float32)
    attn = SimpleNamespace(scale=D**-0.5, window=layer_window)
    outs, s = [], 0
    for c in chunks:
        outs.append(cache.attend(attn, q[:, :, s : s + c], k[:, :, s : s + c], v[:, :, s : s + c], s))
        s += c
    assert s == N
    return torch.cat(outs, 2), cache


@pytest.mark.parametrize("log_bias,sinks", [(False, 0), (True, 0), (False, 3), (True, 2)])
@pytest.mark.parametrize("chunks", [[70], [1] * 70, [13, 1, 1, 20, 1, 5, 29], [2, 33, 35]])
def test_matches_reference(chunks, log_bias, sinks):
    torch.manual_seed(0)
    B, H, Hkv, N, D = 1, 4, 2, 70, 8
    q, k, v = torch.randn(B, H, N, D), torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
    pol = TGAPolicy(window=12, pool=4, log_bias=log_bias, sinks=sinks)
    got, cache = run_cache(pol, q, k, v, chunks)
    want = reference(q, k, v, 12, 4, D**-0.5, log_bias, sinks=sinks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # memory: the ring of 12, the sinks, (70 - sinks) // 4 pooled slots; keys and values, and an int32 position
    # per slot for the fused decode kernel
    slots = 12 + sinks + (70 - sinks) // 4
    assert cache.nbytes() == 2 * B * Hkv * slots * D * 4 + B * slots * 4


def test_layer_with_own_window_gets_no_pooled_tokens():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    pol = TGAPolicy(window=16, pool=4)
    got, cache = run_cache(pol, q, k, v, [9, 1, 1, 29], layer_window=10)
    torch.testing.assert_close(got, reference(q, k, v, 16, 4, 8**-0.5, False, layer_window=10), atol=1e-5, rtol=1e-5)
    assert cache.P == 0 and cache.L == 10


def test_big_window_is_full_attention_on_model(tiny_dirs):
    import leanlm
    from leanlm.attention.longctx import chunked_prefill

    model, _ = leanlm.load(tiny_dirs["llama"], dtype="float32")
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    model.setup_cache(1, 40)
    full = model(ids, start=0)[0]
    model.setup_cache(1, 40, cache_cls=KVPolicy.parse("tga:group=4,window=64"))
    got = torch.cat([model(ids[:, s : s + 8], start=s)[0] for s in range(0, 40, 8)])
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
    # a small window differs from full, and chunked prefill + decode agree with a single prefill
    pol = KVPolicy.parse("tga:group=4,window=8")
    model.setup_cache(1, 40, cache_cls=pol)
    one = model(ids, start=0)[0]
    assert not torch.allclose(one, full, atol=1e-3)
    model.setup_cache(1, 40, cache_cls=pol)
    steps = [model(ids[:, :5], start=0)[0]] + [model(ids[:, s : s + 1], start=s)[0] for s in range(5, 40)]
    torch.testing.assert_close(torch.cat(steps), one, atol=1e-4, rtol=1e-4)
    nll, n, _, _ = chunked_prefill(model, ids, pol, chunk=16, score=True)
    assert n == 39 and math.isfinite(nll)
    assert cache_bytes(model) == sum(l.attn.cache.nbytes() for l in model.layers) > 0
    model.clear_cache()


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.03)])
def test_fused_decode_step_equals_python_path(tiny_dirs, dtype, tol, monkeypatch):
    """Decode steps run whole blocks in C++ (decode_layer_kvquant over the ring, sinks and pooled groups read in
    place, the new key written by the kernel; a completed group pooled by the next step) and give the logits of
    the layer-by-layer Python path."""
    import leanlm
    from leanlm import ops

    if not ops.available():
        pytest.skip("no C++ compiler for the native kernels")
    model, _ = leanlm.load(tiny_dirs["llama"], dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(3))
    pol = KVPolicy.parse("tga:group=4,window=8,sinks=2")
    calls = []
    fn = ops.decode_layer_kvquant
    monkeypatch.setattr(ops, "decode_layer_kvquant", lambda *a, **k: calls.append(1) or fn(*a, **k))

    def run(fused):
        model.fused_decode = fused
        try:
            model.setup_cache(1, 60, cache_cls=pol)
            with torch.inference_mode():
                out = [model(ids[:, :6], start=0)[0]] + [model(ids[:, s : s + 1], start=s)[0] for s in range(6, 60)]
            model.clear_cache()
            return torch.cat(out).float()
        finally:
            model.fused_decode = True

    ref = run(False)
    assert not calls
    got = run(True)
    assert len(calls) == len(model.layers) * 54
    if dtype == "float32":
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    else:  # bf16: the kernel accumulates in fp32 where SDPA rounds
        assert (got.softmax(-1) - ref.softmax(-1)).abs().max().item() <= tol


def test_generate_and_apply(tiny_dirs):
    import leanlm
    from leanlm.attention.policies import model_policy
    from leanlm.decode.generate import generate_tokens

    model, _ = leanlm.load(tiny_dirs["llama"], dtype="float32")
    ids = list(range(3, 40))
    pol = KVPolicy.parse("tga:group=4,window=16,logg=1")
    out = list(generate_tokens(model, ids, 12, eos_ids=set(), kv=pol))
    assert len(out) == 12
    leanlm.apply(model, pol)
    got = model_policy(model)
    assert isinstance(got, TGAPolicy) and got == pol
    assert list(generate_tokens(model, ids, 12, eos_ids=set())) == out


def test_parse_and_errors():
    p = KVPolicy.parse("tga:group=16,window=512")
    assert isinstance(p, TGAPolicy) and (p.pool, p.window, p.log_bias) == (16, 512, False)
    assert p.sinks == 4 and p.describe() == "tga:group=16,window=512,sinks=4"
    assert KVPolicy.parse(p.describe() + ",logg=1").log_bias
    assert KVPolicy.parse("tga:group=8,window=64,sinks=0").describe() == "tga:group=8,window=64,sinks=0"
    assert isinstance(p(1, 2, 100, 8, torch.float32), TGACache)
    for bad in ("tga:group=1,window=8", "tga:group=16,window=8", "tga:group=4,foo=2", "tga:group=4,window=8,logg=2",
                "tga:group=4,window:8"):
        with pytest.raises(LeanlmError):
            KVPolicy.parse(bad)


def test_cost_model_counts_pooled_keys():
    from conftest import make_tiny_hf

    from leanlm.hardware import HardwareProfile, Plan, estimate, forward_cost
    from leanlm.model.config import ModelConfig

    hw = HardwareProfile("toy", mem_bw_gbs=100, peak_tflops={"fp32": 1.0, "bf16": 2.0}, mem_gb=1,
                         bw_efficiency=1.0, compute_efficiency=1.0)  # fmt: skip
    cfg = ModelConfig.from_hf(make_tiny_hf("llama").config)  # 6 q heads of 8
    plan = Plan()
    KVPolicy.parse("tga:group=16,window=512").price(plan)
    assert (plan.kv_window, plan.kv_pool_group) == (512, 16)
    ops = {o.name: o for o in forward_cost(cfg, hw, plan, 1, 1, 8192, False)}
    keys = 512 + (8192 - 512) // 16  # window + pooled groups
    assert ops["layers.0.attn.sdpa"].flops == 4 * keys * 6 * 8
    full = estimate(cfg, hw, Plan(), context=8192)
    assert estimate(cfg, hw, plan, context=8192)["memory_gb"] < full["memory_gb"]
