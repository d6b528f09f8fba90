"""`leanlm search`: a measured Pareto front of recipes; the cost model prunes, measurement confirms."""

from __future__ import annotations

import sys

from ..errors import LeanlmError
from .common import MODEL_HELP, THREADS, check_json_dest, emit_json, integer, verb_parser


def add_parser(subparsers):
    p = verb_parser(subparsers, "search", help="Pareto front of recipes: cost model prunes, measurement confirms",
                    description="Enumerate recipes (dtype x int8/int4 RTN/GPTQ/AWQ x FFN-neuron and layer pruning), "
                                "price them with the cost model for --hw, measure the most promising --trials "
                                "(perplexity on --windows WikiText-2 windows, decode tok/s) and report the measured "
                                "Pareto front within --max-ppl-increase.",
                    examples=["leanlm hw calibrate    # once: measure this CPU for the cost model",
                              "leanlm search smollm2-135m --hw cpu --max-ppl-increase 3% --trials 8 --json runs/search.json",
                              "leanlm report runs/search.json"])  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--hw", default="cpu", help="hardware profile used to price candidates (default: calibrated cpu)")
    p.add_argument("--max-ppl-increase", default="3%", help="quality budget, e.g. 3%% or 0.03 (default 3%%)")
    p.add_argument("--trials", type=integer(1), default=6, help="candidates measured, baseline included (default 6)")
    p.add_argument("--windows", type=integer(1), default=8, help="WikiText-2 windows of 512 per trial (default 8)")
    p.add_argument("--runs", type=integer(1), default=3, help="decode timing runs per trial (default 3)")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="where trials run: local (one after another here) or ray (a Ray cluster, one trial per node "
                        "at a time; needs `pip install 'ray[default]'` and a cluster from `ray start --head`)")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="Ray cluster to join with --backend ray (default: auto, the cluster started on this machine)")
    p.add_argument("--threads", type=THREADS, default=None)
    p.add_argument("--data-dir", help="evaluation data folder (default $LEANLM_DATA)")
    p.add_argument("--json", metavar="PATH", help="write the search as JSON (render it with leanlm report)")
    p.add_argument("--force", action="store_true")
    return p


def ppl_budget(text: str) -> float:
    """'3%' or '0.03' -> 0.03."""
    budget = text.strip()
    try:
        return float(budget[:-1]) / 100 if budget.endswith("%") else float(budget)
    except ValueError:
        raise LeanlmError(f"--max-ppl-increase takes a percentage like 3% or a fraction like 0.03, got {budget!r}")


def main(args) -> int:
    import os

    import torch

    from ..recipe.search import search
    from ..report import summary_table

    check_json_dest(args)
    if args.data_dir:
        os.environ["LEANLM_DATA"] = args.data_dir
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..recipe.backends import make_backend

    budget = ppl_budget(args.max_ppl_increase)
    backend = make_backend(args.backend, args.ray_address)
    result = search(args.model, args.hw, budget, args.trials, args.windows, args.runs, backend=backend)
    print(summary_table(result), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        emit_json(result, args.json, args.force)
    return 0
