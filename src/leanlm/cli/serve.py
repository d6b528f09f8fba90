"""`leanlm serve`: an OpenAI-compatible HTTP server for one model."""

from __future__ import annotations

from .common import add_model_args, integer, load_model, verb_parser


def add_parser(subparsers):
    p = verb_parser(subparsers, "serve", help="OpenAI-compatible HTTP server (needs leanlm[serve])",
                    description="Serve one model over an OpenAI-compatible API: /v1/completions, "
                                "/v1/chat/completions (stream=true for SSE), /v1/models, /health, /metrics. "
                                "Requests are generated one at a time from a bounded queue (full -> 503).",
                    examples=["leanlm serve smollm2-135m --port 8000",
                              "curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' "
                              "-d '{\"model\": \"smollm2-135m\", \"messages\": [{\"role\": \"user\", "
                              "\"content\": \"Hi\"}], \"max_tokens\": 32}'"])  # fmt: skip
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=integer(0, 65535), default=8000, help="port (default 8000)")
    p.add_argument("--name", help="model id clients send (default: MODEL as given)")
    p.add_argument("--max-queue", type=integer(1), default=16, help="requests that may wait (default 16; more -> 503)")
    p.add_argument("--max-prompt-tokens", type=integer(1), default=None, help="longest prompt accepted (default: context - 1)")
    p.add_argument("--max-tokens-limit", type=integer(1), default=512, help="largest max_tokens a request may ask (default 512)")
    return p


def main(args) -> int:
    from ..serve.app import ServerLimits, serve

    model, tok = load_model(args)
    model.prepare_decode()  # the weight layout batch-1 decoding streams fastest, as `leanlm generate` does
    limits = ServerLimits(max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                          max_tokens=args.max_tokens_limit)  # fmt: skip
    serve(model, tok, args.name or args.model, args.host, args.port, limits)
    return 0
