"""`leanlm hw`: hardware profiles for the cost model (calibrate this CPU, show a profile)."""

from __future__ import annotations

import json
import sys

from .common import THREADS, check_json_dest, emit_json, table, verb_parser


def add_parser(subparsers):
    p = verb_parser(subparsers, "hw", help="hardware profiles: calibrate this CPU, show profiles",
                    description="Hardware profiles for the cost model. `calibrate` measures this machine (GEMV "
                                "bandwidth per dtype, GEMM throughput, per-layer dispatch overhead; about a minute) "
                                "and saves it as the 'cpu' profile; `show` prints a profile.",
                    examples=["leanlm hw calibrate --threads 2", "leanlm hw show h100"])  # fmt: skip
    p.add_argument("action", choices=["calibrate", "show"])
    p.add_argument("name", nargs="?", default="cpu", help="profile for show: a100, h100, h200, groq-lpu, cpu, or a JSON file")
    p.add_argument("--threads", type=THREADS, default=None)
    p.add_argument("--json", metavar="PATH", help="also write the profile as JSON to PATH ('-' for stdout)")
    p.add_argument("--force", action="store_true")
    return p


def main(args) -> int:
    from dataclasses import asdict

    from ..hardware import load_profile, save_profile
    from ..hardware.calibrate import calibrate

    check_json_dest(args)
    if args.action == "calibrate":
        prof = calibrate(args.threads)
        print(f"saved {save_profile(prof)}", file=sys.stderr)
    else:
        prof = load_profile(args.name)
    d = asdict(prof)
    if args.json:
        emit_json(d, args.json, args.force)
    if args.json != "-":
        print(table([(k, json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in d.items()]))
    return 0
