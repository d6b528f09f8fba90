"""Attention read straight from an int8 / int4 KV store (ops.attend_kvquant, csrc/attention_kvquant.cpp)
against the dequantize-then-attend reference (PolicyCache.native_kvquant = False)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import make_word_tokenizer, needs_smollm2
from leanlm import ops
from leanlm.attention import KVPolicy, KVStore
from leanlm.attention.policies import PolicyCache
from leanlm.model import load_model

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C++ compiler for the native kernels")


def _reference(q, store, pos, n, start, scale, window, k_new, v_new, sinks, ring):
    """The Python path's arithmetic: dequantize slots [0, n), append the new keys, mask by position, SDPA in fp32."""
    B, H, T, _ = q.shape
    ck, cv = (x.float() for x in store.read(n, B))
    kpos = pos[:B, :, :n]
    if k_new is not None:
        ck, cv = torch.cat([ck, k_new.float()], 2), torch.cat([cv, v_new.float()], 2)
        new = torch.arange(start, start + k_new.shape[2], dtype=torch.int32)
        kpos = torch.cat([kpos, new.expand(B, kpos.shape[1], -1)], 2)
    qpos = torch.arange(start, start + T)[:, None]
    kp = kpos[:, :, None]
    mask = (kp <= qpos) & (kp >= 0)
    if window:
        mask &= kp > qpos - window
    if ring >= 0:
        mask &= (kp >= start - ring) | (kp < sinks)
    G = H // ck.shape[1]
    mask = mask.repeat_interleave(G, 1) if mask.shape[1] > 1 else mask
    return F.scaled_dot_product_attention(q.float(), ck, cv, attn_mask=mask, scale=scale, enable_gqa=G > 1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(14, 2, 64), (9, 3, 64), (4, 1, 256), (2, 2, 32)])
@pytest.mark.parametrize("T", [1, 5, 16])
def test_kernel_matches_dequantized_reference(bits, heads, kv_heads, head_dim, T):
    """GQA groups, 1..16 new positions, odd cache lengths, an empty slot, a layer window, a sinks + ring
    window, with and without not-yet-stored new keys, per-head positions; fp32 and bf16 queries."""
    g = torch.Generator().manual_seed(bits * 1000 + heads * 10 + T)
    B, S = 2, 700
    store = KVStore(B, kv_heads, S, head_dim, torch.float32, bits=bits)
    shape = (B, kv_heads, S, head_dim)
    store.write(0, torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g))
    for n in (37, 613):
        start = n + 2  # two positions never stored
        pos = torch.arange(S, dtype=torch.int32).view(1, 1, S).repeat(B, kv_heads, 1)
        pos[:, 0, n - 5] = -1  # an empty slot in one head
        pos[1, -1] = torch.randperm(S, generator=g).to(torch.int32)  # slots out of position order
        pos[1, -1][pos[1, -1] >= start] = -1
        for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
            q = torch.randn(B, heads, T, head_dim, generator=g).to(dtype)
            kn, vn = (torch.randn(B, kv_heads, T, head_dim, generator=g).to(dtype) for _ in range(2))
            for window, sinks, ring, new in ((0, 0, -1, True), (0, 0, -1, False), (7, 0, -1, True), (0, 4, 20, True)):
                args = (n, start, 0.125, window, kn if new else None, vn if new else None, sinks, ring)
                got = ops.attend_kvquant(q, store, pos.contiguous(), *args)
                ref = _reference(q, store, pos, *args)
                assert got.dtype == dtype and got.shape == q.shape
                err = (got.float() - ref).abs().max().item()
                assert err <= tol, (n, dtype, window, sinks, ring, new, err)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_kernel_reads_an_unquantized_store(dtype, tol):
    """A store kept in q's dtype (bits None: a bf16 sinks + window ring) goes through the same kernel, bits 16."""
    g = torch.Generator().manual_seed(5)
    B, Hkv, S, D = 2, 2, 300, 64
    store = KVStore(B, Hkv, S, D, dtype)
    store.write(0, (torch.randn(B, Hkv, S, D, generator=g) * 2).to(dtype), torch.randn(B, Hkv, S, D, generator=g).to(dtype))
    assert store.kernel_buffers()[1] == 16
    n, start = 250, 252
    pos = torch.arange(S, dtype=torch.int32).view(1, 1, S).repeat(B, 1, 1).contiguous()
    q = torch.randn(B, 14, 3, D, generator=g).to(dtype)
    kn, vn = (torch.randn(B, Hkv, 3, D, generator=g).to(dtype) for _ in range(2))
    for window, sinks, ring in ((0, 0, -1), (9, 0, -1), (0, 4, 30)):
        args = (n, start, 0.125, window, kn, vn, sinks, ring)
        got = ops.attend_kvquant(q, store, pos, *args)
        assert (got.float() - _reference(q, store, pos, *args)).abs().max().item() <= tol
    with pytest.raises(RuntimeError, match="code layout"):  # an unquantized store must be in q's dtype
        ops.attend_kvquant(q.float() if dtype == torch.bfloat16 else q.bfloat16(), store, pos, n, start, 0.125)


def test_kernel_splits_long_caches_across_threads():
    """One KV head and a long cache: the keys are split into blocks whose partial softmaxes are merged."""
    g = torch.Generator().manual_seed(7)
    store = KVStore(1, 1, 5000, 64, torch.float32, bits=8)
    store.write(0, torch.randn(1, 1, 5000, 64, generator=g) * 3, torch.randn(1, 1, 5000, 64, generator=g))
    pos = torch.arange(5000, dtype=torch.int32).view(1, 1, -1).contiguous()
    q = torch.randn(1, 4, 1, 64, generator=g)
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(ops.attend_kvquant(q, store, pos, 4999, 4999, 0.125))
    finally:
        torch.set_num_threads(old)
    ref = _reference(q, store, pos, 4999, 4999, 0.125, 0, None, None, 0, -1)
    assert all((o - ref).abs().max() <= 2e-5 for o in outs)


@pytest.fixture(scope="module")
def head32_dir(tmp_path_factory):
    """A tiny Llama with head_dim 32 (the int4 kernel's smallest head) and GQA 6 / 2."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=32, max_position_embeddings=256)  # fmt: skip
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    d = tmp_path_factory.mktemp("head32")
    hf.save_pretrained(d, safe_serialization=True)
    make_word_tokenizer().save_pretrained(d)
    return d


def _count(monkeypatch) -> dict:
    """Rows of each call of the two kernels, by name (the fused step's whole block, or the policy's attention)."""
    calls = {"attend_kvquant": [], "decode_layer_kvquant": []}
    for name, rows in calls.items():
        fn = getattr(ops, name)

        def counting(*a, _fn=fn, _rows=rows, _name=name, **k):
            _rows.append(a[0].shape[2] if _name == "attend_kvquant" else a[0].shape[0])
            return _fn(*a, **k)

        monkeypatch.setattr(ops, name, counting)
    return calls


def _run(model, tokens, spec, chunk, native, fused=True):
    """Prefill in chunks of `chunk`, then decode one token at a time; logits of every position."""
    PolicyCache.native_kvquant = native
    model.fused_decode = fused
    try:
        model.setup_cache(1, tokens.shape[1], cache_cls=KVPolicy.parse(spec))
        with torch.inference_mode():
            outs = [model(tokens[:, s : s + chunk], start=s)[0] for s in range(0, 20, chunk)]
            outs += [model(tokens[:, p : p + 1], start=p)[0] for p in range(20, tokens.shape[1])]
        model.clear_cache()
        return torch.cat(outs)
    finally:
        PolicyCache.native_kvquant = True
        model.fused_decode = True


@pytest.mark.parametrize("spec", ["int8", "int4", "sinks:2,window:9,int8", "sinks:2,window:9,int4", "sinks:2,window:9"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.05)])
def test_tiny_model_native_equals_python_path(spec, dtype, tol, head32_dir, monkeypatch):
    """Chunked prefill (chunks of 5 <= 16 rows) and decode through the kernel give the reference path's logits,
    inside the fused decode step (the block's glue in C++, the policy's attention between) and outside it."""
    model = load_model(head32_dir, dtype=dtype)
    tokens = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(8))
    ref = _run(model, tokens, spec, 5, native=False, fused=False).float()
    for fused in (True, False):
        calls = _count(monkeypatch)
        got = _run(model, tokens, spec, 5, native=True, fused=fused).float()
        rows = calls["decode_layer_kvquant" if fused else "attend_kvquant"]
        assert len(rows) == 2 * (4 + 20) and set(rows) == {5, 1}  # every layer, every forward
        if dtype == "float32":
            assert (got - ref).abs().max().item() <= tol
        else:  # the reference rounds dequantized keys to bf16; the kernel keeps them exact
            assert (got.softmax(-1) - ref.softmax(-1)).abs().max().item() <= tol


def test_fused_step_runs_whole_blocks_with_a_quantized_cache(head32_dir, monkeypatch):
    """With an int8 cache every forward of <= 16 rows runs each block as one C++ call (decode_layer_kvquant): RoPE,
    the quantized write and the attention on the codes inside, no Python attention; where a linear does not answer
    the fused protocol (a hook) the block runs its glue in C++ around the policy's attention (attend_kvquant)."""
    from leanlm.model import runtime

    model = load_model(head32_dir)
    tokens = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(9))
    forwards = []
    orig = runtime.Attention.forward
    monkeypatch.setattr(runtime.Attention, "forward", lambda *a: forwards.append(1) or orig(*a))
    calls = _count(monkeypatch)
    ref = _run(model, tokens, "int8", 5, native=False, fused=False)
    forwards.clear()
    a = _run(model, tokens, "int8", 5, native=True, fused=True)
    steps = 4 + 4  # 4 chunks of 5 rows, 4 decode steps
    assert len(calls["decode_layer_kvquant"]) == 2 * steps and not forwards and not calls["attend_kvquant"]
    handle = model.layers[0].attn.wo.register_forward_hook(lambda *args: None)
    try:
        b = _run(model, tokens, "int8", 5, native=True, fused=True)
    finally:
        handle.remove()
    assert len(forwards) == steps and len(calls["attend_kvquant"]) == steps
    assert (a - ref).abs().max().item() <= 1e-4 and (b - ref).abs().max().item() <= 1e-4


def test_window_larger_than_sequence_is_exact_int8_attention(tiny_dirs):
    """On the tiny Gemma-3 (layer sliding windows, head_dim 8) a sinks + window policy with room for every token
    equals the full int8 cache through the kernel."""
    model = load_model(tiny_dirs["gemma3"])
    tokens = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(10))
    a = _run(model, tokens, "int8", 4, native=True)
    b = _run(model, tokens, "sinks:4,window:64,int8", 4, native=True)
    c = _run(model, tokens, "int8", 4, native=False, fused=False)
    assert (a - b).abs().max().item() <= 1e-5 and (a - c).abs().max().item() <= 1e-4


@pytest.mark.real_model
@needs_smollm2
def test_smollm2_int8_kv_greedy_close_to_bf16_cache():
    """SmolLM2-135M in bf16, greedy: the int8 KV cache through the kernel follows the plain bf16 cache's tokens
    (int8 rounding may flip a late near-tie). The Python reference is not asserted on here: in bf16 it rounds the
    dequantized keys to bf16 and its tokens left the plain cache's earlier (at token 16 of 40, where the kernel's
    matched all 40); the fp32 equality with it is tested on the tiny models above."""
    from leanlm import load
    from leanlm.decode.generate import generate_tokens

    model, tok = load("smollm2-135m", dtype="bfloat16")
    ids = tok("The history of the printing press begins", add_special_tokens=False).input_ids
    gen = lambda kv: list(generate_tokens(model, ids, 40, eos_ids=set(), kv=kv))  # noqa: E731
    base = gen(None)
    got = gen(KVPolicy.parse("int8"))
    first_diff = next((i for i, (x, y) in enumerate(zip(base, got)) if x != y), len(base))
    assert first_diff >= 24, (base, got)


def test_batch_of_two_through_the_fused_block(head32_dir):
    """Two sequences share one quantized cache (one position for both): the fused block equals the reference."""
    model = load_model(head32_dir)
    tokens = torch.randint(0, 97, (2, 26), generator=torch.Generator().manual_seed(11))
    out = {}
    for native in (True, False):
        PolicyCache.native_kvquant = native
        model.fused_decode = native
        try:
            model.setup_cache(2, 26, cache_cls=KVPolicy.parse("sinks:2,window:9,int4"))
            with torch.inference_mode():
                steps = [model(tokens[:, :6], start=0)] + [model(tokens[:, p : p + 1], start=p) for p in range(6, 26)]
            out[native] = torch.cat(steps, 1)
        finally:
            PolicyCache.native_kvquant = True
            model.fused_decode = True
            model.clear_cache()
    assert (out[True] - out[False]).abs().max().item() <= 1e-4
