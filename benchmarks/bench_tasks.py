"""Zero-shot accuracy of the default models (lm-evaluation-harness conventions).

    LEANLM_DATA=../shared/data python benchmarks/bench_tasks.py --limit 500
Writes benchmarks/results/tasks_<model>.json (after every task): acc / acc_norm with bootstrap standard errors for
HellaSwag, PIQA and ARC-Easy (first --limit documents) on SmolLM2-135M and Gemma-3-270M.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_result_args, machine, print_table, write_result

from leanlm import load
from leanlm.evaluate.tasks import evaluate_task

DEFAULT_TASKS = "piqa,arc_easy,hellaswag"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    add_result_args(ap)
    args = ap.parse_args()
    partial = args.tasks != DEFAULT_TASKS  # one file per model: --models does not narrow a file
    torch.set_num_threads(args.threads)
    result = {"machine": machine(), "settings": vars(args), "results": {}}
    rows = []
    for name in args.models.split(","):
        model, tok = load(name, args.dtype)
        result["results"][name] = {}
        tasks = args.tasks.split(",")
        for i, task in enumerate(tasks):
            t0 = time.time()
            r = evaluate_task(model, tok, task, limit=args.limit)
            r["seconds"] = time.time() - t0
            result["results"][name][task] = r
            rows.append({"model": name, "task": task, "n": r["n"], "acc": r["acc"], "acc_stderr": r["acc_stderr"],
                         "acc_norm": r.get("acc_norm"), "seconds": r["seconds"]})  # fmt: skip
            print_table(rows[-1:], list(rows[-1]))
            write_result(f"tasks_{name}", {**result, "model": name, "results": {name: result["results"][name]}},
                         checkpoint=i < len(tasks) - 1, partial=partial, archive=args.archive,
                         machine_shared=args.machine_shared)  # after every task
        del model
    print_table(rows, ["model", "task", "n", "acc", "acc_stderr", "acc_norm", "seconds"])


if __name__ == "__main__":
    main()
