"""leanlm.apply: the registry, calibration rule, the model.applied record (saved and reloaded), pricing,
and the decode-time KV policy of a recipe acting in generate, eval --speed and serve."""

import json

import pytest
import torch
import yaml
from conftest import needs_smollm2

import leanlm
from leanlm import LeanlmError
from leanlm.attention import KVPolicy
from leanlm.attention.policies import PolicyCache, cache_bytes
from leanlm.decode.generate import generate_tokens
from leanlm.recipe import compress, load_recipe, parse_recipe

WINDOW = "sinks:2,window:6"  # cache of 2 + 6 + 1 slots per layer


def _decode(model, ids, n, kv=None):
    """Greedy tokens and, seen while decoding, the class and length of layer 0's cache."""
    out, seen = [], set()
    for t in generate_tokens(model, ids, n, eos_ids=set(), kv=kv):
        out.append(t)
        c = model.layers[0].attn.cache
        seen.add((type(c).__name__, c.max_len))
    return out, seen


def _window_recipe(steps_before=()):
    return parse_recipe({"steps": [*steps_before, {"kv": WINDOW}]})


def test_recipe_kv_step_takes_effect_at_decode_after_save_and_load(tiny_dirs, tmp_path):
    """The defect: the recipe's kv step was left on an attribute nothing read, so decoding used a full cache."""
    out = tmp_path / "lean"
    compress(str(tiny_dirs["llama"]), _window_recipe([{"dtype": "float32"}]), out, progress=False)
    model, _ = leanlm.load(out)
    ids = list(range(3, 8))
    got, seen = _decode(model, ids, 30)
    assert seen == {("PolicyCache", 9)}  # the window, not prompt + new tokens
    base, _ = leanlm.load(tiny_dirs["llama"])
    want, _ = _decode(base, ids, 30, kv=KVPolicy.parse(WINDOW))
    full, full_seen = _decode(base, ids, 30)
    assert got == want and got != full and full_seen == {("KVCache", 35)}
    assert got[: 9 - len(ids) + 1] == full[: 9 - len(ids) + 1]  # identical until the window starts to slide
    # an explicit policy (the CLI's --kv) overrides the recorded one
    assert _decode(model, ids, 30, kv=KVPolicy.parse("full"))[0] == full


def test_recorded_kv_policy_reaches_eval_speed_and_serve(tiny_dirs, monkeypatch):
    from leanlm.evaluate.speed import measure_speed

    model, tok = leanlm.load(tiny_dirs["llama"])
    leanlm.apply(model, KVPolicy.parse(WINDOW))
    caps = []
    orig = PolicyCache.__init__

    def spy(self, policy, *a, **kw):
        orig(self, policy, *a, **kw)
        caps.append(self.cap)

    monkeypatch.setattr(PolicyCache, "__init__", spy)
    measure_speed(model, prompt_len=16, new_tokens=12, runs=1, warmup=0, progress=False)
    assert caps and set(caps) == {9}
    caps.clear()
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from leanlm.serve.app import ServerLimits, create_app

    app = create_app(model, tok, "tiny", ServerLimits())
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "w1 w2 w3", "max_tokens": 20})
        assert r.status_code == 200
    app.state.engine.close()
    assert caps and set(caps) == {9}


def test_apply_records_saves_and_reloads(tiny_dirs, tmp_path):
    from leanlm.prune import Structured
    from leanlm.quant import RTN

    model, tok = leanlm.load(tiny_dirs["llama"])
    rep = leanlm.apply(model, Structured("neurons", ratio=0.25, importance="magnitude"))
    assert rep["params_after"] < rep["params_before"]
    leanlm.apply(model, RTN(bits=8, group=0, symmetric=True))
    leanlm.apply(model, KVPolicy.parse(WINDOW))
    assert [e["type"] for e in model.applied] == ["Structured", "RTN", "KVPolicy"]
    assert model.applied[1]["config"]["bits"] == 8 and "seconds" in model.applied[1]["result"]
    json.dumps(model.applied)  # JSON-able as it stands
    leanlm.save(model, tok, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["leanlm_applied"] == model.applied
    again, _ = leanlm.load(tmp_path / "m")
    assert again.applied == model.applied
    assert _decode(again, [3, 4, 5], 12)[1] == {("PolicyCache", 9)}


def test_calibration_rule_and_unknown_configs(tiny_dirs):
    from leanlm.calibration import Calibration
    from leanlm.prune import Structured, Unstructured
    from leanlm.quant import GPTQ, RTN

    assert not RTN().needs_calibration and GPTQ().needs_calibration and RTN(tune_steps=5).needs_calibration
    assert not Unstructured("magnitude", 0.5).needs_calibration and Unstructured("wanda", 0.5).needs_calibration
    assert Structured("layers", remove=1).needs_calibration and Structured("neurons", ratio=0.5, heal_steps=3).needs_calibration
    assert not KVPolicy().needs_calibration
    model, _ = leanlm.load(tiny_dirs["llama"])
    with pytest.raises(LeanlmError, match="GPTQ needs calibration data"):
        leanlm.apply(model, GPTQ())
    with pytest.raises(LeanlmError, match="no method is registered for dict"):
        leanlm.apply(model, {"bits": 4})
    assert model.applied == []  # nothing half-applied
    tokens = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    leanlm.apply(model, Unstructured("wanda", 0.5), tokens)  # token windows are accepted as they are
    assert model.applied[-1]["type"] == "Unstructured"
    with pytest.raises(LeanlmError, match="evaluation split"):
        Calibration(object(), "wikitext2").tokens()


def test_calibration_cuts_each_shape_once(word_tokenizer, tmp_path):
    from leanlm.calibration import Calibration

    text = tmp_path / "c.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(3000)))
    c = Calibration(word_tokenizer, str(text), samples=3, seq_len=20)
    assert c.tokens().shape == (3, 20) and c.tokens() is c.tokens()
    assert c.tokens(2, 40).shape == (2, 40)
    fixed = Calibration.from_tokens(torch.zeros(2, 16, dtype=torch.long))
    assert fixed.tokens(8, 512).shape == (2, 16)


def test_every_config_prices_itself(tiny_dirs):
    from leanlm.apply import Dtype, plan_for
    from leanlm.model import load_model
    from leanlm.prune import Unstructured
    from leanlm.quant import AWQ

    model = load_model(tiny_dirs["llama"])
    p = plan_for(model, [Dtype("bfloat16"), AWQ(bits=4, group=64, head_bits=4), Unstructured("magnitude", pattern="2:4"),
                         KVPolicy.parse("h2o:64,int4")])  # fmt: skip
    assert (p.weight_dtype, p.compute_dtype, p.group_size, p.embed_dtype) == ("int4", "bf16", 64, "int4")
    assert (p.sparsity, p.sparsity_pattern, p.kv_window, p.kv_dtype) == (0.5, "2:4", 64, "int4")
    leanlm.apply(model, KVPolicy.parse(WINDOW))
    assert plan_for(model).kv_window == 9  # default: what model.applied records


@pytest.mark.parametrize("step, message", [
    ("quantize: {method: rtn, bits: 8.0}", r"step 1 \(quantize\): 'bits' must be a whole number, got 8.0"),
    ("quantize: {method: rtn, symmetric: 'false'}", r"step 1 \(quantize\): 'symmetric' must be true or false, got 'false'"),
    ("prune: {structured: neurons, ratio: '0.25'}", r"step 1 \(prune\): 'ratio' must be a number or null"),
    ("prune: {method: wanda, sparsity: 0.5, heal_steps: 1.5}", r"step 1 \(prune\): 'heal_steps' must be a whole number, got 1.5"),
])  # fmt: skip
def test_recipe_values_are_type_checked(tmp_path, step, message):
    f = tmp_path / "typo.yaml"
    f.write_text(f"steps:\n  - {step}\n")
    with pytest.raises(LeanlmError, match=str(f).replace(".", r"\.") + ": " + message):
        load_recipe(f)


def test_recipe_configs_go_through_the_registry():
    from leanlm.apply import Dtype, handler_for

    r = load_recipe(__import__("pathlib").Path(__file__).resolve().parents[1] / "examples/recipes/lean.yaml")
    cfgs = r.configs()
    assert [type(c).__name__ for c in cfgs] == ["Structured", "AWQ", "KVPolicy"]
    assert all(callable(handler_for(c)) for c in cfgs + [Dtype()])
    assert parse_recipe(yaml.safe_load("steps: [kv: none]")).configs() == []


@needs_smollm2
@pytest.mark.real_model
def test_smollm2_window_policy_applies_at_decode(smollm2):
    model, tok = smollm2
    saved = model.applied
    model.applied = []  # the shared fixture model: restore what it carried afterwards
    try:
        leanlm.apply(model, KVPolicy.parse("sinks:4,window:32"))
        ids = tok("The history of the city begins in the Roman era, when a small settlement", return_tensors=None).input_ids
        got, seen, held = [], set(), set()
        for t in generate_tokens(model, ids, 64, eos_ids=set()):
            got.append(t)
            c = model.layers[0].attn.cache
            seen.add((type(c).__name__, c.max_len))
            held.add(cache_bytes(model))
        full, _ = _decode(model, ids, 64, kv=KVPolicy.parse("full"))
    finally:
        model.applied = saved
    cap = 4 + 32 + 1
    assert seen == {("PolicyCache", cap)}
    cfg = model.config
    per_slot = sum(2 * l.n_kv_heads * l.head_dim for l in cfg.layers) * 4  # fp32 keys and values
    assert max(held) < cap * per_slot * 1.05  # the cache holds the window (plus small bookkeeping), not 64 + prompt
    same = cap - len(ids)  # before the window slides both attend to every token
    assert got[:same] == full[:same] and got != full


def test_adding_a_method_page_example_registers_applies_records_and_prices(tiny_dirs):
    """docs/adding-a-method.md's WeightClip, as written there: a config, a function registered through
    `leanlm.apply.register`, applied, recorded in model.applied, priced, and restored by name."""
    from dataclasses import dataclass
    from typing import ClassVar

    import leanlm
    from leanlm.apply import config_from_dict, plan_for

    @dataclass(frozen=True)
    class WeightClip:
        sigmas: float = 4.0
        needs_calibration: ClassVar[bool] = False

        def price(self, plan) -> None:
            pass

    @leanlm.apply.register(WeightClip)
    def _apply_weight_clip(model, cfg, calib, progress) -> dict:
        clipped = total = 0
        with torch.no_grad():
            for name, module in model.named_modules():
                if not name.startswith("layers.") or not isinstance(module, torch.nn.Linear):
                    continue
                w = module.weight
                bound = cfg.sigmas * w.float().std(dim=1, keepdim=True)
                clipped += int((w.float().abs() > bound).sum())
                total += w.numel()
                w.copy_(w.float().clamp(-bound, bound))
        return {"clipped_fraction": clipped / max(total, 1)}

    model, _ = leanlm.load(tiny_dirs["llama"])
    w = model.layers[0].mlp.w_down.weight.detach().clone()
    bound = 2.0 * w.std(dim=1, keepdim=True)
    report = leanlm.apply(model, WeightClip(sigmas=2.0))
    assert report["clipped_fraction"] > 0
    assert torch.equal(model.layers[0].mlp.w_down.weight, w.clamp(-bound, bound))
    assert model.applied[-1]["type"] == "WeightClip" and model.applied[-1]["config"] == {"sigmas": 2.0}
    assert config_from_dict("WeightClip", {"sigmas": 2.0}) == WeightClip(2.0)
    assert plan_for(model).weight_dtype == "fp32"


def test_eval_ppl_scores_with_the_recorded_kv_policy(tiny_dirs, tmp_path, capsys):
    """`leanlm eval --ppl` of a directory saved with a kv step scores under that policy, as it decodes."""
    from leanlm.cli import main

    out = tmp_path / "lean"
    compress(str(tiny_dirs["llama"]), _window_recipe([{"dtype": "float32"}]), out, progress=False)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 7) % 50}" for i in range(400)))
    args = ["eval", str(out), "--ppl", "--text", str(text), "--seq-len", "32", "--windows", "2"]
    assert main([*args, "--json", str(tmp_path / "a.json")]) == 0
    assert main([*args, "--kv", "full", "--json", str(tmp_path / "b.json")]) == 0
    rec, full = (json.loads((tmp_path / f).read_text())["perplexity"] for f in ("a.json", "b.json"))
    assert rec["kv"] == KVPolicy.parse(WINDOW).describe() and rec["kv"] != full["kv"]
