"""Query-aware sparse attention at decode (leanlm.attention.sparse): Quest pages and top-k keys."""

import math

import pytest
import torch
from conftest import DATA, needs_smollm2

import leanlm
from leanlm import ops
from leanlm.attention import KVPolicy, SparseCache, SparsePolicy, sparse_reference
from leanlm.decode.generate import generate_tokens
from leanlm.errors import LeanlmError
from leanlm.hardware import HardwareProfile, Plan, estimate
from leanlm.model import load_model
from leanlm.model.config import ModelConfig

TOL = 1e-4
needs_native = pytest.mark.skipif(not ops.available(), reason="leanlm's native kernels did not build")


def _chunked(model, tokens, policy, chunks):
    """Logits of tokens fed through a fresh cache in chunks of the given sizes (the last one repeats)."""
    L = tokens.shape[1]
    model.setup_cache(1, L, cache_cls=policy)
    outs, s, i = [], 0, 0
    while s < L:
        n = chunks[min(i, len(chunks) - 1)]
        outs.append(model(tokens[:, s : s + n], start=s)[0])
        s, i = s + n, i + 1
    return torch.cat(outs)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("spec", ["quest:pages=64,page=4", "topk:keys=512"])
@pytest.mark.parametrize("fused", [True, False])
def test_budget_covering_the_context_is_full_attention(arch, spec, fused, tiny_dirs):
    """GQA (6 q / 2 kv heads), Gemma's sliding-window layers and QK-norm: decode steps (T=1), small chunks
    (T=5, the sparse path) and a prefill chunk (T=20, full attention) all equal full attention, through the
    fused step and through the Python attention."""
    model = load_model(tiny_dirs[arch])
    model.fused_decode = fused
    tokens = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    pol = KVPolicy.parse(spec)
    assert isinstance(pol, SparsePolicy)
    with torch.inference_mode():
        full = model(tokens)[0]
        for chunks in ([1], [5], [20, 1], [20, 3, 5]):
            assert (_chunked(model, tokens, pol, chunks) - full).abs().max().item() <= TOL, chunks


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,budget,page", [(0, 3, 8), (0, 5, 4), (1, 17, 1), (1, 60, 1)])
@pytest.mark.parametrize("window", [0, 50])
def test_kernel_matches_reference(dtype, mode, budget, page, window):
    """ops.sparse_attention (C++) == sparse_reference (torch) with budgets far below the context, T = 1 and 4,
    batch 2, GQA groups of 3, with and without a sliding window."""
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, D, L, n = 2, 6, 2, 16, 160, 150
    pol = SparsePolicy(method="quest" if mode == 0 else "topk", pages=budget, page=page, keys=budget)
    c = SparseCache(pol.validate(), B, Hkv, L, D, dtype)
    c.k[:, :, :n] = torch.randn(B, Hkv, n, D, generator=g).to(dtype)
    c.v[:, :, :n] = torch.randn(B, Hkv, n, D, generator=g).to(dtype)
    if mode == 0:
        c.update_bounds(0, n, B)
    for T in (1, 4):
        start = n - T
        q = torch.randn(B, H, T, D, generator=g).to(dtype)
        args = (c.kmin, c.kmax, start, window, 0.25, mode, budget, page, 1)
        got = ops.sparse_attention(q, c.k, c.v, *args).view(B, T, H, D).transpose(1, 2)
        ref = sparse_reference(q, c.k, c.v, *args)
        assert (got.float() - ref.float()).abs().max().item() <= (1e-5 if dtype == torch.float32 else 1e-2)


def _attend_over(q, k, v, idx, scale):
    """softmax over keys idx of one head: q [D], k / v [S, D]."""
    p = torch.softmax((k[idx] @ q) * scale, 0)
    return p @ v[idx]


@pytest.mark.parametrize("native", [True, False])
def test_topk_attends_over_the_true_top_keys(native):
    """One head per group: the kept keys are exactly torch.topk of the logits, and the output is the softmax over
    those only (not full attention)."""
    if native and not ops.available():
        pytest.skip("native kernels unavailable")
    g = torch.Generator().manual_seed(2)
    B, H, D, S, keys = 1, 2, 16, 90, 10
    c = SparseCache(SparsePolicy(method="topk", keys=keys), B, H, S, D, torch.float32)
    c.k.copy_(torch.randn(B, H, S, D, generator=g))
    c.v.copy_(torch.randn(B, H, S, D, generator=g))
    q = torch.randn(B, H, 1, D, generator=g)
    args = (c.kmin, c.kmax, S - 1, 0, 0.3, 1, keys, 1, 0)
    out = (ops.sparse_attention(q, c.k, c.v, *args).view(B, 1, H, D).transpose(1, 2) if native
           else sparse_reference(q, c.k, c.v, *args))  # fmt: skip
    for h in range(H):
        top = torch.topk(c.k[0, h] @ q[0, h, 0], keys).indices
        want = _attend_over(q[0, h, 0], c.k[0, h], c.v[0, h], top, 0.3)
        assert (out[0, h, 0] - want).abs().max().item() <= 1e-5
        full = _attend_over(q[0, h, 0], c.k[0, h], c.v[0, h], torch.arange(S), 0.3)
        assert (out[0, h, 0] - full).abs().max().item() > 1e-3  # really sparse


@pytest.mark.parametrize("native", [True, False])
def test_quest_picks_the_page_with_the_highest_bound(native):
    """pages=3 keeps the sink page, the newest page and the one page whose keys align with the query."""
    if native and not ops.available():
        pytest.skip("native kernels unavailable")
    g = torch.Generator().manual_seed(3)
    D, P, S = 16, 8, 80  # 10 pages; the query at position 79 is in page 9
    c = SparseCache(SparsePolicy(method="quest", pages=3, page=P), 1, 1, S, D, torch.float32)
    q = torch.randn(1, 1, 1, D, generator=g)
    c.k.copy_(torch.randn(1, 1, S, D, generator=g) * 0.1)
    c.k[0, 0, 5 * P : 6 * P] += 2 * q[0, 0, 0]  # page 5 matches the query
    c.v.copy_(torch.randn(1, 1, S, D, generator=g))
    c.update_bounds(0, S, 1)
    args = (c.kmin, c.kmax, S - 1, 0, 0.25, 0, 3, P, 1)
    out = (ops.sparse_attention(q, c.k, c.v, *args).view(1, 1, 1, D) if native
           else sparse_reference(q, c.k, c.v, *args))  # fmt: skip
    idx = torch.cat([torch.arange(0, P), torch.arange(5 * P, 6 * P), torch.arange(9 * P, S)])
    want = _attend_over(q[0, 0, 0], c.k[0, 0], c.v[0, 0], idx, 0.25)
    assert (out[0, 0, 0] - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("fused", [True, False])
def test_page_bounds_follow_appends(fused, tiny_dirs):
    """After a prefill, a chunk at start > 0 (T=20, full attention), small chunks and decode steps, every written
    page's bounds are the elementwise min / max of its keys so far."""
    model = load_model(tiny_dirs["llama"])
    model.fused_decode = fused
    tokens = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(4))
    P = 8
    with torch.inference_mode():
        model.setup_cache(1, 64, cache_cls=KVPolicy.parse(f"quest:pages=3,page={P}"))
        s = 0
        for n in (13, 20, 3, 1, 1, 5, 1, 15, 1):
            model(tokens[:, s : s + n], start=s)
            s += n
            for layer in model.layers:
                c = layer.attn.cache
                for p in range(math.ceil(s / P)):
                    keys = c.k[0, :, p * P : min(s, p * P + P)].float()
                    assert torch.equal(c.kmin[0, :, p], keys.amin(1)) and torch.equal(c.kmax[0, :, p], keys.amax(1))


@needs_native
def test_sparse_decode_stays_one_fused_call(tiny_dirs, monkeypatch):
    """The fused decode step runs a block with a sparse cache through ops.decode_layer_sparse (not the Python
    attention), and gives the same logits as the Python path."""
    model = load_model(tiny_dirs["qwen2"])
    tokens = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(5))
    pol = KVPolicy.parse("quest:pages=3,page=4")
    calls = []
    real = ops.decode_layer_sparse
    monkeypatch.setattr(ops, "decode_layer_sparse", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        fused = _chunked(model, tokens, pol, [12, 1])
        model.fused_decode = False
        plain = _chunked(model, tokens, pol, [12, 1])
    assert len(calls) == 19 * len(model.layers)  # the 12-token chunk and 18 steps
    assert (fused - plain).abs().max().item() <= TOL


def test_generation_through_apply(tiny_dirs):
    """leanlm.apply records the policy (model_policy rebuilds it from model.applied, as load does); generate_tokens
    builds its cache from it and, with a covering budget, gives the full cache's greedy tokens."""
    model = load_model(tiny_dirs["llama"])
    prompt = torch.randint(3, 97, (30,), generator=torch.Generator().manual_seed(6)).tolist()
    want = list(generate_tokens(model, prompt, 12, eos_ids=set()))
    leanlm.apply(model, KVPolicy.parse("quest:pages=16,page=4"))
    assert list(generate_tokens(model, prompt, 12, eos_ids=set())) == want
    seen = []
    orig = SparseCache.attend
    SparseCache.attend = lambda self, *a: seen.append(1) or orig(self, *a)
    try:
        model.fused_decode = False
        list(generate_tokens(model, prompt, 3, eos_ids=set()))
    finally:
        SparseCache.attend = orig
        model.fused_decode = True
    assert seen
    from leanlm.attention.policies import model_policy

    pol = model_policy(model)
    assert isinstance(pol, SparsePolicy) and pol.describe() == "quest:pages=16,page=4,sinks=1"
    leanlm.apply(model, KVPolicy.parse("topk:keys=64"))
    assert list(generate_tokens(model, prompt, 12, eos_ids=set())) == want


@pytest.mark.parametrize("spec,want", [
    ("quest", "quest:pages=64,page=16,sinks=1"), ("quest:32", "quest:pages=32,page=16,sinks=1"),
    ("quest:pages=8,page=32,sinks=2", "quest:pages=8,page=32,sinks=2"), ("quest,pages:8,page:4", "quest:pages=8,page=4,sinks=1"),
    ("topk", "topk:keys=1024"), ("topk:256", "topk:keys=256"), ("topk:keys=2048", "topk:keys=2048"),
])  # fmt: skip
def test_parse(spec, want):
    pol = KVPolicy.parse(spec)
    assert isinstance(pol, SparsePolicy) and pol.describe() == want
    assert KVPolicy.parse(pol.describe()) == pol


@pytest.mark.parametrize("spec,fix", [
    ("quest:pages=1", "pages >= 3"), ("quest:pages=2,sinks=1", "pages >= 3"), ("quest:page=0", "page=16"),
    ("topk:keys=0", "topk:keys=1024"), ("quest,int8", "does not combine"), ("quest,window:64", "does not combine"),
    ("quest,topk", "keep one"), ("topk,pages=3", "quest settings"), ("quest,keys=10", "topk setting"),
    ("quest:bogus=3", "unknown --kv item"), ("quest:x", "bad --kv item"), ("quest,page", "needs a number"),
])  # fmt: skip
def test_parse_errors_name_the_fix(spec, fix):
    with pytest.raises(LeanlmError, match=fix):
        KVPolicy.parse(spec)


def test_cost_model_prices_keys_read():
    """At 8k context quest reads 1024 of 8192 keys plus its bounds, topk every K row and 1024 V rows."""
    from conftest import make_tiny_hf

    cfg = ModelConfig.from_hf(make_tiny_hf("llama").config)
    hw = HardwareProfile("toy", mem_bw_gbs=100, peak_tflops={"fp32": 1.0}, mem_gb=1, bw_efficiency=1.0,
                         compute_efficiency=1.0)  # fmt: skip

    def plan(spec):
        p = Plan()
        if spec:
            KVPolicy.parse(spec).price(p)
        return p

    from leanlm.hardware import forward_cost

    def att_bytes(spec):
        return next(o.bytes for o in forward_cost(cfg, hw, plan(spec), 1, 1, 8192, False) if o.name.endswith("sdpa"))

    row = 2 * 8 * 4  # kv heads x head dim x fp32 bytes
    act = (48 + 2 * 16) * 4
    assert att_bytes(None) == 8192 * 2 * row + act
    assert att_bytes("quest:pages=64,page=16") == (2 * 1024 + 8192 * 4 / 16) * row + act
    assert att_bytes("topk:keys=1024") == (2 * 1024 + 8192) * row + act
    fast = estimate(cfg, hw, plan("quest:pages=64,page=16"), context=8192)
    slow = estimate(cfg, hw, plan(None), context=8192)
    assert fast["decode_tok_s"] > slow["decode_tok_s"] and fast["memory_gb"] == slow["memory_gb"]


@needs_smollm2
@pytest.mark.real_model
def test_smollm2_quest_close_to_full(smollm2):
    """SmolLM2-135M at ~1k context: quest keeping 48 of 64 pages gives full attention's greedy tokens, and
    policy-aware perplexity (16-token chunks: every query selects its pages) stays within 2% of full."""
    from leanlm.attention.longctx import policy_perplexity

    model, tok = smollm2
    text = (DATA / "gutenberg" / "pg1342.txt").read_text(encoding="utf-8")
    if not text:
        pytest.skip("Gutenberg text missing")
    prompt = tok(text[20000:26000]).input_ids[:1000]
    pol = KVPolicy.parse("quest:pages=48,page=16")
    full = list(generate_tokens(model, prompt, 16, eos_ids=set(), kv=KVPolicy.parse("full")))
    assert list(generate_tokens(model, prompt, 16, eos_ids=set(), kv=pol)) == full
    ref = policy_perplexity(model, tok, text, 1024, 1, None, chunk=16)
    got = policy_perplexity(model, tok, text, 1024, 1, KVPolicy.parse("quest:pages=16,page=16"), chunk=16)
    assert got["tokens"] == ref["tokens"]
    assert abs(got["ppl"] / ref["ppl"] - 1) <= 0.02
    assert got["ppl"] != ref["ppl"]  # 16 of up to 64 pages: really sparse
