"""`leanlm serve`: an OpenAI-compatible HTTP server for one model."""

from __future__ import annotations

import os
import sys

from ..errors import LeanlmError
from .common import KV_HELP, add_model_args, integer, kv_policy, load_model, verb_parser


def add_parser(subparsers):
    p = verb_parser(subparsers, "serve", help="OpenAI-compatible HTTP server (needs leanlm[serve])",
                    description="Serve one model over an OpenAI-compatible API: /v1/completions, "
                                "/v1/chat/completions (stream=true for SSE), /v1/models, /health, /metrics. "
                                "Requests wait in a bounded queue (full -> 503) and up to --max-active of them are "
                                "decoded together by continuous batching (one forward per step for all of them, each "
                                "with its own KV cache; requests join and leave between steps; every answer is exactly "
                                "the one it gets alone). --speculate, --kv policies and models whose blocks do not run "
                                "as one fused step decode requests in turn instead (interleaved, --quantum steps each; "
                                "--speculate one at a time). A client "
                                "that disconnects cancels its generation. Binds 127.0.0.1 unless --host says "
                                "otherwise; set an API key (LEANLM_API_KEY) before binding other addresses.",
                    examples=["leanlm serve smollm2-135m --port 8000",
                              "LEANLM_API_KEY=secret leanlm serve qwen2.5-0.5b --host 0.0.0.0 --speculate lookup+self",
                              "curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' "
                              "-d '{\"model\": \"smollm2-135m\", \"messages\": [{\"role\": \"user\", "
                              "\"content\": \"Hi\"}], \"max_tokens\": 32}'"])  # fmt: skip
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=integer(1, 65535), default=8000, help="port (default 8000)")
    p.add_argument("--name", help="model id clients send (default: MODEL as given)")
    p.add_argument("--max-queue", type=integer(1), default=16, help="requests that may wait (default 16; more -> 503)")
    p.add_argument("--max-prompt-tokens", type=integer(1), default=None, help="longest prompt accepted (default: context - 1)")
    p.add_argument("--max-tokens-limit", type=integer(1), default=512, help="largest max_tokens a request may ask (default 512)")
    p.add_argument("--max-active", type=integer(1), default=None,
                   help="requests decoded at once, each with its own KV cache: batched together (16 per kernel "
                        "call), or in turn where batching does not apply (default 16; 1 with --speculate, which "
                        "decodes one request at a time; 1 = the serial server)")  # fmt: skip
    p.add_argument("--quantum", type=integer(1), default=8,
                   help="when requests are decoded in turn (--kv, models that cannot batch): decode steps a request "
                        "runs before the next active one's turn (default 8)")  # fmt: skip
    p.add_argument("--max-body-bytes", type=integer(1), default=1 << 20,
                   help="largest request body in bytes (default 1048576; larger -> 413)")  # fmt: skip
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $LEANLM_API_KEY if set, "
                        "else no key; prefer the variable: arguments show in the process list)")  # fmt: skip
    p.add_argument("--kv", help=KV_HELP)
    p.add_argument("--speculate", choices=("lookup", "self", "draft", "lookup+self", "lookup+draft"),
                   help="exact speculative decoding for every request (same output as without), one request at a "
                        "time (not batched); see `leanlm generate --help`")  # fmt: skip
    p.add_argument("--draft", metavar="MODEL", help="draft model for --speculate draft (same tokenizer)")
    p.add_argument("--draft-dtype", default="bfloat16", help="dtype of the draft / self copy (default bfloat16)")
    p.add_argument("--draft-layers", type=integer(1), default=None,
                   help="self-draft = the model's first N layers + LM head (shares its KV cache)")  # fmt: skip
    p.add_argument("--draft-threshold", type=float, default=None,
                   help="stop drafting when the draft's confidence falls below this (default: off)")  # fmt: skip
    p.add_argument("--gamma", default="auto", help="draft tokens per round: N, auto (default) or heuristic")
    return p


def api_key(args) -> str | None:
    """--api-key, else $LEANLM_API_KEY, else None; an empty key is refused (it would guard nothing)."""
    key = args.api_key if args.api_key is not None else os.environ.get("LEANLM_API_KEY")
    if key is not None and not key.strip():
        src = "--api-key" if args.api_key is not None else "LEANLM_API_KEY"
        raise LeanlmError(f"{src} is empty; give a non-empty key, or unset it to serve without one")
    return key.strip() if key is not None else None


def main(args) -> int:
    from ..serve.app import ServerLimits, serve
    from .generate import speculative_decoder

    # every option is checked before the model loads
    if args.speculate and args.max_active not in (None, 1):
        raise LeanlmError("--speculate decodes one request at a time (its draft keeps state between steps); "
                          "drop --max-active or set it to 1")  # fmt: skip
    max_active = args.max_active if args.max_active is not None else (1 if args.speculate else 16)
    limits = ServerLimits(max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                          max_tokens=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                          max_active=max_active, quantum=args.quantum)  # fmt: skip
    key = api_key(args)
    kv = kv_policy(args)
    if kv is not None and args.speculate:
        raise LeanlmError("--kv and --speculate cannot be combined (speculative decoding rolls back a full cache); "
                          "drop one")  # fmt: skip
    if args.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"leanlm: warning: serving on {args.host} without an API key; anyone who can reach it can use it "
              "(set LEANLM_API_KEY)", file=sys.stderr)  # fmt: skip
    model, tok = load_model(args)
    decode_fn = speculative_decoder(args, model) if args.speculate else None
    if decode_fn is None:
        model.prepare_decode()  # the weight layout batch-1 decoding streams fastest, as `leanlm generate` does
    serve(model, tok, args.name or args.model, args.host, args.port, limits, api_key=key, decode_fn=decode_fn, kv=kv)
    return 0
