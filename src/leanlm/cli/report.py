"""`leanlm report`: one HTML page from a result JSON; an eval result is shown beside its base model(s)."""

from __future__ import annotations

import sys

from .common import verb_parser


def add_parser(subparsers):
    p = verb_parser(subparsers, "report", help="HTML report (base vs compressed, plots, tables) from a result JSON",
                    description="Render a result JSON as one self-contained HTML page and print a compact table. "
                                "For `leanlm eval --json` results, --base adds the base model's eval JSON(s): the "
                                "page shows quality (ppl, KL, top-1), speed (prefill, decode), size and memory side "
                                "by side, with ratios against the fastest base given and a plot. Benchmark and "
                                "search JSONs get their own plots (engine speeds, Pareto front, sensitivity).",
                    examples=["leanlm report runs/smollm2-gptq4.json --base runs/smollm2-fp32.json "
                              "--base runs/smollm2-bf16.json",
                              "leanlm report runs/search.json --out search.html",
                              "leanlm report benchmarks/results/runtime_smollm2-135m.json --out report.html"])  # fmt: skip
    p.add_argument("run", help="result JSON (leanlm eval --json, leanlm search --json, or a benchmark's)")
    p.add_argument("--base", action="append", metavar="BASE.json",
                   help="eval JSON of the uncompressed model to compare with (repeatable: e.g. its fp32 and bf16 "
                        "runs; ratios use the fastest)")  # fmt: skip
    p.add_argument("--out", help="HTML path (default: RUN.html)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    return p


def main(args) -> int:
    from ..report import render, terminal_summary

    out = render(args.run, args.out, args.force, base=args.base)
    summary = terminal_summary(args.run, base=args.base)
    if summary:
        print(summary)
    print(f"wrote {out}", file=sys.stderr)
    return 0
