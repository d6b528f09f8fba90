"""`leanlm info`: a model's architecture, parameter count and bytes per module kind."""

from __future__ import annotations

from .common import add_model_args, check_json_dest, emit_json, load_model, verb_parser


def add_parser(subparsers):
    p = verb_parser(subparsers, "info", help="architecture, parameters and bytes per module kind",
                    description="Show a model's architecture, parameter count and bytes per module kind.",
                    examples=["leanlm info smollm2-135m", "leanlm info gemma3-270m --json -"])  # fmt: skip
    add_model_args(p)
    p.add_argument("--json", metavar="PATH", help="write JSON to PATH ('-' for stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    return p


def model_info(model) -> dict:
    cfg = model.config
    kinds: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        kind = ("embedding" if name.startswith("tok_embeddings") else "lm_head" if name.startswith("lm_head")
                else "norm" if "norm" in name else "attention" if ".attn." in name
                else "mlp" if ".mlp." in name else "other")  # fmt: skip
        n, b = kinds.get(kind, [0, 0])
        kinds[kind] = [n + p.numel(), b + p.numel() * p.element_size()]
    first = cfg.layers[0]
    return {
        "model": str(getattr(model, "source", "")),
        "architecture": cfg.model_type,
        "layers": cfg.n_layers,
        "hidden_size": cfg.hidden_size,
        "heads": first.n_heads,
        "kv_heads": first.n_kv_heads,
        "head_dim": first.head_dim,
        "ffn_dim": first.ffn_dim,
        "uniform_layers": cfg.is_uniform(),
        "sliding_window_layers": sum(1 for l in cfg.layers if l.sliding_window),
        "vocab_size": cfg.vocab_size,
        "context": cfg.max_seq_len,
        "tied_embeddings": cfg.tie_embeddings,
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": sum(n for n, _ in kinds.values()),
        "by_kind": {k: {"params": n, "bytes": b} for k, (n, b) in kinds.items()},
        "kv_bytes_per_token": cfg.kv_bytes_per_token(model.tok_embeddings.weight.element_size()),
    }


def main(args) -> int:
    check_json_dest(args)
    model, _ = load_model(args)
    info = model_info(model)
    if args.json:
        emit_json(info, args.json, args.force)
        return 0
    for k, v in info.items():
        if k != "by_kind":
            print(f"{k:22s} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:22s} {v}")
    print(f"\n{'module kind':12s} {'params':>14s} {'MB':>10s}")
    for k, d in info["by_kind"].items():
        print(f"{k:12s} {d['params']:>14,} {d['bytes'] / 2**20:>10.1f}")
    return 0
