"""`leanlm generate`: text from a prompt, streamed; optional KV policy, adaptive methods, speculative decoding."""

from __future__ import annotations

import sys

from ..errors import LeanlmError
from .common import (KV_HELP, SEED, add_adaptive_args, add_model_args, apply_adaptive, check_json_dest, emit_json, integer,
                     kv_policy, load_model, non_empty, number, read_stdin_prompt, verb_parser)  # fmt: skip


def add_parser(subparsers):
    p = verb_parser(subparsers, "generate", help="generate text (greedy or sampled), streamed",
                    description="Generate text from a prompt, streamed to the terminal. Instruct models get their "
                                "chat template unless --no-chat. Temperature 0 (default) is greedy. --speculate "
                                "decodes faster with exactly the same output.",
                    examples=["leanlm generate smollm2-135m --prompt 'What is a GPU?'",
                              "leanlm generate gemma3-270m --prompt 'Once upon a time' --temperature 0.8 --top-p 0.9 --seed 1",
                              "echo 'Hello' | leanlm generate smollm2-135m --stop '.'",
                              "leanlm generate smollm2-135m --prompt 'Repeat: a b c a b c' --speculate lookup+self"])  # fmt: skip
    add_model_args(p)
    p.add_argument("--prompt", help="prompt text (default: read standard input)")
    p.add_argument("--max-new-tokens", type=integer(1), default=128, help="most tokens generated (default 128)")
    p.add_argument("--temperature", type=number(0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=integer(0), default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=number(0, 1, low_open=True), default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=SEED, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", type=non_empty, action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--chat", dest="chat", action="store_true", default=None, help="force the chat template")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="plain completion, no chat template")
    p.add_argument("--kv", help=KV_HELP)
    add_adaptive_args(p)
    p.add_argument("--json", metavar="PATH", help="write text and stats as JSON instead of streaming")
    p.add_argument("--speculate", choices=("lookup", "self", "draft", "lookup+self", "lookup+draft"),
                   help="exact speculative decoding (same output as without): lookup = prompt n-gram lookup; "
                        "self = a bf16 copy of the model drafts (or its first --draft-layers layers); "
                        "draft = --draft MODEL drafts; lookup+X = lookup, X when nothing matches")  # fmt: skip
    p.add_argument("--draft", metavar="MODEL", help="draft model for --speculate draft (same tokenizer)")
    p.add_argument("--draft-dtype", default="bfloat16", help="dtype of the draft / self copy (default bfloat16)")
    p.add_argument("--draft-layers", type=integer(1), default=None,
                   help="self-draft = the model's first N layers + LM head (shares its KV cache)")  # fmt: skip
    p.add_argument("--draft-threshold", type=number(0, 1), default=None,
                   help="stop drafting when the draft's confidence falls below this (default: off)")  # fmt: skip
    p.add_argument("--gamma", default="auto", help="draft tokens per round: N, auto (learned online, default) or heuristic")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    return p


def speculative_decoder(args, model):
    """--speculate: a decode_fn for generate() running exact speculative decoding."""
    import functools

    from ..decode.kernels import pack_model
    from ..decode.speculative import make_draft, make_policy, self_draft_model, speculative_generate_tokens
    from ..model import fused, load

    policy = make_policy(args.gamma)  # validate before loading anything more
    kind = args.speculate
    if args.draft and not kind.endswith("draft"):
        raise LeanlmError("--draft names the draft model of --speculate draft (or lookup+draft)")
    draft_model = None
    if kind.endswith("draft"):
        if not args.draft:
            raise LeanlmError("--speculate draft needs --draft MODEL (or use --speculate self: a bf16 copy)")
        draft_model, _ = load(args.draft, dtype=args.draft_dtype, device=args.device)
    elif kind.endswith("self") and args.draft_layers is None:
        draft_model = self_draft_model(model, args.draft_dtype)  # a compressed copy, made before packing
    draft = make_draft(kind, model, draft_model, args.draft_layers, threshold=args.draft_threshold)
    if not fused.available():  # fp32 on CPU without the native kernel: verify k tokens at ~one step's cost
        pack_model(model)
    return functools.partial(speculative_generate_tokens, draft=draft, gamma=policy)


def main(args) -> int:
    from ..decode.generate import GenerationStats, Sampling, generate
    from ..decode.speculative import make_policy

    # every input is checked, and the prompt read, before the model loads
    kv = kv_policy(args)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    if args.speculate:
        make_policy(args.gamma)
    check_json_dest(args)
    prompt = args.prompt if args.prompt is not None else read_stdin_prompt(getattr(args, "stdin", sys.stdin))
    if prompt == "":
        raise LeanlmError("the prompt is empty: pass --prompt TEXT or pipe text into standard input")
    model, tok = load_model(args)
    apply_adaptive(args, model, tok)
    stats = GenerationStats()
    decode_fn = speculative_decoder(args, model) if args.speculate else None
    if decode_fn is None:
        model.prepare_decode()  # the weight layout batch-1 decoding streams fastest
    text = generate(model, tok, prompt, args.max_new_tokens, sampling, args.chat, args.stop,
                    stream=None if args.json else sys.stdout, stats=stats, kv=kv, decode_fn=decode_fn)  # fmt: skip
    summary = {
        "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens, "stop_reason": stats.stop_reason,
        "ttft_ms": round(stats.prefill_s * 1e3, 1), "decode_tok_s": round(stats.decode_tok_s, 1),
    }  # fmt: skip
    spec = stats.extra["speculative"].summary() if "speculative" in stats.extra else None
    if spec:
        spec = {k: round(v, 3) if isinstance(v, float) else v for k, v in spec.items()}
    if args.json:
        emit_json({"text": text, **summary, **({"speculative": spec} if spec else {})}, args.json, args.force)
    else:
        print(" ".join(f"{k}={v}" for k, v in summary.items()), file=sys.stderr)
        if spec:
            print("speculative: " + " ".join(f"{k}={v}" for k, v in spec.items()), file=sys.stderr)
    return 0
