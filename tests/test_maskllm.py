"""MaskLLM-style learned N:M masks: exact patterns, learning lowers the block error below the prior's, the cost
term acts through its weight, seeded runs repeat, and the apply / recipe / CLI routes reach it."""

import copy
import json

import pytest
import torch

import leanlm
from leanlm import LeanlmError
from leanlm.cli import main
from leanlm.model import load_model
from leanlm.prune import MaskLLM, Unstructured, prune_maskllm, prune_unstructured, sparsegpt_prune
from leanlm.prune.calibration import block_linears
from leanlm.prune.maskllm import candidates, hard_mask, prior_logits, soft_mask
from leanlm.recipe import parse_recipe, plan_for

TOKENS = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))


def nonzeros_per_group(w: torch.Tensor, m: int) -> torch.Tensor:
    return (w != 0).reshape(w.shape[0], -1, m).sum(-1)


def test_candidates_soft_and_hard_masks():
    opts = candidates(2, 4)
    assert opts.shape == (6, 4) and (opts.sum(1) == 2).all() and len({tuple(r.tolist()) for r in opts}) == 6
    assert candidates(4, 8).shape == (70, 8) and candidates(1, 4).shape == (4, 4)
    g = torch.Generator().manual_seed(0)
    prior = torch.stack([(torch.rand(4, generator=g).argsort() < 2) for _ in range(20)]).reshape(5, 16)
    logits = prior_logits(prior, opts, strength=50.0, gen=g)  # a strong prior dominates the random part
    assert torch.equal(hard_mask(logits, opts, prior.shape), prior)
    soft = soft_mask(logits, torch.zeros_like(logits), opts, 100.0, 0.05, prior.shape)
    assert torch.allclose(soft.reshape(-1, 4).sum(-1), torch.full((20,), 2.0))  # a relaxed mask keeps N of M in sum
    assert torch.allclose(soft, prior.float(), atol=1e-4)  # sharp temperature: the argmax pattern


def test_sparsegpt_keeps_the_values_of_pruned_weights_on_request():
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(8, 32, generator=g), torch.randn(256, 32, generator=g)
    H = 2 * X.T @ X / 256
    zeroed, keep = sparsegpt_prune(W, H, nm=(2, 4))
    full, keep2 = sparsegpt_prune(W, H, nm=(2, 4), keep_pruned_values=True)
    assert torch.equal(keep, keep2) and torch.equal(full * keep, zeroed)
    assert (full[~keep] != 0).all()  # the compensated values a different mask may choose


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("prior", ["sparsegpt", "wanda", "magnitude"])
def test_learned_masks_are_exactly_n_of_m(tiny_dirs, pattern, prior):
    model = load_model(tiny_dirs["llama"])
    n, m = (int(x) for x in pattern.split(":"))
    report = prune_maskllm(model, MaskLLM(pattern, prior=prior, steps=4), TOKENS, progress=False)
    assert report["sparsity_prunable"] == pytest.approx(1 - n / m, abs=1e-9)
    for layer in model.layers:
        for lin in block_linears(layer).values():
            assert (nonzeros_per_group(lin.weight, m) == n).all()
    with torch.inference_mode():
        assert torch.isfinite(model(PROBE)).all()
    assert model.applied[-1]["type"] == "MaskLLM" and model.applied[-1]["config"]["pattern"] == pattern


def block_error(model, base, tokens):
    """Mean relative output error of each block against the dense block, on the dense stream."""
    from leanlm.calibration import BlockRunner

    runner, errs = BlockRunner(base, tokens), []
    for i in range(len(base.layers)):
        dense = runner.run(i)
        with torch.no_grad():
            rope = runner.rope(i)
            pruned = [model.layers[i](x, rope, 0, runner.dtype) for x in runner.xs]
        errs.append(sum(float((p - d).pow(2).sum()) for p, d in zip(pruned, dense))
                    / sum(float((d - x).pow(2).sum()) for d, x in zip(dense, runner.xs)))  # fmt: skip
        runner.advance(dense)
    return errs


def test_learning_lowers_the_block_error_below_the_prior(tiny_dirs):
    """The learned mask (no keep-better guard) beats its magnitude prior on the calibration windows in every
    block, and the whole model's output moves closer to the dense one."""
    base = load_model(tiny_dirs["llama"])
    learned, prior = copy.deepcopy(base), copy.deepcopy(base)
    cfg = MaskLLM(prior="magnitude", target="block", steps=60, batch=2, lr=5e-3, keep_better=False)
    report = prune_maskllm(learned, cfg, TOKENS, progress=False)
    prune_unstructured(prior, Unstructured("magnitude", pattern="2:4"), None, progress=False)
    for row in report["blocks"]:
        assert row["kept"] == "learned" and row["learned_error"] < row["prior_error"], row
        assert row["groups_changed"] > 0
    # the same error measured from outside, on the dense stream, for the first block (same inputs for both)
    assert block_error(learned, base, TOKENS)[0] < block_error(prior, base, TOKENS)[0]
    with torch.inference_mode():
        dense = base(PROBE)
        assert (learned(PROBE) - dense).pow(2).mean() < (prior(PROBE) - dense).pow(2).mean()


def test_keep_better_never_keeps_a_worse_mask(tiny_dirs):
    model = load_model(tiny_dirs["qwen2"])
    report = prune_maskllm(model, MaskLLM(steps=3, lr=0.05), TOKENS, progress=False)  # a wild step size
    for row in report["blocks"]:
        kept = row["learned_error"] if row["kept"] == "learned" else row["prior_error"]
        assert kept == min(row["learned_error"], row["prior_error"])


def test_the_cost_term_acts_through_its_weight(tiny_dirs):
    """cost_weight 0: the error alone keeps every linear dense; a large weight: every linear N:M, and the cost
    model predicts a faster decode. In between, the choice follows the price."""
    base = load_model(tiny_dirs["llama"])
    runs = {}
    for w in (0.0, 50.0):
        model = copy.deepcopy(base)
        runs[w] = prune_maskllm(model, MaskLLM(steps=30, cost_weight=w, hardware="a100"), TOKENS, progress=False)
        assert model.applied[-1]["config"]["dense_layers"] == runs[w]["dense_layers"]
    n_linears = 4 * len(base.layers)
    assert len(runs[0.0]["dense_layers"]) == n_linears and runs[0.0]["sparsity_prunable"] == 0.0
    assert runs[50.0]["dense_layers"] == [] and runs[50.0]["sparsity_prunable"] == pytest.approx(0.5)
    fast, slow = (runs[w]["predicted_decode_step_ms"] for w in (50.0, 0.0))
    assert fast["pruned"] < slow["pruned"] == pytest.approx(slow["dense"])
    probs = [list(b["gate_nm_probability"].values()) for b in runs[50.0]["blocks"]]
    assert min(min(p) for p in probs) > 0.5 > max(max(b["gate_nm_probability"].values()) for b in runs[0.0]["blocks"])


def test_cost_term_needs_a_profile_where_nm_pays(tiny_dirs):
    model = load_model(tiny_dirs["llama"])
    with pytest.raises(LeanlmError, match="no cheaper than dense"):
        prune_maskllm(model, MaskLLM(steps=1, cost_weight=1.0, hardware="groq-lpu"), TOKENS, progress=False)
    with pytest.raises(LeanlmError, match="hardware="):
        MaskLLM(cost_weight=1.0)
    with pytest.raises(LeanlmError, match="cost_weight"):
        MaskLLM(hardware="a100")


def test_dense_layers_stay_dense_and_are_priced_dense(tiny_dirs):
    model = load_model(tiny_dirs["llama"])
    before = model.layers[1].mlp.w_down.weight.clone()
    prune_maskllm(model, MaskLLM(steps=2, dense_layers=["layers.1.mlp.w_down"]), TOKENS, progress=False)
    assert torch.equal(model.layers[1].mlp.w_down.weight, before)
    assert (nonzeros_per_group(model.layers[1].mlp.w_gate_up.weight, 4) == 2).all()
    plan = plan_for(model)
    assert plan.sparsity_pattern == "2:4" and plan.dense_ops == ["layers.1.mlp.w_down"]
    with pytest.raises(LeanlmError, match="dense_layers"):
        prune_maskllm(load_model(tiny_dirs["llama"]), MaskLLM(steps=1, dense_layers=["mlp.w_down"]), TOKENS, progress=False)


def test_seeded_runs_repeat(tiny_dirs):
    base = load_model(tiny_dirs["qwen3"])
    weights = []
    for seed in (0, 0, 1):
        model = copy.deepcopy(base)
        prune_maskllm(model, MaskLLM(prior="wanda", steps=8, lr=5e-3, keep_better=False, seed=seed), TOKENS,
                      progress=False)  # fmt: skip
        weights.append(torch.cat([lin.weight.flatten() for l in model.layers for lin in block_linears(l).values()]))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_bad_configs_name_the_fix():
    for kw, msg in [({"pattern": None}, "give one"), ({"pattern": "5:4"}, "N:M"), ({"prior": "owl"}, "prior"),
                    ({"steps": -1}, "steps"), ({"batch": 0}, "batch"), ({"temperature": (4.0,)}, "temperature"),
                    ({"target": "logits"}, "target"), ({"cost_weight": -1.0, "hardware": "a100"}, ">= 0")]:  # fmt: skip
        with pytest.raises(LeanlmError, match=msg):
            MaskLLM(**kw)


def test_apply_and_recipe_route(tiny_dirs):
    model = load_model(tiny_dirs["llama"])
    leanlm.apply(model, MaskLLM(steps=2), TOKENS, progress=False)
    assert model.applied[-1]["type"] == "MaskLLM"
    assert (nonzeros_per_group(model.layers[0].attn.wqkv.weight, 4) == 2).all()
    recipe = parse_recipe({"steps": [{"prune": {"method": "maskllm", "pattern": "2:4", "steps": 3,
                                                "temperature": [2, 0.1], "prior": "wanda"}}]})  # fmt: skip
    (cfg,) = recipe.configs()
    assert isinstance(cfg, MaskLLM) and cfg.steps == 3 and cfg.temperature == (2.0, 0.1) and cfg.prior == "wanda"
    with pytest.raises(LeanlmError, match="unknown key"):
        parse_recipe({"steps": [{"prune": {"method": "maskllm", "allocation": "owl"}}]})


def _run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prune_maskllm(tiny_dirs, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 13) % 90}" for i in range(3000)))
    src = tiny_dirs["llama"]
    common = ["--calib-text", calib, "--calib-samples", 4, "--calib-seq-len", 32]
    code, _, err = _run(capsys, "prune", src, "--method", "maskllm", "--pattern", "2:4", "--mask-steps", 2,
                        "--mask-prior", "wanda", "--out", tmp_path / "m", "--json", tmp_path / "m.json", *common)  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "m.json").read_text())["pruning"]
    assert report["method"] == "maskllm" and report["prior"] == "wanda" and report["steps"] == 2
    model = load_model(tmp_path / "m")
    assert (nonzeros_per_group(model.layers[0].mlp.w_down.weight, 4) == 2).all()
    for extra, msg in ((["--method", "maskllm"], "--pattern"), (["--method", "wanda", "--pattern", "2:4", "--mask-steps", 3], "maskllm"),
                       (["--method", "maskllm", "--pattern", "2:4", "--cost-weight", 1], "hardware=")):  # fmt: skip
        code, _, err = _run(capsys, "prune", src, *extra, "--out", tmp_path / "x", *common)
        assert code == 2 and msg in err, (extra, err)
        assert not (tmp_path / "x").exists()
