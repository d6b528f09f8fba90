"""Peak memory of a fresh process that loads a model and generates 32 tokens, per dtype.

What a user pays to run the model, measured as VmHWM (not ru_maxrss, which Linux carries over
fork+exec) of a new interpreter per run; the median of --runs runs per dtype. The loader casts
each tensor to the target dtype as it reads it (model/load.py), so a bf16 load should not hold the
whole fp32 checkpoint; bench_quant.py reports the same measurement per quantized configuration.

    python benchmarks/bench_memory.py                      # SmolLM2-135M, fp32 and bf16
    python benchmarks/bench_memory.py --model gemma3-270m
Writes benchmarks/results/memory_<model>.json.
"""

from __future__ import annotations

import argparse

import torch
from common import add_result_args, machine, median, peak_rss_mb, print_table, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # the stamp's machine/threads then names the child's threads
    rows = []
    for dtype in args.dtypes.split(","):
        runs = [peak_rss_mb(args.model, dtype, args.threads) for _ in range(args.runs)]
        rows.append({"dtype": dtype, "peak_rss_mb": median(runs), "runs_mb": runs})
    print_table(rows, ["dtype", "peak_rss_mb"])
    write_result(f"memory_{args.model}", {"model": args.model, "machine": machine(), "settings": vars(args),
                                          "peak_rss": rows},
                 partial=args.dtypes != "float32,bfloat16", archive=args.archive, machine_shared=args.machine_shared)


if __name__ == "__main__":
    main()
