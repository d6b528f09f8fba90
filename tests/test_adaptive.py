"""Adaptive computation on tiny random models: activation sparsity, early exit, layer skipping,
neuron-group routing, the FLOPs meter, spec parsing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import leanlm
from leanlm.adaptive import (
    ActivationSparsity,
    EarlyExit,
    LayerSkip,
    NeuronRouting,
    SparseInputLinear,
    apply_activation_sparsity,
    apply_early_exit,
    apply_layer_skip,
    apply_neuron_routing,
    meter,
    parse_adaptive,
)
from leanlm.adaptive.routing import RoutedMLP, balanced_kmeans
from leanlm.adaptive.sparsity import measured_sparsity
from leanlm.decode.generate import generate_tokens
from leanlm.errors import LeanlmError


def calib(n=8, T=48, seed=0, vocab=97):
    return torch.randint(3, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def threads_from_env():
    """conftest pins 2 threads; honour OMP_NUM_THREADS=1 here (tiny models gain nothing from more)."""
    import os

    old = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS") == "1":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():  # the models' rotary tables may come from inference mode (generate)
        yield


@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {a: leanlm.load(tiny_dirs[a])[0] for a in ("llama", "gemma3", "qwen2")}


def gen(model, prompt, n=8):
    return list(generate_tokens(model, prompt, n, eos_ids=set()))


@torch.no_grad()
def stepwise_logits(model, tokens, prefill=4):
    """Logits of every position computed through the KV cache: a prefill, then one token at a time."""
    T = tokens.shape[1]
    model.setup_cache(1, T)
    try:
        out = [model(tokens[:, :prefill], start=0)]
        for t in range(prefill, T):
            out.append(model(tokens[:, t : t + 1], start=t))
    finally:
        model.clear_cache()
    return torch.cat(out, 1)


# ---- activation sparsity ------------------------------------------------------------------
def _native_ok():
    from leanlm import ops

    return ops.available()


@pytest.mark.parametrize("kernel", ["bag", "dense", "dense_t", "native"])
def test_sparse_matmul_equals_dense_on_kept_inputs(kernel):
    if kernel == "native" and not _native_ok():
        pytest.skip("native sparse GEMV not built here (no compiler / AVX2)")
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(40, 64, generator=g), torch.randn(40, generator=g)  # 40 outputs: 8-aligned for native
    lin = SparseInputLinear(W, b, 0.7, kernel)
    for x in (torch.randn(1, 1, 64, generator=g), torch.randn(2, 5, 64, generator=g)):
        kept = x * (x.abs() > 0.7)
        assert (x.abs() <= 0.7).any() and (x.abs() > 0.7).any()
        torch.testing.assert_close(lin(x), F.linear(kept, W, b), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 1, 64, generator=g)
    lin(x)
    assert lin.last_flops == pytest.approx(float((x.abs() > 0.7).sum()) * 2 * 40)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_calibrated_thresholds_hit_sparsity(models, target):
    model = copy.deepcopy(models["llama"])
    tokens = calib()
    rep = apply_activation_sparsity(model, ActivationSparsity(target, ("mlp", "attn"), kernel="bag"), tokens,
                                    progress=False)  # fmt: skip
    assert len(rep["thresholds"]) == model.config.n_layers
    got = measured_sparsity(model, tokens)
    assert len(got) == 4 * model.config.n_layers
    # the first matrix sees exactly the calibration distribution; later ones see the sparsified model's inputs
    assert got["0.attn.wqkv"] == pytest.approx(target, abs=0.01)
    for k, v in got.items():
        assert v == pytest.approx(target, abs=0.08), k
    held_out = measured_sparsity(model, calib(seed=1))  # on other text the thresholds still land near
    assert sum(held_out.values()) / len(held_out) == pytest.approx(target, abs=0.05)


def test_greedy_allocation_keeps_bytes_and_lowers_ffn_error(models):
    from leanlm.adaptive.sparsity import split_mlp_sparsity

    mlp = models["llama"].layers[1].mlp
    X = torch.randn(256, 48, generator=torch.Generator().manual_seed(0))
    t1, t2, err = split_mlp_sparsity(mlp, X, 0.5)
    f = mlp.ffn_dim
    h = X @ mlp.w_gate_up.weight.T
    a = mlp.act(h[:, :f]) * h[:, f:]
    uni_t1 = (X.abs().flatten().kthvalue(int(0.5 * X.numel())).values)
    h2 = (X * (X.abs() > uni_t1)) @ mlp.w_gate_up.weight.T
    a2 = mlp.act(h2[:, :f]) * h2[:, f:]
    uni_t2 = a2.abs().flatten().kthvalue(int(0.5 * a2.numel())).values
    dense = a @ mlp.w_down.weight.T
    uni = float(((a2 * (a2.abs() > uni_t2)) @ mlp.w_down.weight.T - dense).pow(2).sum() / dense.pow(2).sum())
    assert err <= uni + 1e-6  # the uniform split is one of the candidates
    s1 = float((X.abs() <= t1).float().mean())
    h3 = (X * (X.abs() > t1)) @ mlp.w_gate_up.weight.T
    a3 = mlp.act(h3[:, :f]) * h3[:, f:]
    s2 = float((a3.abs() <= t2).float().mean())
    n1, n2 = mlp.w_gate_up.weight.numel(), mlp.w_down.weight.numel()
    assert (s1 * n1 + s2 * n2) / (n1 + n2) == pytest.approx(0.5, abs=0.02)  # same bytes skipped


@pytest.mark.parametrize("arch,kernel", [("llama", "bag"), ("gemma3", "bag"), ("llama", "native")])
def test_sparse_decode_equals_masked_scoring(models, arch, kernel):
    if kernel == "native" and not _native_ok():
        pytest.skip("native sparse GEMV not built here (no compiler / AVX2)")
    model = copy.deepcopy(models[arch])
    base = models[arch]
    apply_activation_sparsity(model, ActivationSparsity(0.5, ("mlp", "attn"), kernel=kernel), calib(), progress=False)
    tokens = calib(1, 12, seed=3)
    full = model(tokens)
    torch.testing.assert_close(stepwise_logits(model, tokens), full, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(full, base(tokens), atol=1e-3)  # the thresholds do change the function
    with meter(model) as m:
        model(tokens)
    s = m.summary()
    assert 0.4 < s["flops_fraction_layers"] < 0.6  # half of every matmul's inputs dropped


def test_sparsity_zero_is_the_dense_model(models):
    model = copy.deepcopy(models["llama"])
    apply_activation_sparsity(model, ActivationSparsity(0.0, ("mlp", "attn"), kernel="bag"), calib(), progress=False)
    prompt = calib(1, 6, seed=2)[0].tolist()
    assert gen(model, prompt) == gen(models["llama"], prompt)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_wina_fold_keeps_the_function_and_ranks_by_weighted_magnitude(models, arch):
    """criterion=wina folds column norms into the inputs' producers: at sparsity 0 the model is
    the same function; each matrix's columns then have unit norm, so |x'_i| = |x_i| * ||W[:, i]||."""
    from leanlm.adaptive.sparsity import fold_column_norms

    base = models[arch]
    tokens = calib(2, 16, seed=4)
    model = copy.deepcopy(base)
    fold_column_norms(model, ["attn.wqkv", "attn.wo", "mlp.w_gate_up", "mlp.w_down"])
    torch.testing.assert_close(model(tokens), base(tokens), rtol=1e-4, atol=1e-4)
    layer = model.layers[1]
    for lin in (layer.attn.wqkv, layer.mlp.w_gate_up, layer.mlp.w_down):
        torch.testing.assert_close(lin.weight.norm(dim=0), torch.ones(lin.in_features), rtol=1e-4, atol=1e-4)
    a = layer.attn  # wo: one norm per value dimension of a GQA group (the group's mean)
    norms = a.wo.weight.norm(dim=0).view(a.n_kv_heads, a.n_heads // a.n_kv_heads, a.head_dim)
    torch.testing.assert_close(norms.mean(1), torch.ones(a.n_kv_heads, a.head_dim), rtol=1e-4, atol=1e-4)
    model = copy.deepcopy(base)
    apply_activation_sparsity(model, ActivationSparsity(0.3, ("mlp", "attn"), kernel="bag", criterion="wina"),
                              calib(), progress=False)  # fmt: skip
    got = measured_sparsity(model, calib())
    assert got["0.attn.wqkv"] == pytest.approx(0.3, abs=0.01)
    assert not torch.allclose(model(tokens), base(tokens), atol=1e-3)
    assert parse_adaptive("teal:0.3,criterion=wina").criterion == "wina"
    spec = parse_adaptive("teal:0.3,attn,allocation=layers,head=0.2")
    assert (spec.head, spec.allocation, spec.targets) == (0.2, "layers", ("mlp", "attn"))
    assert parse_adaptive("teal:0.3").head is None
    alone = parse_adaptive("teal:head=0.4")  # the LM head alone: no decoder matrix targeted
    assert (alone.targets, alone.sparsity, alone.head) == ((), 0.0, 0.4)
    assert parse_adaptive("teal:0.3,head=0.4").targets == ("mlp",)
    both = parse_adaptive("teal:sparsity=0.3,head=0.4")
    assert (both.targets, both.sparsity) == (("mlp",), 0.3)
    with pytest.raises(LeanlmError, match="criterion"):
        ActivationSparsity(0.3, criterion="norm")


def test_layer_allocation_is_the_optimum_and_keeps_the_average(models):
    import itertools

    from leanlm.adaptive.sparsity import allocate_layers

    g = torch.Generator().manual_seed(0)
    levels = [0.2, 0.3, 0.4]
    kl = torch.rand(4, 3, generator=g).cumsum(1).tolist()  # KL grows with the level
    picks = allocate_layers(kl, levels)
    brute = min((c for c in itertools.product(range(3), repeat=4) if sum(c) == 4),
                key=lambda c: sum(kl[i][k] for i, k in enumerate(c)))  # fmt: skip
    assert picks == [levels[k] for k in brute] and sum(picks) / 4 == pytest.approx(0.3)
    model = copy.deepcopy(models["llama"])
    rep = apply_activation_sparsity(model, ActivationSparsity(0.4, ("mlp", "attn"), kernel="bag", allocation="layers"),
                                    calib(), progress=False)  # fmt: skip
    per_layer = rep["layer_allocation"]["per_layer"]
    assert len(per_layer) == model.config.n_layers and sum(per_layer) / len(per_layer) == pytest.approx(0.4)
    assert [t["sparsity"] for t in rep["thresholds"]] == per_layer
    got = measured_sparsity(model, calib())
    assert sum(got.values()) / len(got) == pytest.approx(0.4, abs=0.08)
    with pytest.raises(LeanlmError, match="allocation"):
        ActivationSparsity(0.3, allocation="global")
    with pytest.raises(LeanlmError, match=r"allocation=layers needs sparsity in \[0.1, 0.85\]"):
        low = ActivationSparsity(0.05, kernel="bag", allocation="layers")
        apply_activation_sparsity(copy.deepcopy(models["llama"]), low, calib(), progress=False)


@pytest.mark.parametrize("arch,kernel", [("llama", "bag"), ("gemma3", "bag"), ("llama", "native"), ("qwen2", "dense")])
def test_head_sparsity_one_table_same_decode_and_saved_state(models, arch, kernel, tmp_path):
    """head=FRACTION: the LM head drops that fraction of its inputs, decode equals masked scoring,
    a tied embedding reads the head's table (no second copy), and the state reloads the threshold."""
    if kernel == "native" and not _native_ok():
        pytest.skip("native sparse GEMV not built here (no compiler / AVX2)")
    from leanlm.adaptive import load_adaptive, save_adaptive
    from leanlm.adaptive.sparsity import HeadTableEmbedding
    from leanlm.evaluate.speed import weight_bytes

    base = models[arch]
    model = copy.deepcopy(base)
    spec = ActivationSparsity(0.0, (), kernel=kernel, head=0.3)
    rep = apply_activation_sparsity(model, spec, calib(), progress=False)
    assert isinstance(model.lm_head, SparseInputLinear) and rep["head_threshold"] > 0
    if base.lm_head is None:
        assert isinstance(model.tok_embeddings, HeadTableEmbedding)
        assert weight_bytes(model) < weight_bytes(base) + 1024  # one table for lookups and the head
    torch.testing.assert_close(model.output_weight(), base.output_weight())
    tokens = calib(1, 12, seed=3)
    full = model(tokens)
    h = base.norm(base.hidden(tokens), base.dtype)
    dropped = float((h.abs() <= rep["head_threshold"]).float().mean())
    assert dropped == pytest.approx(0.3, abs=0.1)
    torch.testing.assert_close(stepwise_logits(model, tokens), full, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(full, base(tokens), atol=1e-3)
    with meter(model) as m:  # the meter counts the head's active inputs (decoder layers untouched here)
        model(tokens)
    s = m.summary()
    cfg = base.config
    head_share = cfg.vocab_size / (cfg.vocab_size + sum(f for f, _ in model._flops) / (2 * cfg.hidden_size))
    assert s["flops_fraction_layers"] == 1.0
    assert s["flops_fraction"] == pytest.approx(1 - dropped * head_share, abs=0.02)
    path = save_adaptive(model, tmp_path)
    again = copy.deepcopy(base)
    load_adaptive(again, path)
    assert again.lm_head.threshold == model.lm_head.threshold
    torch.testing.assert_close(again(tokens), full)
    for bad in (1.0, -0.1):
        with pytest.raises(LeanlmError, match="head sparsity must be in"):
            ActivationSparsity(0.0, (), head=bad)
    with pytest.raises(LeanlmError, match="targets"):
        ActivationSparsity(0.3, ())  # neither decoder targets nor the head


# ---- early exit ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_never_exit_equals_full_generation(models, arch):
    model = copy.deepcopy(models[arch])
    apply_early_exit(model, EarlyExit("cosine", threshold=2.0, min_layer=0), progress=False)
    prompt = calib(1, 6, seed=2)[0].tolist()
    assert gen(model, prompt, 12) == gen(models[arch], prompt, 12)
    with meter(model) as m:
        model(calib(1, 10))
    assert m.summary()["layers_skipped_fraction"] == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_exit_kv_is_computed_from_the_exit_state(models, arch):
    """Always leave after layer 0: the cache of layers 1.. must hold the K/V that those layers'
    own attention computes from the exit state (checked with the unmodified runtime)."""
    base = models[arch]
    model = copy.deepcopy(base)
    apply_early_exit(model, EarlyExit("cosine", threshold=-2.0, min_layer=0), progress=False)
    tokens = calib(1, 10, seed=4)
    T = tokens.shape[1]
    model.setup_cache(1, T)
    with torch.no_grad():
        model(tokens[:, :4], start=0)
        for t in range(4, T):
            model(tokens[:, t : t + 1], start=t)
        got = [(l.attn.cache.k.clone(), l.attn.cache.v.clone()) for l in model.layers]
    model.clear_cache()
    ref = copy.deepcopy(base)
    ref.setup_cache(1, T)
    with torch.no_grad():
        dtype = ref.dtype
        x = ref.embed(tokens)
        rope = {n: tb.get(0, T, dtype) for n, tb in ref.rope.items()}
        h0 = ref.layers[0](x, rope[ref._rope_names[0]], 0, dtype)
        for j in range(1, ref.config.n_layers):
            layer = ref.layers[j]
            layer.attn(layer.attn_norm(h0, dtype), rope[ref._rope_names[j]], 0)  # fills its cache from h0
            torch.testing.assert_close(got[j][0], layer.attn.cache.k, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[j][1], layer.attn.cache.v, rtol=1e-4, atol=1e-5)
        # and the output is the LM head on the exit state
        torch.testing.assert_close(model(tokens), ref.logits(h0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("confidence", ["cosine", "softmax"])
def test_exit_decode_equals_scoring_and_calibration_meets_target(models, confidence):
    base = models["llama"]
    model = copy.deepcopy(base)
    tokens = calib(4, 32)
    rep = apply_early_exit(model, EarlyExit(confidence, target_kl=0.05, min_layer=0, every=1), tokens, progress=False)
    assert rep["tries"][-1]["measured_kl"] <= 0.05 or rep["tries"][-1]["predicted_layers_skipped"] == 0
    x = calib(1, 12, seed=5)
    torch.testing.assert_close(stepwise_logits(model, x), model(x), rtol=1e-4, atol=1e-4)
    # a looser target lets more tokens leave
    loose = copy.deepcopy(base)
    rep2 = apply_early_exit(loose, EarlyExit(confidence, target_kl=2.0, min_layer=0, every=1), tokens, progress=False)
    assert rep2["tries"][-1]["predicted_layers_skipped"] >= rep["tries"][-1]["predicted_layers_skipped"]
    with meter(loose) as m:
        loose(tokens)
    if rep2["tries"][-1]["predicted_layers_skipped"] > 0:
        assert m.summary()["layers_skipped_fraction"] > 0


# ---- layer skipping -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_skip_router_that_never_skips_is_the_full_model(models, arch):
    model = copy.deepcopy(models[arch])
    apply_layer_skip(model, LayerSkip(0.2, keep_first=0, keep_last=0), calib(), progress=False, threshold=float("-inf"))
    prompt = calib(1, 6, seed=2)[0].tolist()
    assert gen(model, prompt, 12) == gen(models[arch], prompt, 12)
    with meter(model) as m:
        model(calib(1, 10))
    s = m.summary()
    assert s["layers_skipped_fraction"] == 0 and s["flops_fraction_layers"] > 1.0  # the routers' own cost


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_layer_skip_hits_rate_and_decode_equals_scoring(models, arch):
    model = copy.deepcopy(models[arch])
    tokens = calib()
    L = model.config.n_layers
    rep = apply_layer_skip(model, LayerSkip(0.2, keep_first=0, keep_last=0), tokens, progress=False)
    assert sum(rep["calib_skip_per_layer"]) / L == pytest.approx(0.2, abs=0.02)
    x = calib(1, 16, seed=6)
    full = model(x)
    torch.testing.assert_close(stepwise_logits(model, x), full, rtol=1e-4, atol=1e-4)
    with meter(model) as m:
        model(tokens)
    assert m.summary()["layers_skipped_fraction"] / L == pytest.approx(0.2, abs=0.1)


def test_skipped_layer_writes_the_kv_the_layer_would_have(models):
    """A skipped layer's K/V come from its input, exactly what running it would have stored."""
    base = models["llama"]
    model = copy.deepcopy(base)
    rep = apply_layer_skip(model, LayerSkip(0.2, keep_first=0, keep_last=0), calib(), progress=False)
    gate = model.adaptive_gate
    tokens = calib(1, 10, seed=7)
    T = tokens.shape[1]
    model.setup_cache(1, T)
    states = []  # input of every layer at every decoded position, recorded with the gate's decisions
    with torch.no_grad():
        model(tokens[:, :1], start=0)
        dtype = model.dtype
        for t in range(1, T):
            x = model.embed(tokens[:, t : t + 1])
            row = []
            for i, layer in enumerate(model.layers):
                row.append((x.clone(), gate.decode_skip(i, x)))
                if not row[-1][1]:
                    x = layer(x, model.rope[model._rope_names[i]].get(t, 1, dtype), t, dtype)
            states.append(row)
            model(tokens[:, t : t + 1], start=t)  # the real step (overwrites position t)
        caches = [(l.attn.cache.k.clone(), l.attn.cache.v.clone()) for l in model.layers]
    model.clear_cache()
    assert any(s for row in states for _, s in row), "no layer was skipped; the test would check nothing"
    ref = copy.deepcopy(base)
    ref.setup_cache(1, T)
    with torch.no_grad():
        for t, row in enumerate(states, start=1):
            for i, (x, skipped) in enumerate(row):
                a = ref.layers[i].attn  # the unmodified runtime writes K/V at position t from x
                a(ref.layers[i].attn_norm(x, ref.dtype), ref.rope[ref._rope_names[i]].get(t, 1, ref.dtype), t)
                torch.testing.assert_close(caches[i][0][:, :, t], a.cache.k[:, :, t], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(caches[i][1][:, :, t], a.cache.v[:, :, t], rtol=1e-4, atol=1e-5)
    assert rep["threshold"] > float("-inf")


# ---- neuron-group routing -----------------------------------------------------------------
def test_balanced_kmeans_equal_groups():
    feats = F.normalize(torch.randn(80, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    assign = balanced_kmeans(feats, 4)
    assert torch.bincount(assign, minlength=4).tolist() == [20, 20, 20, 20]


def test_router_with_all_groups_equals_dense_ffn(models):
    base = models["llama"]
    model = copy.deepcopy(base)
    rep = apply_neuron_routing(model, NeuronRouting(groups=4, p=1.0, steps=20), calib(), progress=False)
    assert len(rep["layers"]) == model.config.n_layers
    g = torch.Generator().manual_seed(1)
    for layer, ref in zip(model.layers, base.layers):
        assert isinstance(layer.mlp, RoutedMLP)
        for x in (torch.randn(1, 1, 48, generator=g), torch.randn(2, 7, 48, generator=g)):
            torch.testing.assert_close(layer.mlp(x), ref.mlp(x), rtol=1e-4, atol=1e-5)
    prompt = calib(1, 6, seed=2)[0].tolist()
    assert gen(model, prompt, 10) == gen(base, prompt, 10)


def test_routed_decode_equals_scoring_and_uses_fewer_groups(models):
    model = copy.deepcopy(models["llama"])
    rep = apply_neuron_routing(model, NeuronRouting(groups=4, p=0.6, steps=50), calib(), progress=False)
    assert 1 <= rep["groups_mean"] < 4
    x = calib(1, 12, seed=8)
    torch.testing.assert_close(stepwise_logits(model, x), model(x), rtol=1e-4, atol=1e-4)
    with meter(model) as m:
        model(x)
    assert m.summary()["flops_fraction_layers"] < 0.99


# ---- specs, errors ------------------------------------------------------------------------
def test_parse_specs_and_errors():
    c = parse_adaptive("teal:0.7,attn,kernel=bag")
    assert isinstance(c, ActivationSparsity) and c.sparsity == 0.7 and c.targets == ("mlp", "attn")
    assert c.kernel == "bag"
    c = parse_adaptive("exit:softmax,kl=0.1,every=2")
    assert isinstance(c, EarlyExit) and c.confidence == "softmax" and c.target_kl == 0.1 and c.every == 2
    assert parse_adaptive("teal:0.6,down").targets == ("down",)
    assert parse_adaptive("teal:0.6").targets == ("mlp",)
    assert parse_adaptive("skip:0.25").skip == 0.25
    c = parse_adaptive("moe:groups=8,p=0.8")
    assert isinstance(c, NeuronRouting) and c.groups == 8 and c.p == 0.8
    for bad in ("teal:1.5", "nope:1", "skip:0.2,bogus=1", "moe:groups=1", "exit:kl=-1"):
        with pytest.raises(LeanlmError):
            parse_adaptive(bad)


def test_cli_eval_reports_flops_fraction(tiny_dirs, tmp_path, capsys):
    import json

    from leanlm.cli import main

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(3000)))
    out = tmp_path / "r.json"
    rc = main(["eval", str(tiny_dirs["llama"]), "--ppl", "--text", str(text), "--seq-len", "32", "--windows", "3",
               "--adaptive", "teal:0.5,kernel=bag", "--adaptive", "skip:0.2", "--adaptive-calib", str(text),
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    r = json.loads(out.read_text())
    a = r["adaptive"]
    assert 0.2 < a["compute"]["flops_fraction_layers"] < 0.7
    assert [m["method"] for m in a["methods"]] == ["ActivationSparsity", "LayerSkip"]
    assert "compute used" in capsys.readouterr().out
    rc = main(["generate", str(tiny_dirs["llama"]), "--prompt", "w1 w2 w3", "--max-new-tokens", "4", "--no-chat",
               "--adaptive", "exit:threshold=2.0", "--json", str(tmp_path / "g.json")])  # fmt: skip
    assert rc == 0 and json.loads((tmp_path / "g.json").read_text())["new_tokens"] >= 1


def test_bag_kernel_split_over_threads_is_exact():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 64, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # construction-time choice: two bags over column halves
        lin = SparseInputLinear(W, None, 0.5, "bag")
    finally:
        torch.set_num_threads(old)
    assert lin.splits == 2
    x = torch.randn(1, 1, 64, generator=g)
    torch.testing.assert_close(lin(x), F.linear(x * (x.abs() > 0.5), W), rtol=1e-5, atol=1e-5)


def test_meter_counts_exit_flops_exactly(models):
    """Always leave after layer 0 (no lens): a decode step costs layer 0, the other layers' K/V
    projections and one cosine check."""
    model = copy.deepcopy(models["llama"])
    apply_early_exit(model, EarlyExit("cosine", threshold=-2.0, min_layer=0), progress=False)
    model.setup_cache(1, 16)
    model(calib(1, 4)[:, :4])  # prefill, not counted
    with meter(model) as m:
        for t in range(4, 8):
            model(torch.tensor([[5]]), start=t)
    model.clear_cache()
    (full0, _), (_, kv1), (_, kv2) = model._flops
    per_token = full0 + kv1 + kv2 + 6.0 * model.config.hidden_size
    assert m.used == pytest.approx(4 * per_token)
    assert m.summary()["layers_skipped_fraction"] == 2


def test_recipe_adaptive_step(models, word_tokenizer, tmp_path):
    from leanlm.recipe import apply_recipe, compress, parse_recipe, plan_for

    r = parse_recipe({"steps": [{"adaptive": "teal:0.4,kernel=bag"}]})
    assert plan_for(models["llama"], r).activation_sparsity == 0.4
    with pytest.raises(LeanlmError):
        parse_recipe({"steps": [{"adaptive": {"method": "teal"}}]})
    text = tmp_path / "c.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(6000)))
    r.calibration = {"text": str(text), "samples": 4, "seq_len": 64}
    model = copy.deepcopy(models["llama"])
    rep = apply_recipe(model, word_tokenizer, r, progress=False)
    assert rep["steps"][0]["result"][0]["method"] == "ActivationSparsity"
    assert isinstance(model.layers[0].mlp.w_down, SparseInputLinear)
    bad = parse_recipe({"steps": [{"adaptive": "skip:0.1"}, {"dtype": "float32"}]})
    with pytest.raises(LeanlmError, match="last"):
        compress("unused", bad, tmp_path / "out")


def test_native_kernel_multithreaded_is_exact():
    """2 threads with >= 64 active inputs: each thread sweeps its share into a partial output, summed after."""
    if not _native_ok():
        pytest.skip("native sparse GEMV not built here")
    g = torch.Generator().manual_seed(3)
    W = torch.randn(96, 256, generator=g)
    lin = SparseInputLinear(W, None, 0.6, "native")
    x = torch.randn(1, 1, 256, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y = lin(x)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(y, F.linear(x * (x.abs() > 0.6), W), rtol=1e-5, atol=1e-4)


def test_save_and_load_adaptive_state(models, tiny_dirs, tmp_path):
    """Every method's calibrated state round-trips through safetensors: same logits without recalibrating."""
    from leanlm.adaptive import load_adaptive, save_adaptive

    base = models["llama"]
    tokens = calib()
    a = copy.deepcopy(base)
    apply_activation_sparsity(a, ActivationSparsity(0.4, ("mlp", "attn"), kernel="bag", allocation="greedy"), tokens,
                              progress=False)  # fmt: skip
    apply_layer_skip(a, LayerSkip(0.2, keep_first=0, keep_last=0), tokens, progress=False)
    apply_early_exit(a, EarlyExit("cosine", target_kl=0.5, min_layer=0), tokens, progress=False)
    b = copy.deepcopy(base)
    apply_neuron_routing(b, NeuronRouting(groups=4, p=0.7, steps=20), tokens, progress=False)
    x = calib(1, 12, seed=9)
    for m in (a, b):
        path = save_adaptive(m, tmp_path / f"{id(m)}.safetensors")
        fresh = leanlm.load(tiny_dirs["llama"])[0]
        meta = load_adaptive(fresh, path)
        assert meta["version"] == 1
        torch.testing.assert_close(fresh(x), m(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stepwise_logits(fresh, x), m(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(LeanlmError):
        save_adaptive(copy.deepcopy(base), tmp_path / "none.safetensors")
    with pytest.raises(LeanlmError):
        load_adaptive(copy.deepcopy(base), tmp_path / "missing.safetensors")


def test_compress_saves_adaptive_state_and_eval_loads_it(tiny_dirs, tmp_path):
    import json

    from leanlm.cli import main
    from leanlm.recipe import compress, parse_recipe

    text = tmp_path / "c.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(6000)))
    r = parse_recipe({"calibration": {"text": str(text), "samples": 4, "seq_len": 64},
                      "steps": [{"dtype": "float32"}, {"adaptive": "teal:0.4,kernel=bag"}, {"adaptive": "skip:0.2"}]})
    out = tmp_path / "out"
    rep = compress(str(tiny_dirs["llama"]), r, out, progress=False)
    state = out / "adaptive.safetensors"
    assert state.is_file() and rep["adaptive_state"] == str(state)
    res = tmp_path / "r.json"
    assert main(["eval", str(out), "--ppl", "--text", str(text), "--seq-len", "32", "--windows", "2",
                 "--adaptive", str(state), "--json", str(res)]) == 0  # fmt: skip
    a = json.loads(res.read_text())["adaptive"]
    assert a["methods"][0]["loaded"] == ["skip", "sparsity"]
    assert a["compute"]["flops_fraction_layers"] < 0.8


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_skip_and_exit_together_decode_equals_scoring(models, arch):
    model = copy.deepcopy(models[arch])
    tokens = calib()
    apply_layer_skip(model, LayerSkip(0.2, keep_first=0, keep_last=0), tokens, progress=False)
    rep = apply_early_exit(model, EarlyExit("cosine", target_kl=1.0, min_layer=0), tokens, progress=False)
    assert rep["tries"][-1]["predicted_layers_skipped"] > 0  # the exit gate does fire here
    x = calib(1, 16, seed=11)
    torch.testing.assert_close(stepwise_logits(model, x), model(x), rtol=1e-4, atol=1e-4)
    with meter(model) as m:
        model(x)
    assert 0 < m.summary()["layers_skipped_fraction"] < model.config.n_layers
