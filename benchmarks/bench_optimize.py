"""`leanlm optimize` on one model, its result stamped and kept: benchmarks/results/optimize_MODEL.json.

Runs the verb exactly as a user would (every weight format and draft, llama.cpp Q8_0 / Q4_K_M / Q4_0 in the same
run, MT-Bench first turns as the prompts, which nothing tunes on) into a scratch folder, then writes its
optimize.json with the provenance stamp. The summary holds:
- lossless_decode_vs_llamacpp_q8_0: the fastest configuration with greedy-identical output (or <= +0.5% ppl and
  KL <= 0.01) over llama.cpp Q8_0, decode tok/s from the interleaved speed table;
- q4km_quality_decode_vs_llamacpp_q4_k_m: the fastest at Q4_K_M's KL or lower over llama.cpp Q4_K_M;
- wall_minutes: the whole search, peers included.

    LEANLM_DATA=../shared/data python benchmarks/bench_optimize.py --model qwen2.5-0.5b
A run with narrowing options (--formats, --drafts, fewer prompts) is partial and goes to the archive.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import add_result_args, write_result  # noqa: E402

from leanlm.cli import main as leanlm_main  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--max-ppl-increase", default="2%")
    ap.add_argument("--formats", default=None, help="narrow the formats (partial run)")
    ap.add_argument("--drafts", default=None, help="narrow the drafts (partial run)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--out", default=None, help="keep the optimize folder here (default: a temporary folder)")
    add_result_args(ap)
    args = ap.parse_args()
    partial = bool(args.formats or args.drafts or args.num_prompts != 8)
    out = args.out or tempfile.mkdtemp(prefix="leanlm_optimize_")
    argv = ["optimize", args.model, "--out", out, "--max-ppl-increase", args.max_ppl_increase,
            "--num-prompts", str(args.num_prompts), "--minutes", str(args.minutes)]  # fmt: skip
    if args.formats:
        argv += ["--formats", args.formats]
    if args.drafts:
        argv += ["--drafts", args.drafts]
    rc = leanlm_main(argv)
    if rc:
        raise SystemExit(rc)
    result = json.loads(open(os.path.join(out, "optimize.json")).read())
    result["optimize_provenance"] = result.pop("provenance")
    write_result(f"optimize_{args.model}", result, partial=partial, archive=args.archive,
                 machine_shared=args.machine_shared)


if __name__ == "__main__":
    main()
