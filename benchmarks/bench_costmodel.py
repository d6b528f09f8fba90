"""Cost model verification on this CPU: predicted vs measured prefill and decode tok/s.

Calibrates the CPU profile (`leanlm hw calibrate`), then for each variant of SmolLM2-135M
(fp32, bf16, and every example recipe that applies) measures prefill (512 tokens) and decode
(128 tokens after 32) with the eval harness and compares with the cost model's prediction.

    LEANLM_DATA=../shared/data python benchmarks/bench_costmodel.py
Writes benchmarks/results/costmodel.json (a `verification` list: `leanlm report` plots it).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import add_result_args, machine, print_table, write_result

from leanlm import load
from leanlm.evaluate.speed import measure_speed
from leanlm.hardware import estimate, save_profile
from leanlm.hardware.calibrate import calibrate
from leanlm.recipe import apply_recipe, load_recipe, plan_for

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
DEFAULT_RECIPES = "bf16,int8,gptq-int4,lean"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--recipes", default=DEFAULT_RECIPES, help="example recipes to verify")
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hw = calibrate(args.threads)
    save_profile(hw)
    rows, ver = [], []
    variants = [("fp32", None)] + [(n, load_recipe(RECIPES / f"{n}.yaml")) for n in args.recipes.split(",") if n]
    for name, recipe in variants:
        model, tok = load(args.model, "float32")
        if recipe is not None:
            apply_recipe(model, tok, recipe, progress=False)
        pred = estimate(model.config, hw, plan_for(model, recipe), prompt_len=512, context=160)
        meas = measure_speed(model, prompt_len=512, new_tokens=128, runs=args.runs, progress=False)
        for kind in ("decode", "prefill"):
            m, p = meas[f"{kind}_tok_s"]["median"], pred[f"{kind}_tok_s"]
            ver.append({"name": f"{name} {kind}", "variant": name, "kind": kind, "measured": m, "predicted": p,
                        "error": p / m - 1})  # fmt: skip
            rows.append({"variant": name, "kind": kind, "measured tok/s": m, "predicted tok/s": p, "error %": 100 * (p / m - 1)})
        del model
    errs = [abs(v["error"]) for v in ver]
    result = {"model": args.model, "machine": machine(), "threads": args.threads, "profile": hw.__dict__,
              "verification": ver, "median_abs_error": statistics.median(errs),
              "median_abs_error_decode": statistics.median(abs(v["error"]) for v in ver if v["kind"] == "decode"),
              "median_abs_error_prefill": statistics.median(abs(v["error"]) for v in ver if v["kind"] == "prefill")}  # fmt: skip
    print_table(rows, ["variant", "kind", "measured tok/s", "predicted tok/s", "error %"])
    print(f"median |error|: {100 * result['median_abs_error']:.1f}% (decode {100 * result['median_abs_error_decode']:.1f}%, "
          f"prefill {100 * result['median_abs_error_prefill']:.1f}%)")  # fmt: skip
    write_result("costmodel", result, partial=args.recipes != DEFAULT_RECIPES, archive=args.archive,
                 machine_shared=args.machine_shared)


if __name__ == "__main__":
    main()
