"""`leanlm search`: find the quality/cost Pareto front of recipes for one model and machine.

1. Enumerate a recipe space (dtype x quantization x structured pruning).
2. Price every candidate with the cost model (no model is built): predicted decode tok/s
   and weight MB. Candidates predicted to be dominated on (weight MB, tok/s) by a candidate
   that compresses no harder (as many bits or more, no more pruning) are dropped.
   Stage 1 measures the fp32 baseline and every weight format unpruned (bf16, int8, int4 by
   RTN/GPTQ/AWQ); stage 2 spends the rest of `--trials` on structured pruning of the best-
   measured quantized format of each bit width, spread over the predicted speed range.
3. Measure each survivor for real: apply the recipe, perplexity on a few WikiText-2
   windows, decode tok/s (median of runs). Keep those within `--max-ppl-increase`.
4. The measured Pareto front (ppl vs decode tok/s) is the answer.

Trials run one after another in this process (`--backend local`), or on a Ray cluster with one trial
per node at a time (`--backend ray`, leanlm.recipe.backends); both give results of the same shape.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace

from ..errors import LeanlmError
from . import Recipe, Step, apply_recipe, plan_for

QUANT = {
    "none": None,
    "int8": {"method": "rtn", "bits": 8, "group": 0, "symmetric": True},
    "rtn4": {"method": "rtn", "bits": 4, "group": 128},
    "gptq4": {"method": "gptq", "bits": 4, "group": 128},
    "awq4": {"method": "awq", "bits": 4, "group": 128},
}
NEURON_RATIOS = (0.0, 0.125, 0.25)
LAYERS_REMOVED = (0, 2)


def candidates() -> list[Recipe]:
    out = []
    for q_name, q in QUANT.items():
        for dtype in ("float32", "bfloat16") if q is None else ("bfloat16",):
            for ratio in NEURON_RATIOS:
                for drop in LAYERS_REMOVED:
                    steps, name = [], [q_name if q else ("bf16" if dtype == "bfloat16" else "fp32")]
                    if ratio:
                        steps.append(Step("prune", {"structured": "neurons", "ratio": ratio}))
                        name.append(f"ffn-{int(ratio * 100)}%")
                    if drop:
                        steps.append(Step("prune", {"structured": "layers", "remove": drop}))
                        name.append(f"drop{drop}")
                    if q:
                        steps.append(Step("quantize", dict(q)))
                    elif dtype == "bfloat16":
                        steps.append(Step("dtype", "bfloat16"))
                    out.append(Recipe("+".join(name), steps))
    return out


def severity(recipe: Recipe) -> tuple[int, float, int]:
    """(weight bits, FFN fraction removed, layers removed) of a candidate recipe."""
    bits, ratio, drop = 32, 0.0, 0
    for s in recipe.steps:
        if s.kind == "quantize":
            bits = s.params["bits"]
        elif s.kind == "dtype":
            bits = 16
        elif s.kind == "prune" and s.params.get("structured") == "neurons":
            ratio = s.params["ratio"]
        elif s.kind == "prune" and s.params.get("structured") == "layers":
            drop = s.params["remove"]
    return bits, ratio, drop


def milder_or_equal(a: Recipe, b: Recipe) -> bool:
    (ba, ra, da), (bb, rb, db) = severity(a), severity(b)
    return ba >= bb and ra <= rb and da <= db


def spread(cands: list, n: int) -> list:
    """n candidates evenly spaced over the predicted speed range, mildest to fastest: a front needs
    points all along it, not only the most aggressive recipes."""
    cands = sorted(cands, key=lambda c: c[1]["predicted_decode_tok_s"])
    if n >= len(cands):
        return cands
    if n == 1:
        return cands[-1:]
    return [cands[round(i * (len(cands) - 1) / (n - 1))] for i in range(n)]


def predicted_config(cfg, recipe: Recipe):
    """The shapes a recipe's structured pruning will leave (without running it)."""
    cfg = copy.deepcopy(cfg)
    for s in recipe.steps:
        if s.kind == "prune" and s.params.get("structured") == "neurons":
            cfg.layers = [replace(l, ffn_dim=round(l.ffn_dim * (1 - s.params["ratio"]))) for l in cfg.layers]
        elif s.kind == "prune" and s.params.get("structured") == "layers":
            cfg.layers = cfg.layers[: len(cfg.layers) - s.params["remove"]]
    return cfg


def predict(model, recipe: Recipe, hw) -> dict:
    from ..hardware import estimate

    r = estimate(predicted_config(model.config, recipe), hw, plan_for(model, recipe), prompt_len=512, context=160)
    return {"predicted_decode_tok_s": r["decode_tok_s"], "predicted_weight_mb": r["weight_mb"]}


def measure_trial(spec: str, recipe: Recipe, windows: int, runs: int) -> dict:
    from ..evaluate.data import wikitext2_test
    from ..evaluate.perplexity import perplexity
    from ..evaluate.speed import measure_speed, weight_bytes
    from ..model import load

    t0 = time.time()
    model, tok = load(spec, "float32")
    report = apply_recipe(model, tok, recipe, progress=False)
    ppl = perplexity(model, tok, wikitext2_test(), 512, windows, progress=False)["ppl"]
    speed = measure_speed(model, prompt_len=128, new_tokens=64, runs=runs, progress=False)
    return {
        "name": recipe.name,
        "recipe": recipe.to_dict(),
        "ppl": ppl,
        "decode_tok_s": speed["decode_tok_s"]["median"],
        "prefill_tok_s": speed["prefill_tok_s"]["median"],
        "weight_mb": weight_bytes(model) / 2**20,
        "seconds": time.time() - t0,
        "apply_seconds": sum(s["seconds"] for s in report["steps"]),
    }


def search(spec: str, hw_name: str = "cpu", max_ppl_increase: float = 0.03, trials: int = 6, windows: int = 8,
           runs: int = 3, progress: bool = True, backend=None) -> dict:  # fmt: skip
    from tqdm.auto import tqdm

    from ..hardware import load_profile
    from ..model import load_model
    from ..report import pareto_front
    from .backends import LocalBackend

    if not 0 < max_ppl_increase < 10:
        raise LeanlmError(f"--max-ppl-increase must be a fraction in (0, 10), e.g. 0.03 for 3%, got {max_ppl_increase}")
    if trials < 2:
        raise LeanlmError("--trials must be at least 2 (the baseline and one candidate)")
    hw = load_profile(hw_name)
    model = load_model(spec)
    cands = [(r, predict(model, r, hw)) for r in candidates()]
    del model
    base = next(c for c in cands if c[0].name == "fp32")
    # cost-model pruning: drop a candidate when one that compresses no harder (as many bits or more,
    # no more neurons or layers removed) is predicted faster and smaller; quality is not predicted,
    # so a faster but harsher recipe never rules out a milder one
    keep = [c for c in cands if c is base or not any(
        o[1]["predicted_decode_tok_s"] > c[1]["predicted_decode_tok_s"] * 1.02
        and o[1]["predicted_weight_mb"] < c[1]["predicted_weight_mb"] * 0.98
        and milder_or_equal(o[0], c[0]) for o in cands)]  # fmt: skip
    # stage 1: every weight format unpruned (mildest first); stage 2: the remaining trials prune
    # the best-measured quantized format of each bit width, spread over the predicted speed range
    plain = sorted((c for c in keep if c is not base and severity(c[0])[1:] == (0.0, 0)),
                   key=lambda c: (-severity(c[0])[0], c[1]["predicted_decode_tok_s"]))  # fmt: skip
    results: list[dict] = []
    bar = tqdm(total=trials, desc="search trials", disable=not progress)

    backend = backend or LocalBackend()

    def run(batch):
        # a batch's trials are independent (the backend may run them on several nodes at once);
        # quality is judged against the baseline, the first trial of the first batch
        measured = backend.map(measure_trial, [(spec, recipe, windows, runs) for recipe, _ in batch],
                               on_done=lambda _: bar.update())  # fmt: skip
        for (recipe, pred), r in zip(batch, measured):
            r.update(pred)
            r["bits"] = severity(recipe)[0]
            results.append(r)
        base_ppl = results[0]["ppl"]
        for r in results[-len(measured):]:
            r["ppl_increase"] = r["ppl"] / base_ppl - 1
            r["within_budget"] = r["ppl_increase"] <= max_ppl_increase

    run(([base] + plain)[:trials])
    stage1 = len(results)
    best: dict[int, dict] = {}
    for r in results:
        if r["bits"] <= 8 and (r["bits"] not in best or r["ppl"] < best[r["bits"]]["ppl"]):
            best[r["bits"]] = r
    formats = {r["name"] for r in best.values()}
    pruned = [c for c in keep if severity(c[0])[1:] != (0.0, 0) and c[0].name.split("+")[0] in formats]
    run(spread(pruned, trials - len(results)))
    bar.close()
    ok = [r for r in results if r["within_budget"]]
    for i in pareto_front([(r["ppl"], r["decode_tok_s"]) for r in ok]):
        ok[i]["pareto"] = True
    return {
        "model": spec,
        "hardware": hw_name,
        "backend": backend.describe(),
        "max_ppl_increase": max_ppl_increase,
        "candidates_priced": len(cands),
        "candidates_after_cost_model": len(keep),
        "trials": results,
        "stages": {"formats": stage1, "pruned": len(results) - stage1},
        "pareto": [r["name"] for r in results if r.get("pareto")],
    }
