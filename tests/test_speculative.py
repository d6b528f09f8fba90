"""Speculative decoding is exact: greedy output equals plain greedy token for token, sampled
tokens follow the target's distribution (chi-square), and rolled-back caches equal a fresh
prefill of the accepted tokens."""

import json
import math

import pytest
import torch
from conftest import make_tiny_hf, needs_smollm2

from leanlm.decode.drafts import Draft, EarlyExitDraft, LookupDraft, ModelDraft
from leanlm.decode.generate import GenerationStats, Sampling, filtered_probs, generate_tokens
from leanlm.decode.kernels import PackedLinear, pack_model, packing_supported, unpack_model
from leanlm.decode.speculative import AdaptiveGamma, make_draft, speculative_generate_tokens
from leanlm.model import load_model

PROMPT = [5, 17, 3, 44, 2, 9, 5, 17, 3, 44]  # a repeat, so prompt lookup finds matches


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """A second random llama with the same vocabulary: a draft that disagrees with the target."""
    d = tmp_path_factory.mktemp("llama_other")
    make_tiny_hf("llama", seed=1).save_pretrained(d, safe_serialization=True)
    return d


def drafts_for(d, bf16, other):
    return {
        "lookup": lambda: LookupDraft(),
        "self": lambda: EarlyExitDraft(1),
        "self-threshold": lambda: EarlyExitDraft(2, threshold=0.3),
        "bf16": lambda: ModelDraft(bf16),
        "bf16-sync": lambda: ModelDraft(bf16, sync_kv=True),
        "lookup+bf16-sync": lambda: LookupDraft(fallback=ModelDraft(bf16, sync_kv=True)),
        "other": lambda: ModelDraft(other),
        "lookup+self": lambda: LookupDraft(fallback=EarlyExitDraft(1)),
        "lookup+other": lambda: LookupDraft(fallback=ModelDraft(other), fallback_below=1),
    }


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_greedy_identical_for_every_draft_and_gamma(arch, tiny_dirs, other_dir):
    target = load_model(tiny_dirs[arch])
    bf16 = load_model(tiny_dirs[arch], "bfloat16")
    other = load_model(other_dir) if arch == "llama" else bf16
    ref = list(generate_tokens(target, PROMPT, 30, eos_ids=set()))
    accepted_any = False
    for name, make in drafts_for(tiny_dirs[arch], bf16, other).items():
        for gamma in (1, 4, "auto") if arch == "llama" else (3, "auto"):
            st = GenerationStats()
            out = list(speculative_generate_tokens(target, PROMPT, 30, eos_ids=set(), stats=st, draft=make(), gamma=gamma))
            assert out == ref, (name, gamma)
            s = st.extra["speculative"].summary()
            assert s["drafted"] > 0 or name.startswith("lookup"), (name, gamma)
            accepted_any |= s["accepted"] > 0
            assert target.layers[0].attn.cache is None  # caches released
    assert accepted_any


def test_greedy_identical_with_packed_kernels_and_eos(tiny_dirs, other_dir):
    if not packing_supported():
        pytest.skip("oneDNN packed fp32 weights unavailable")
    plain = load_model(tiny_dirs["qwen2"])  # qkv bias
    packed = load_model(tiny_dirs["qwen2"])
    assert pack_model(packed) == 3 * 4
    ref = list(generate_tokens(plain, PROMPT, 30, eos_ids=set()))
    for make in (lambda: LookupDraft(), lambda: EarlyExitDraft(2), lambda: Draft()):
        assert list(speculative_generate_tokens(packed, PROMPT, 30, eos_ids=set(), draft=make(), gamma=3)) == ref
    # stops at EOS inside an accepted run, like plain decoding
    eos = ref[7]
    st = GenerationStats()
    out = list(speculative_generate_tokens(packed, PROMPT, 30, eos_ids={eos}, stats=st, draft=LookupDraft(), gamma=4))
    assert out == ref[: ref.index(eos) + 1] and st.stop_reason == "eos"
    # unpacking restores the exact weights
    assert unpack_model(packed) == 12
    for a, b in zip(plain.parameters(), packed.parameters()):
        assert torch.equal(a, b)


def test_packed_linear_matches_linear():
    if not packing_supported():
        pytest.skip("oneDNN packed fp32 weights unavailable")
    lin = torch.nn.Linear(48, 80)
    p = PackedLinear(lin.weight, lin.bias)
    for rows in (1, 2, 5, 9):
        x = torch.randn(1, rows, 48)
        torch.testing.assert_close(p(x), lin(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(p.dense_weight(), lin.weight)


class SnapshotDraft(ModelDraft):
    """Records the target's and the draft's caches right after every rollback."""

    def __init__(self, model, sync_kv=False):
        super().__init__(model, sync_kv=sync_kv)
        self.snaps = []

    def rollback(self, valid):
        super().rollback(valid)
        tm = self.target.model
        target_kv = [(l.attn.cache.k.clone(), l.attn.cache.v.clone()) for l in tm.layers]
        draft_kv = [(l.attn.cache.k.clone(), l.attn.cache.v.clone()) for l in self.model.layers]
        self.snaps.append((valid, target_kv, self.valid, draft_kv))


def fresh_cache(model, tokens):
    model.setup_cache(1, len(tokens))
    with torch.inference_mode():
        model(torch.tensor([tokens]), start=0)
    kv = [(l.attn.cache.k.clone(), l.attn.cache.v.clone()) for l in model.layers]
    model.clear_cache()
    return kv


def test_rollback_leaves_cache_equal_to_fresh_prefill(tiny_dirs, other_dir):
    target, other = load_model(tiny_dirs["llama"]), load_model(other_dir)
    draft = SnapshotDraft(other)
    out = list(speculative_generate_tokens(target, PROMPT, 24, eos_ids=set(), draft=draft, gamma=4))
    seq = PROMPT + out
    rejected = 0
    for valid, target_kv, dvalid, draft_kv in draft.snaps:
        for (k, v), (fk, fv) in zip(target_kv, fresh_cache(target, seq[:valid])):
            torch.testing.assert_close(k[:, :, :valid], fk, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v[:, :, :valid], fv, rtol=1e-5, atol=1e-5)
            rejected += int(k[:, :, valid:].abs().sum() > 0)  # stale entries from rejected drafts lie beyond
        for (k, v), (fk, fv) in zip(draft_kv, fresh_cache(other, seq[:dvalid])):
            torch.testing.assert_close(k[:, :, :dvalid], fk, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v[:, :, :dvalid], fv, rtol=1e-5, atol=1e-5)
    assert len(draft.snaps) >= 5 and rejected > 0


def test_synced_draft_cache_is_the_targets(tiny_dirs):
    """A compressed copy with sync_kv holds the target's keys/values (cast) for committed positions."""
    target, bf16 = load_model(tiny_dirs["mistral"]), load_model(tiny_dirs["mistral"], "bfloat16")
    draft = SnapshotDraft(bf16, sync_kv=True)
    ref = list(generate_tokens(target, PROMPT, 24, eos_ids=set()))
    assert list(speculative_generate_tokens(target, PROMPT, 24, eos_ids=set(), draft=draft, gamma=4)) == ref
    for valid, target_kv, dvalid, draft_kv in draft.snaps:
        assert dvalid <= valid
        for (k, v), (dk, dv) in zip(target_kv, draft_kv):
            assert torch.equal(dk[:, :, :dvalid], k[:, :, :dvalid].to(torch.bfloat16))
            assert torch.equal(dv[:, :, :dvalid], v[:, :, :dvalid].to(torch.bfloat16))


def test_self_draft_shares_the_target_cache(tiny_dirs):
    """The early-exit draft writes the target's first layers; after rollback they equal a fresh prefill."""
    target = load_model(tiny_dirs["gemma3"])  # sliding-window and global layers
    snaps = []

    class Spy(EarlyExitDraft):
        def rollback(self, valid):
            snaps.append((valid, [(l.attn.cache.k.clone(), l.attn.cache.v.clone()) for l in target.layers]))

    out = list(speculative_generate_tokens(target, PROMPT, 20, eos_ids=set(), draft=Spy(2), gamma=3))
    seq = PROMPT + out
    for valid, kv in snaps:
        for (k, v), (fk, fv) in zip(kv, fresh_cache(target, seq[:valid])):
            torch.testing.assert_close(k[:, :, :valid], fk, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v[:, :, :valid], fv, rtol=1e-5, atol=1e-5)


# ---- sampling: the output distribution is the target's ---------------------------------------
def exact_marginals(model, prompt, s: Sampling):
    """Exact distributions of new tokens 2 and 3 (the first two that speculation produces)."""
    with torch.inference_mode():
        p1 = filtered_probs(model(torch.tensor([prompt]))[0, -1], s)
        t1 = p1.nonzero().flatten()
        seq2 = torch.tensor([prompt + [int(a)] for a in t1])
        p2_given = filtered_probs(model(seq2)[:, -1], s)  # [n1, V]
        p2 = p1[t1] @ p2_given
        pairs = [(i, int(b)) for i in range(len(t1)) for b in p2_given[i].nonzero().flatten()]
        seq3 = torch.tensor([prompt + [int(t1[i]), b] for i, b in pairs])
        p3_given = filtered_probs(model(seq3)[:, -1], s)
        w = torch.tensor([float(p1[t1[i]] * p2_given[i, b]) for i, b in pairs])
        p3 = w @ p3_given
    return p2, p3


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    from scipy.stats import chisquare

    n = counts.sum()
    exp = probs * n
    big = exp >= 5  # pool rare cells into one
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    e = torch.cat([exp[big], exp[~big].sum().view(1)])
    obs, e = obs.double().numpy(), e.double().numpy()
    if e[-1] < 1e-9:
        obs, e = obs[:-1], e[:-1]
    return float(chisquare(obs, e * obs.sum() / e.sum()).pvalue)


@pytest.mark.parametrize("kind", ["draft", "lookup"])
def test_sampling_matches_target_distribution(kind, tiny_dirs, other_dir):
    target, other = load_model(tiny_dirs["llama"]), load_model(other_dir)
    s0 = Sampling(temperature=1.0, top_k=12)
    prompt = PROMPT
    p2, p3 = exact_marginals(target, prompt, s0)
    q2, q3 = exact_marginals(other, prompt, s0)
    assert 0.5 * (p2 - q2).abs().sum() > 0.3  # the draft really differs from the target
    runs, V = 300, p2.shape[0]
    c2, c3 = torch.zeros(V), torch.zeros(V)
    drafted = accepted = 0
    for seed in range(runs):
        draft = ModelDraft(other) if kind == "draft" else LookupDraft(max_ngram=1)
        st = GenerationStats()
        s = Sampling(temperature=1.0, top_k=12, seed=seed)
        out = list(speculative_generate_tokens(target, prompt, 4, s, eos_ids=set(), stats=st, draft=draft, gamma=2))
        c2[out[1]] += 1
        c3[out[2]] += 1
        drafted += st.extra["speculative"].drafted
        accepted += st.extra["speculative"].accepted
    assert 0 < accepted < drafted  # both acceptance and rejection paths ran
    assert chi2_pvalue(c2, p2) > 1e-3 and chi2_pvalue(c3, p3) > 1e-3
    if kind == "draft":  # the test has power: the draft's own distribution is rejected
        assert chi2_pvalue(c2, q2) < 1e-6


def test_acceptance_rule_reproduces_the_target_distribution():
    """The core rule alone, many trials: emitted tokens ~ p whatever the draft's q (or one-hot lookup)."""
    from leanlm.decode.speculative import accept_sampled

    g = torch.Generator().manual_seed(0)
    V, s = 12, Sampling(temperature=1.0)
    logits = torch.randn(3, V, generator=g) * 1.5  # target, positions 0..2
    p = torch.softmax(logits, -1)
    q = torch.softmax(torch.randn(2, V, generator=g) * 1.5, -1)  # a different draft
    for mode in ("draft", "lookup"):
        first, second = torch.zeros(V), torch.zeros(V)
        trials = 3000
        for _ in range(trials):
            if mode == "draft":
                d = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
                n, nxt = accept_sampled(d, q, logits, s, g)
            else:
                d = [3, 4]  # fixed point proposals
                n, nxt = accept_sampled(d, None, logits, s, g)
            out = d[:n] + [nxt]
            first[out[0]] += 1
            if n >= 1:  # the second token's law given the first: p[1] (logits do not depend on it here)
                second[out[1]] += 1
        assert chi2_pvalue(first, p[0]) > 1e-3, mode
        assert chi2_pvalue(second, p[1]) > 1e-3, mode
        if mode == "draft":
            assert chi2_pvalue(first, q[0]) < 1e-6  # power: the draft's own law is rejected


# ---- dynamic draft length -----------------------------------------------------------------
def test_adaptive_gamma_follows_acceptance_and_costs():
    good, bad = AdaptiveGamma(), AdaptiveGamma()
    for _ in range(30):
        g = good.next()
        good.update(g, g, g * 0.1, 1.0 + 0.1 * g)  # everything accepted, draft 10% of a step
        g = bad.next()
        bad.update(g, 0, g * 0.1, 1.0 + 0.1 * g)  # nothing accepted
    assert good.next() >= 6
    seen = [bad.next() for _ in range(16)]
    assert seen.count(0) >= 12 and 1 in seen  # speculation off, with occasional exploration
    costly = AdaptiveGamma()
    for _ in range(30):
        g = costly.next()
        costly.update(g, min(g, 2) if g else 0, g * 0.9, 1.0 + 0.1 * g)  # acceptance 2/3, draft ~ a step
    assert costly.next() <= 2


def test_adaptive_gamma_learns_each_context_and_a_staircase_verify_cost():
    pol = AdaptiveGamma(max_gamma=10)
    verify = lambda g: 1.0 if g <= 3 else 3.0  # noqa: E731  (rows in fours: a step up after 3 drafts)
    for _ in range(40):
        for ctx, ok in (("copying", True), ("free", False)):
            g = pol.next(ctx)
            pol.update(g, g if ok else 0, g * 0.01, verify(g), ctx)
    assert pol.next("copying") == 3  # a line through the costs would pick 10
    assert [pol.next("free") for _ in range(8)].count(0) >= 7  # (one round in 8 explores)
    assert pol.stats["copying"].draft_cost() == pytest.approx((0.0, 0.01), abs=1e-6)  # 0.01 per token, none per round
    split = AdaptiveGamma()  # a per-round draft cost (KV sync) is not charged per token
    for g in (2, 6) * 20:
        split.update(g, g, 0.5 + 0.1 * g, 1.0, "copy")
    c0, c1 = split.stats["copy"].draft_cost()
    assert c0 == pytest.approx(0.5, rel=0.05) and c1 == pytest.approx(0.1, rel=0.05)


def test_lookup_context_names_match_length_and_running_copy():
    d = LookupDraft()
    d.start(None, [], 0)
    seq = [1, 2, 3, 4, 5, 9, 1, 2, 3]
    assert d.context(seq) == ("lookup", 3, False)
    out, _ = d.propose(seq, 2, None, None)
    assert out == [4, 5]
    d.rollback(len(seq) + 2)  # both accepted
    assert d.context(seq + [4, 5, 9]) == ("lookup", 3, True)
    both = LookupDraft(fallback=Draft())
    both.start(None, [], 0)
    assert both.context([7, 8]) == ("model", None)  # no match: the model drafts


def test_adaptive_gamma_learns_bursty_acceptance_per_position():
    """A draft that, once right, stays right (a_1 = 0.6, then 0.98): the pooled geometric rate
    (~0.8) says short drafts; the per-position estimate sees the long runs and drafts long."""
    pol, rng = AdaptiveGamma(max_gamma=8), torch.Generator().manual_seed(0)
    gs = []
    for u in torch.rand(200, 2, generator=rng).tolist():
        g = max(pol.next(), 1)
        gs.append(g)
        n = 0 if u[0] >= 0.6 else min(g, 1 + int(math.log(u[1]) / math.log(0.98)))
        pol.update(g, n, 0.1 * g, 1.0 + 0.1 * g)
    a = pol.position_acceptance()
    assert a[0] < 0.8 and min(a[1:4]) > 0.85
    assert sum(gs[-50:]) / 50 >= 5.5


def test_adaptive_gamma_prices_an_untried_depth_like_the_one_before():
    """Drafts of 2 that, once the first is right, are always right: depths 3+ were never drafted.
    They are priced like depth 2 (~0.98), not at the pooled rate (~0.88), so that the policy tries
    longer drafts and learns them."""
    pol = AdaptiveGamma(max_gamma=8)
    for i in range(60):
        pol.update(2, 0 if i % 4 == 0 else 2, 0.0, 1.0)
    a = pol.position_acceptance()
    assert pol.acceptance() < 0.9 and a[1] > 0.95
    assert min(a[2:]) >= a[1]


def test_adaptive_gamma_carries_costs_and_some_acceptance_to_the_next_generation(tiny_dirs):
    model = load_model(tiny_dirs["llama"])
    first = AdaptiveGamma()
    list(speculative_generate_tokens(model, [5, 6, 7, 5, 6], 12, draft=LookupDraft(), gamma=first, eos_ids=set()))
    second = AdaptiveGamma()
    second.warm_start(model, "lookup")
    assert second.verify_s == first.verify_s and second.verify_s
    # acceptance carries over at half weight: between the prior (2/3) and what the first one learned
    fresh = AdaptiveGamma(carry=0.0)
    fresh.warm_start(model, "lookup")
    assert fresh.acceptance() == pytest.approx(2 / 3)
    learned = {k: first.acceptance(k) for k in first.stats}
    for k, a in learned.items():
        lo, hi = sorted((2 / 3, a))
        assert lo - 1e-9 <= second.acceptance(k) <= hi + 1e-9 and (a == pytest.approx(2 / 3) or second.acceptance(k) != pytest.approx(2 / 3))


def test_make_draft_kinds(tiny_dirs):
    target = load_model(tiny_dirs["llama"])
    assert isinstance(make_draft("lookup", target), LookupDraft)
    assert make_draft("self", target, layers=2).n_layers == 2
    assert make_draft("lookup+self", target).fallback.name == "self-bfloat16"
    assert make_draft("self", target).model.dtype == torch.bfloat16
    from leanlm import LeanlmError

    with pytest.raises(LeanlmError):
        make_draft("draft", target)
    with pytest.raises(LeanlmError):
        make_draft("medusa", target)
    with pytest.raises(LeanlmError):
        list(speculative_generate_tokens(target, PROMPT, 5, draft=make_draft("self", target, layers=3), gamma=2))


def test_cli_speculate(tiny_dirs, capsys):
    from leanlm.cli import main

    d = str(tiny_dirs["llama"])
    base = ["generate", d, "--prompt", "w1 w2 w3 w1 w2", "--no-chat", "--max-new-tokens", "12", "--json", "-"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    for extra in (["--speculate", "lookup", "--gamma", "auto"], ["--speculate", "self", "--draft-layers", "1"],
                  ["--speculate", "self", "--gamma", "3"], ["--speculate", "lookup+draft", "--draft", d]):  # fmt: skip
        assert main(base + extra) == 0, extra
        res = json.loads(capsys.readouterr().out)
        assert res["text"] == plain["text"], extra
        assert 0.0 <= res["speculative"]["acceptance_rate"] <= 1.0 and "mean_accepted" in res["speculative"]
    assert main(base + ["--speculate", "self", "--gamma", "x"]) == 2
    assert "gamma" in capsys.readouterr().err
    assert main(base + ["--speculate", "draft"]) == 2
    assert "--draft MODEL" in capsys.readouterr().err


@needs_smollm2
def test_smollm2_speculative_greedy_identical(smollm2):
    from leanlm import load
    from leanlm.decode.generate import encode_prompt

    model, tok = smollm2
    draft_bf16, _ = load("smollm2-135m", dtype="bfloat16")
    ids = encode_prompt(tok, "Summarize: The cat sat on the mat. The cat was happy because the mat was warm. "
                             "Then the dog came and the cat ran away from the mat.")  # fmt: skip
    ref = list(generate_tokens(model, ids, 20))
    for draft in (LookupDraft(), EarlyExitDraft(12), ModelDraft(draft_bf16, sync_kv=True)):
        st = GenerationStats()
        assert list(speculative_generate_tokens(model, ids, 20, stats=st, draft=draft, gamma=3)) == ref, draft.name
        if isinstance(draft, ModelDraft):  # a bf16 copy agrees with its fp32 target almost always
            assert st.extra["speculative"].summary()["acceptance_rate"] > 0.7


@pytest.mark.real_model
@needs_smollm2
def test_smollm2_speculative_greedy_identical_with_quantized_target(smollm2):
    """int8 target + int4 draft (alone and behind prompt lookup) reproduce the int8 target's plain greedy
    output token for token. A quantized model's embedding table is packed (its `weight` is an empty
    dtype probe), so the target's vocabulary must come from its config: it once read the weight's shape (0)."""
    from leanlm.decode.generate import encode_prompt
    from leanlm.quant import RTN, quantize

    _, tok = smollm2
    target = quantize(load_model("smollm2-135m"), RTN(bits=8, group=0), progress=False)  # RTN: no calibration
    draft_model = quantize(load_model("smollm2-135m"), RTN(bits=4, group=128), progress=False)
    ids = encode_prompt(tok, "The history of the city of Paris begins", chat=False)  # a continuation: no early end
    ref = list(generate_tokens(target, ids, 24))
    assert len(ref) >= 16  # several verification rounds before any end of text
    for kind in ("draft", "lookup+draft"):
        st = GenerationStats()
        draft = make_draft(kind, target, draft_model)
        assert list(speculative_generate_tokens(target, ids, 24, stats=st, draft=draft, gamma=3)) == ref, kind
        assert st.extra["speculative"].summary()["acceptance_rate"] > 0.3, kind  # the int4 draft mostly agrees
