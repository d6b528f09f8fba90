"""Cascades on the zero-shot tasks and on generation: accuracy against cost, same run.

Ladder (one tokenizer): int4 Qwen2.5-0.5B (RTN g64 symmetric, bf16 compute) -> Qwen2.5-0.5B (bf16) ->
Qwen2.5-1.5B (bf16). Every rung answers every document once (score_doc: its choice, its confidence, its work);
a cascade's answers are then replayed from those (a rung's answer does not depend on whether it was asked, so the
replay equals a live run: tests/test_cascade.py checks that). Thresholds are chosen on the first half of each
task's documents (the cheapest setting within 1 point of the largest model alone there) and reported on the
second half, so nothing is tuned on the figures shown.

Generation: LAMBADA's last word, generated greedily (as many tokens as the target), escalated on DeepConf-style
lowest-group confidence (window 4 over the generated tokens' top-5 confidence); accuracy = exact match.

Cost: the cost model's price of each rung's work on this machine's calibrated profile (one weight read per
forward call plus the tokens at the prefill rate), and the measured seconds, each as a share of the largest
model alone on the same documents.

    LEANLM_DATA=../shared/data python benchmarks/bench_cascade.py          # ~30 min on 2 cores
Writes benchmarks/results/cascade.json; summary: accuracy_gap_points (largest alone minus cascade, mean over the
tasks, test halves) and cost_share_of_large.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from common import add_result_args, machine, write_result  # noqa: E402

from leanlm import load  # noqa: E402
from leanlm.adaptive.cascade import (Rung, check_shared_tokenizer, generate_with_confidence, price_rungs,  # noqa: E402
                                     replay, score_doc, trace_confidence)  # fmt: skip
from leanlm.evaluate.tasks import encode_pair, load_docs  # noqa: E402

TASKS = ("arc_easy", "piqa", "hellaswag")
INT4 = {"method": "rtn", "bits": 4, "group": 64, "symmetric": True}


def ladder(small: str, large: str) -> list[Rung]:
    from leanlm.recipe import Recipe, Step, apply_recipe

    m4, tok = load(small, "float32")
    apply_recipe(m4, tok, Recipe("int4", [Step("quantize", dict(INT4))]), progress=False)
    m16, _ = load(small, "bfloat16")
    big, tok_big = load(large, "bfloat16")
    check_shared_tokenizer([tok, tok_big], [small, large])
    return [Rung(f"{small} int4", m4), Rung(f"{small} bf16", m16), Rung(f"{large} bf16", big)], tok


def thresholds_grid(per_rung, lo: int, hi: int) -> list[list[float]]:
    """Candidate thresholds per rung: the quantiles of that rung's confidences on the dev half."""
    qs = np.linspace(0, 1, 11)
    grids = [sorted({float(np.quantile([a["conf"] for a in r[lo:hi]], q)) for q in qs} | {0.0, 1.01})
             for r in per_rung[:-1]]  # fmt: skip
    return [[a, b] for a in grids[0] for b in grids[1]] if len(grids) == 2 else [[a] for a in grids[0]]


def choose(per_rung, rungs, gold, dev: slice, gap_points: float) -> list[float]:
    """The cheapest thresholds on the dev half whose accuracy is within gap_points of the largest alone."""
    sub = [r[dev] for r in per_rung]
    g = gold[dev]
    large = float(np.mean([a["pred"] == y for a, y in zip(sub[-1], g)]))
    best = None
    for th in thresholds_grid(per_rung, dev.start or 0, dev.stop):
        r = replay(sub, th, rungs, g)
        if (large - r["acc"]) * 100 <= gap_points and (best is None or r["cost"] < best[0]):
            best = (r["cost"], th)
    return best[1] if best else [1.01] * (len(rungs) - 1)  # nothing within the gap: always escalate


def lambada_answers(rung: Rung, tok, docs) -> list[dict]:
    out = []
    for doc in tqdm(docs, desc=f"lambada-generation {rung.name}", leave=False):
        ctx, target = encode_pair(tok, doc.contexts[0], doc.continuations[0])
        t0 = time.perf_counter()
        toks, confs = generate_with_confidence(rung.model, ctx, len(target), top_k=5, eos_ids=set())
        out.append({"pred": int(toks == target), "conf": trace_confidence(confs, 4, "lowest_group"),
                    "calls": len(toks), "tokens": len(ctx) + len(toks) - 1,
                    "seconds": time.perf_counter() - t0})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", default="qwen2.5-0.5b")
    ap.add_argument("--large", default="qwen2.5-1.5b")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--limit", type=int, default=300, help="documents per task (first half dev, second half test)")
    ap.add_argument("--lambada", type=int, default=300, help="LAMBADA documents for the generation cascade (0: skip)")
    ap.add_argument("--gap-points", type=float, default=1.0, help="accuracy gap allowed on the dev half")
    ap.add_argument("--hw", default="cpu")
    add_result_args(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.time()
    rungs, tok = ladder(args.small, args.large)
    price_rungs(rungs, args.hw)
    results, gaps, shares, measured = {}, [], [], []
    tasks = [t for t in args.tasks.split(",") if t] + (["lambada-generation"] if args.lambada else [])
    for task in tasks:
        t0 = time.time()
        if task == "lambada-generation":
            docs = load_docs("lambada", None, args.lambada)
            per_rung = [lambada_answers(r, tok, docs) for r in rungs]
            gold = np.ones(len(docs), dtype=int)  # pred is 1 for an exact match
        else:
            docs = load_docs(task, None, args.limit)
            per_rung = [[score_doc(r.model, tok, d) for d in tqdm(docs, desc=f"{task} {r.name}", leave=False)]
                        for r in rungs]  # fmt: skip
            gold = np.array([d.gold for d in docs])
        half = len(docs) // 2
        dev, test = slice(0, half), slice(half, len(docs))
        th = choose(per_rung, rungs, gold, dev, args.gap_points)
        sub = [r[test] for r in per_rung]
        r = replay(sub, th, rungs, gold[test])
        alone = [float(np.mean([a["pred"] == y for a, y in zip(s, gold[test])])) for s in sub]
        gap = (alone[-1] - r["acc"]) * 100
        results[task] = {"n_dev": half, "n_test": len(docs) - half, "thresholds": th, "acc_alone": alone,
                         "cascade": r, "accuracy_gap_points": gap, "seconds": time.time() - t0}  # fmt: skip
        gaps.append(gap)
        shares.append(r["cost_share_of_large"])
        measured.append(r["measured_share_of_large"])
        print(f"{task}: alone {['%.3f' % a for a in alone]} cascade {r['acc']:.3f} (gap {gap:+.1f} points) "
              f"answered {['%.0f%%' % (100 * s) for s in r['answered_share']]} cost {r['cost_share_of_large']:.0%} "
              f"of the large (measured {r['measured_share_of_large']:.0%}) thresholds {th}")  # fmt: skip
    out = {
        "ladder": [r.name for r in rungs],
        "prices": {r.name: {"step_s": r.step_s, "token_s": r.token_s} for r in rungs},
        "tasks": results,
        "machine": machine(),
        "wall_minutes": (time.time() - t_start) / 60,
        "summary": {"accuracy_gap_points": float(np.mean(gaps)), "cost_share_of_large": float(np.mean(shares)),
                    "measured_share_of_large": float(np.mean(measured)),
                    "target": "within 1 point of the large model at <= 60% of its cost"},  # fmt: skip
    }
    partial = args.tasks != ",".join(TASKS) or args.limit != 300 or args.lambada != 300
    write_result("cascade", out, partial=partial, archive=args.archive, machine_shared=args.machine_shared)


if __name__ == "__main__":
    main()
