"""`leanlm optimize`: every lever measured for the user's quality budget, against llama.cpp, with a deployable answer."""

from __future__ import annotations

import sys

from ..errors import LeanlmError
from .common import MODEL_HELP, THREADS, integer, number, verb_parser
from .search import ppl_budget


def add_parser(subparsers):
    from ..recipe.optimize import DRAFTS, FORMATS

    p = verb_parser(subparsers, "optimize", help="search every lever within a quality budget, compare with llama.cpp",
                    description="Search weight formats (bf16, int8, int4 GPTQ, the IQ4_NL table, int4/int8 mixed) and "
                                "exact speculative decoding (prompt lookup, an int4 self-draft) for MODEL within "
                                "--max-ppl-increase; the cost model prunes, measurement decides. llama.cpp (Q8_0, "
                                "Q4_K_M, Q4_0 GGUFs made by its own quantizer) is scored and timed in the same run. "
                                "Writes OUT/optimize.json, OUT/report.html, the answer's recipe, model and exports. "
                                "A killed run resumes from OUT/state.json when run again with the same settings.",
                    examples=["leanlm optimize qwen2.5-0.5b --max-ppl-increase 2% --out runs/opt-qwen",
                              "leanlm optimize smollm2-135m --max-ppl-increase 3% --formats bf16,int8 --no-peers "
                              "--out runs/opt-smol",
                              "leanlm optimize ./my-model --prompts my_prompts.txt --minutes 30 --out runs/opt"])  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder (resumed when it holds a run with the same settings)")
    p.add_argument("--max-ppl-increase", default="2%", help="quality budget, e.g. 2%% or 0.02 (default 2%%)")
    p.add_argument("--max-kl", type=number(0, low_open=True), default=None,
                   help="also require KL(reference || candidate) <= X nats per token")
    p.add_argument("--prompts", metavar="FILE", default=None,
                   help="prompts the speed (and speculation) is measured on: one per line or JSONL with \"prompt\" "
                        "(default: MT-Bench first turns from $LEANLM_DATA/prompts)")  # fmt: skip
    p.add_argument("--num-prompts", type=integer(1), default=8, help="prompts used (default 8)")
    p.add_argument("--new-tokens", type=integer(2), default=128, help="tokens generated per prompt (default 128)")
    p.add_argument("--windows", type=integer(1), default=4, help="WikiText-2 test windows of 512 for quality (default 4)")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"weight formats to consider (default all: "
                                                                f"{','.join(FORMATS)})")  # fmt: skip
    p.add_argument("--drafts", default=",".join(DRAFTS),
                   help=f"speculative drafts to try on each format (default {','.join(DRAFTS)}; 'none' for none)")
    p.add_argument("--minutes", type=number(0, low_open=True), default=60.0,
                   help="time budget: formats the ETA says would overrun are skipped and listed (default 60)")
    p.add_argument("--speed-runs", type=integer(1), default=3, help="interleaved rounds of the final speed table")
    p.add_argument("--no-peers", action="store_true", help="skip llama.cpp (no comparison in the report)")
    p.add_argument("--hw", default="cpu", help="hardware profile the cost model prices with (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=THREADS, default=None)
    p.add_argument("--data-dir", help="evaluation data folder (default $LEANLM_DATA)")
    p.add_argument("--force", action="store_true", help="start over in an --out folder that holds another run")
    return p


def _names(text: str, known, what: str) -> list[str]:
    if text.strip() == "none":
        return []
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in known]
    if bad:
        raise LeanlmError(f"unknown {what} {', '.join(bad)}; choose from: {', '.join(known)}")
    return names


def main(args) -> int:
    import os

    import torch

    from ..recipe.optimize import DRAFTS, FORMATS, Settings, default_prompts, optimize, read_prompts

    if args.data_dir:
        os.environ["LEANLM_DATA"] = args.data_dir
    if args.threads:
        torch.set_num_threads(args.threads)
    formats = _names(args.formats, list(FORMATS), "format")
    if not formats:
        raise LeanlmError("--formats needs at least one weight format")
    prompts = read_prompts(args.prompts) if args.prompts else default_prompts(args.num_prompts)
    settings = Settings(model=args.model, max_ppl_increase=ppl_budget(args.max_ppl_increase), max_kl=args.max_kl,
                        windows=args.windows, prompts=prompts[: args.num_prompts], new_tokens=args.new_tokens,
                        minutes=args.minutes, seed=args.seed, peers=not args.no_peers, formats=formats,
                        drafts=_names(args.drafts, list(DRAFTS), "draft"), speed_runs=args.speed_runs)  # fmt: skip
    result = optimize(settings, args.out, hw=args.hw, force=args.force,
                      log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    s = result["summary"]
    print(f"answers: {result['answers']}")
    for k, v in s.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"report: {args.out}/report.html · deploy: {result['deploy'].get('model', result['deploy'])}")
    return 0
