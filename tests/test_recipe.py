"""Recipes: validation errors name the problem; apply + save + reload works on a tiny model."""

import pytest
import torch
import yaml

from leanlm import LeanlmError
from leanlm.recipe import apply_recipe, compress, load_recipe, parse_recipe, plan_for


def test_example_recipes_are_valid():
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parents[1].glob("examples/recipes/*.yaml"))
    assert len(files) >= 3
    for f in files:
        assert load_recipe(f).steps


@pytest.mark.parametrize("recipe, message", [
    ({"steps": [{"quantize": {"method": "gptq", "bits": 4, "grop": 128}}]}, "unknown key.*grop"),
    ({"steps": [{"quantize": {"method": "gptq", "bits": 3}}]}, "bits=3"),
    ({"steps": [{"quantize": {"method": "fancy"}}]}, "unknown quantization method 'fancy'"),
    ({"steps": [{"prune": {"structured": "neurons", "ratio": 1.5}}]}, "ratio"),
    ({"steps": [{"prune": {"method": "wanda", "sparsity": -0.1}}]}, "sparsity"),
    ({"steps": [{"distill": {}}]}, "unknown step kind 'distill'"),
    ({"steps": [{"dtype": "int3"}]}, "float32 or bfloat16"),
    ({"steps": [{"kv": "window:0"}]}, "window"),
    ({"steps": []}, "non-empty"),
    ({"steps": [{"dtype": "bfloat16"}], "colour": "red"}, "unknown key.*colour"),
    ({"steps": [{"dtype": "bfloat16"}], "calibration": {"samples": 0}}, "samples >= 1"),
    # values of the wrong type name the file, the step and the key (the config classes' annotations are the schema)
    ({"steps": [{"quantize": {"method": "rtn", "symmetric": "false"}}]}, r"r\.yaml: step 1 \(quantize\): 'symmetric' must be true or false, got 'false'"),
    ({"steps": [{"quantize": {"method": "rtn", "bits": 8.0}}]}, r"step 1 \(quantize\): 'bits' must be a whole number, got 8\.0"),
    ({"steps": [{"dtype": "bf16"}, {"prune": {"method": "wanda", "sparsity": "half"}}]}, r"step 2 \(prune\): 'sparsity' must be a number or null"),
    ({"steps": [{"quantize": {"skip": "layers.0"}}]}, "'skip' must be a list of strings"),
    ({"steps": [{"quantize": {"mixed": {"target_bits": "5"}}}]}, "'mixed.target_bits' must be a number"),
    ({"steps": [{"quantize": {"mixed": {"high": {"bits": 8.0}}}}]}, "'mixed.high.bits' must be a whole number"),
    ({"steps": [{"quantize": {"mixed": {"colour": 1}}}]}, "'mixed': unknown key.*colour"),
    ({"steps": [{"quantize": {"method": ["gptq"]}}]}, "unknown quantization method"),
    ({"steps": [{"prune": {"structured": 5}}]}, "'structured' must be neurons, heads or layers"),
    ({"steps": [{"dtype": "bfloat16"}], "calibration": "lots"}, "'calibration' must be a mapping"),
    ({"steps": [{"dtype": "bfloat16"}], "calibration": {"samples": True}}, "calibration.samples must be a whole number"),
    ({"steps": [{"dtype": "bfloat16"}], "name": 5}, "'name' must be a string"),
    ({"steps": [{"dtype": "bfloat16"}], 5: 3}, "unknown key"),
])  # fmt: skip
def test_validation_errors(recipe, message):
    with pytest.raises(LeanlmError, match=message):
        parse_recipe(recipe, "r.yaml")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(LeanlmError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [quantize: {method: rtn")
    with pytest.raises(LeanlmError, match="not valid YAML"):
        load_recipe(bad)


def test_apply_save_reload(tiny_dirs, tmp_path):
    import leanlm

    r = parse_recipe({"steps": [{"prune": {"structured": "neurons", "ratio": 0.25, "importance": "magnitude"}},
                                {"quantize": {"method": "rtn", "bits": 8, "group": 0, "symmetric": True}}]})  # fmt: skip
    out = tmp_path / "out"
    report = compress(str(tiny_dirs["llama"]), r, out, progress=False)
    assert [s["step"] for s in report["steps"]] == ["prune", "quantize"]
    model, _ = leanlm.load(out)
    assert model.config.layers[0].ffn_dim == 60  # 80 neurons - 25%
    with torch.inference_mode():
        logits = model(torch.randint(0, 97, (1, 8)))
    assert torch.isfinite(logits).all()
    with pytest.raises(LeanlmError, match="--force"):
        compress(str(tiny_dirs["llama"]), r, out, progress=False)


def test_plan_follows_the_recipe(tiny_dirs):
    from leanlm.model import load_model

    model = load_model(tiny_dirs["llama"])
    r = parse_recipe(yaml.safe_load("""
steps:
  - quantize: {method: rtn, bits: 4, group: 128}
  - kv: "sinks:4,window:64,int8"
"""))
    p = plan_for(model, r)
    assert (p.weight_dtype, p.compute_dtype, p.group_size, p.kv_window, p.kv_dtype) == ("int4", "bf16", 128, 69, "int8")  # kv_window: keys a decode step reads: 4 sinks + 64 + itself
    assert plan_for(model).weight_dtype == "fp32"


def test_search_candidates_and_prediction(tiny_dirs):
    from leanlm.hardware import load_profile
    from leanlm.model import load_model
    from leanlm.recipe.search import candidates, predict, predicted_config

    cands = candidates()
    names = [c.name for c in cands]
    assert "fp32" in names and "bf16" in names and "gptq4" in names and len(names) == len(set(names))
    model = load_model(tiny_dirs["llama"])
    lean = next(c for c in cands if c.name == "rtn4+ffn-25%+drop2")
    cfg = predicted_config(model.config, lean)
    assert cfg.n_layers == 1 and cfg.layers[0].ffn_dim == 60
    h100 = load_profile("h100")
    assert predict(model, lean, h100)["predicted_weight_mb"] < predict(model, cands[0], h100)["predicted_weight_mb"]


def test_search_spreads_trials_over_the_predicted_speed_range():
    from leanlm.recipe.search import spread

    cands = [(f"r{i}", {"predicted_decode_tok_s": float(v)}) for i, v in enumerate([5, 1, 9, 3, 7])]
    picked = spread(cands, 3)
    assert [c[1]["predicted_decode_tok_s"] for c in picked] == [1.0, 5.0, 9.0]  # mildest, middle, fastest
    assert len(spread(cands, 10)) == 5 and spread(cands, 1)[0][0] == "r2"


def test_search_never_lets_a_harsher_recipe_rule_out_a_milder_one():
    from leanlm.recipe.search import candidates, milder_or_equal, severity

    by = {c.name: c for c in candidates()}
    assert severity(by["awq4+ffn-25%+drop2"]) == (4, 0.25, 2) and severity(by["bf16"]) == (16, 0.0, 0)
    assert milder_or_equal(by["int8"], by["rtn4"]) and not milder_or_equal(by["rtn4"], by["int8"])
    assert milder_or_equal(by["gptq4"], by["awq4+ffn-12%"]) and not milder_or_equal(by["int8+drop2"], by["int8"])


def test_search_returns_a_non_dominated_front(tiny_dirs, capsys):
    from conftest import DATA

    from leanlm.cli import main
    from leanlm.report import pareto_front

    import json, os

    if not (DATA / "wikitext-2-raw").is_dir():
        pytest.skip("needs LEANLM_DATA")
    assert main(["search", str(tiny_dirs["llama"]), "--hw", "h100", "--trials", "3", "--windows", "1", "--runs", "1",
                 "--max-ppl-increase", "900%", "--json", "-"]) == 0  # fmt: skip
    r = json.loads(capsys.readouterr().out)
    assert len(r["trials"]) == 3 and r["trials"][0]["name"] == "fp32" and r["pareto"]
    front = [t for t in r["trials"] if t.get("pareto")]
    pts = [(t["ppl"], t["decode_tok_s"]) for t in r["trials"]]
    # nothing measured dominates a front member
    for t in front:
        assert not any(p[0] <= t["ppl"] and p[1] >= t["decode_tok_s"] and (p[0] < t["ppl"] or p[1] > t["decode_tok_s"])
                       for p in pts)  # fmt: skip
    assert len(pareto_front(pts)) >= 1


@pytest.fixture(scope="module")
def ray_cluster():
    """A local cluster from `ray start --head`, as a user would start one; stopped afterwards."""
    import shutil
    import socket
    import subprocess

    pytest.importorskip("ray")
    ray_bin = shutil.which("ray")
    if ray_bin is None:
        pytest.skip("the ray command is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                            "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
                           capture_output=True, text=True, timeout=180)  # fmt: skip
    if start.returncode:
        pytest.fail(f"ray start failed: {start.stderr[-2000:]}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)


def test_search_on_ray_gives_the_local_result_shape(tiny_dirs, ray_cluster, capsys):
    """--backend ray runs the trials on the cluster (one per node at a time) and returns the same fields,
    names and quality figures as --backend local (perplexity does not depend on where it runs)."""
    from conftest import DATA

    from leanlm.cli import main

    import json

    if not (DATA / "wikitext-2-raw").is_dir():
        pytest.skip("needs LEANLM_DATA")
    common = [str(tiny_dirs["llama"]), "--hw", "h100", "--trials", "2", "--windows", "1", "--runs", "1",
              "--max-ppl-increase", "900%", "--json", "-"]  # fmt: skip
    assert main(["search", *common]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["search", *common, "--backend", "ray", "--ray-address", ray_cluster]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["backend"] == {"backend": "ray", "nodes": 1, "cpus_per_trial": 2}
    assert local["backend"] == {"backend": "local", "nodes": 1}
    assert [t["name"] for t in remote["trials"]] == [t["name"] for t in local["trials"]]
    for a, b in zip(local["trials"], remote["trials"]):
        assert set(a) - {"pareto"} == set(b) - {"pareto"}  # front membership depends on the timings
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-4)
        assert b["node"]


def test_search_backend_flags_are_checked():
    from leanlm.errors import LeanlmError
    from leanlm.recipe.backends import make_backend

    with pytest.raises(LeanlmError, match="only used with --backend ray"):
        make_backend("local", "127.0.0.1:6379")
    with pytest.raises(LeanlmError, match="unknown backend"):
        make_backend("slurm")
