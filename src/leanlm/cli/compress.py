"""`leanlm compress`: apply a YAML recipe (prune, quantize, dtype, kv) and save the result."""

from __future__ import annotations

import sys

from .common import MODEL_HELP, THREADS, verb_parser


def add_parser(subparsers):
    p = verb_parser(subparsers, "compress", help="apply a YAML recipe (prune, quantize, dtype, kv) and save",
                    description="Apply the steps of a recipe in order (one calibration pass shared by all steps) "
                                "and save the result; `leanlm eval OUT` then measures it. See examples/recipes/.",
                    examples=["leanlm compress smollm2-135m examples/recipes/gptq-int4.yaml --out out/gptq4",
                              "leanlm compress smollm2-135m examples/recipes/lean.yaml --out out/lean --force",
                              "leanlm compress smollm2-135m examples/recipes/lean.yaml --out out/lean --check"])  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("recipe", help="YAML recipe file")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--threads", type=THREADS, default=None)
    p.add_argument("--check", action="store_true", help="only validate the recipe and print its cost-model plan")
    return p


def main(args) -> int:
    import torch

    from ..recipe import compress, load_recipe

    recipe = load_recipe(args.recipe)
    if args.check:
        print(f"recipe {recipe.name}: {len(recipe.steps)} valid step(s): " + ", ".join(s.kind for s in recipe.steps))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    report = compress(args.model, recipe, args.out, args.force)
    print(f"wrote {args.out} in {report['seconds']:.0f} s; measure it with: leanlm eval {args.out}", file=sys.stderr)
    return 0
