"""leanlm command line: a dispatcher over one module per verb.

Each verb module (info.py, generate.py, ...) has add_parser(subparsers), which declares its options
and its --help (a description and examples), and main(args) -> int, which parses nothing more and
calls library functions. This file builds the parser and turns a LeanlmError (or an argument error) into
one line and exit 2. While a verb runs, sys.stdin is empty: nothing it calls can read an answer (such as the
"y" transformers would take as leave to run a model folder's code) from the user's input; a verb that asks for
standard input (generate without --prompt) reads it from args.stdin.
"""

from __future__ import annotations

import argparse
import importlib
import io
import sys

from ..errors import LeanlmError
from .common import HelpFormatter, Parser

# in --help order: inspect, use, measure, compress, deploy, cost
VERBS = ("info", "generate", "eval", "quantize", "prune", "compress", "search", "optimize", "report", "export", "serve", "hw",
         "cost")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="leanlm", formatter_class=HelpFormatter,
        description="leanlm: make a transformer LM cheaper per token, and prove it by measurement.",
        epilog="examples:\n  leanlm info smollm2-135m\n  leanlm generate smollm2-135m --prompt 'Tell me a joke'\n"
               "  LEANLM_DATA=../shared/data leanlm eval smollm2-135m --ppl --speed --memory\n"
               "  leanlm VERB --help    (every verb explains itself, with examples)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in VERBS:
        module = importlib.import_module(f"{__name__}.{name}")
        module.add_parser(sub).set_defaults(func=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = ["leanlm", *argv]  # recorded in result provenance
    args.stdin, sys.stdin = sys.stdin, io.StringIO()  # only a verb that asked for stdin reads it (args.stdin)
    try:
        return args.func(args)
    except LeanlmError as e:
        print(f"leanlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanlm: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdin = args.stdin


if __name__ == "__main__":
    sys.exit(main())
