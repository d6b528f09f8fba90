"""Zero-shot accuracy of the default models (lm-evaluation-harness conventions).

    LEANLM_DATA=../shared/data python benchmarks/bench_tasks.py --limit 500
Writes benchmarks/results/tasks_<model>.json (after every task): acc / acc_norm with bootstrap standard errors for
HellaSwag, PIQA and ARC-Easy (first --limit documents) on SmolLM2-135M and Gemma-3-270M.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine, print_table, write_result

from leanlm import load
from leanlm.evaluate.tasks import evaluate_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--tasks", default="piqa,arc_easy,hellaswag")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"machine": machine(), "settings": vars(args), "results": {}}
    rows = []
    for name in args.models.split(","):
        model, tok = load(name, args.dtype)
        result["results"][name] = {}
        for task in args.tasks.split(","):
            t0 = time.time()
            r = evaluate_task(model, tok, task, limit=args.limit)
            r["seconds"] = time.time() - t0
            result["results"][name][task] = r
            rows.append({"model": name, "task": task, "n": r["n"], "acc": r["acc"], "acc_stderr": r["acc_stderr"],
                         "acc_norm": r.get("acc_norm"), "seconds": r["seconds"]})  # fmt: skip
            print_table(rows[-1:], list(rows[-1]))
            write_result(f"tasks_{name}", {**result, "results": {name: result["results"][name]}})  # after every task
        del model
    print_table(rows, ["model", "task", "n", "acc", "acc_stderr", "acc_norm", "seconds"])


if __name__ == "__main__":
    main()
