"""Argument helpers shared by the verbs: the model arguments, JSON output, KV and adaptive options."""

from __future__ import annotations

import argparse
import json
import math
import sys

from ..errors import LeanlmError

MODEL_HELP = ("default name (smollm2-135m, gemma3-270m, qwen2.5-0.5b, qwen2.5-1.5b), a .gguf file, "
              "or a Hugging Face model directory")
KV_HELP = ("KV-cache policy: int8 | int4 | sinks:4,window:1024[,int8] | h2o:BUDGET[,window:N] | "
           "snapkv:BUDGET[,obs:N] | tga:group=16,window=512[,sinks=4][,logg=1] | quest:pages=N,page=N | "
           "topk:keys=N (default: full cache in the model dtype)")  # fmt: skip


class Parser(argparse.ArgumentParser):
    """An argument error is one `leanlm: error:` line and exit code 2, as every other bad input is."""

    def error(self, message):
        verb = self.prog.removeprefix("leanlm").strip()
        print(f"leanlm: error: {verb + ': ' if verb else ''}{message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def integer(low: int | None = None, high: int | None = None):
    """An argparse type: a whole number in [low, high], refused while parsing (before any model loads)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be a whole number {bounds}, got {text}")
        return value

    return parse


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number in the interval low..high (open ends where asked)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            bounds = ([] if low is None else [f"{'>' if low_open else '>='} {low:g}"]) + \
                     ([] if high is None else [f"{'<' if high_open else '<='} {high:g}"])  # fmt: skip
            raise argparse.ArgumentTypeError(" ".join(["must be a finite number", " and ".join(bounds)]).strip()
                                             + f", got {text}")  # fmt: skip
        return value

    return parse


def non_empty(text: str) -> str:
    """An argparse type: a string that is not empty (an empty --stop would stop before the first character)."""
    if text == "":
        raise argparse.ArgumentTypeError("must not be empty")
    return text


THREADS = integer(1, 4096)
SEED = integer(0, 2**63 - 1)


def read_stdin_prompt(stdin) -> str:
    """The prompt from standard input, which the command asked for; a terminal is refused rather than waited on."""
    if stdin is None or stdin.isatty():
        raise LeanlmError("no prompt: pass --prompt TEXT, or pipe the prompt into standard input")
    return stdin.read()


class HelpFormatter(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions to the terminal; keeps multi-line text (the examples) as written."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def verb_parser(subparsers, name: str, help: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """A verb's parser whose --help teaches: what it does (description) and how to call it (examples)."""
    epilog = ("example:\n" if len(examples) == 1 else "examples:\n") + "\n".join(f"  {e}" for e in examples)
    return subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                 formatter_class=HelpFormatter)  # fmt: skip


def add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL plus the options every verb that loads a model takes."""
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--dtype", default="float32", help="weights/compute dtype: float32 | bfloat16 (default float32)")
    p.add_argument("--threads", type=THREADS, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def load_model(args):
    """(model, tokenizer) for the arguments add_model_args() declared."""
    import torch

    from ..model import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, dtype=args.dtype, device=args.device)


def check_json_dest(args) -> None:
    """Fail before the work (possibly an hour of it) when --json would refuse to overwrite a file."""
    if getattr(args, "json", None) and args.json != "-":
        from ..io import check_writable

        check_writable(args.json, args.force)


def emit_json(obj, dest: str | None, force: bool) -> None:
    """Write `obj` to `dest` atomically ('-' = stdout; None = nowhere)."""
    from ..io import write_json_atomic

    if dest == "-":
        print(json.dumps(obj, indent=2, default=str))
    elif dest:
        write_json_atomic(dest, obj, force)
        print(f"wrote {dest}", file=sys.stderr)


def table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns for the terminal."""
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def kv_policy(args):
    """--kv parsed into a KVPolicy (None without the flag); a bad spec is a LeanlmError."""
    from ..attention import KVPolicy

    return KVPolicy.parse(getattr(args, "kv", None))


def add_adaptive_args(p: argparse.ArgumentParser) -> None:
    from ..adaptive import SPEC_HELP

    p.add_argument("--adaptive", action="append", metavar="SPEC", help=SPEC_HELP + "; e.g. teal:0.5, exit:kl=0.05, skip:0.2")
    p.add_argument("--adaptive-calib", default="wikitext2-valid", metavar="TEXT",
                   help="calibration text for --adaptive (default wikitext2-valid; never the eval split)")  # fmt: skip


def apply_adaptive(args, model, tok) -> dict | None:
    """--adaptive specs (leanlm.adaptive): calibrate and install them, or load saved ones; None without any."""
    specs = getattr(args, "adaptive", None)
    if not specs:
        return None
    from pathlib import Path

    from ..adaptive import apply_adaptive as install, load_adaptive, parse_adaptive

    if getattr(args, "kv", None):
        raise LeanlmError("--adaptive cannot be combined with --kv (skipped layers write a full cache); drop one")
    saved = [s for s in specs if s.endswith(".safetensors") or Path(s).is_dir()]
    cfgs = [parse_adaptive(s) for s in specs if s not in saved]
    reports = [{"method": "saved", "path": s, "loaded": sorted(k for k in load_adaptive(model, s) if k not in
                ("version", "n_layers"))} for s in saved]  # fmt: skip
    reports += install(model, cfgs, tok, args.adaptive_calib, getattr(args, "data_dir", None)) if cfgs else []
    return {"specs": list(specs), "calibration": args.adaptive_calib, "methods": reports}


def compute_meter(model, adaptive: dict | None):
    """Count the FLOPs fraction of an adaptive model while quality is scored (same decisions)."""
    import contextlib

    if adaptive is None:
        return contextlib.nullcontext()
    from ..adaptive import meter

    @contextlib.contextmanager
    def run():
        with meter(model) as m:
            yield
        adaptive["compute"] = m.summary()

    return run()
