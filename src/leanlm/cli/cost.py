"""`leanlm cost`: predicted speed, memory, energy and $ of a model under a compression plan (roofline model)."""

from __future__ import annotations

from .common import MODEL_HELP, emit_json, table, verb_parser


def add_parser(subparsers):
    p = verb_parser(subparsers, "cost", help="predicted speed, memory, energy and $ of a model + plan",
                    description="Roofline cost of the leanlm runtime for MODEL under a compression plan on a "
                                "hardware profile: prefill and decode tok/s, memory, energy per token and $ per 1M "
                                "tokens, with the decode time broken down by op kind.",
                    examples=["leanlm cost smollm2-135m --hw cpu --weights bf16",
                              "leanlm cost smollm2-135m --hw h100 --weights int4 --group 128 --batch 8",
                              "leanlm cost smollm2-135m --hw a100 --weights bf16 --sparsity 0.5 --pattern 2:4"])  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--hw", default="cpu", help="a100, h100, h200, groq-lpu, cpu (calibrated), or a profile JSON")
    p.add_argument("--weights", default=None, help="weight dtype: fp32 bf16 fp16 fp8 int8 int4 (default: the model's)")
    p.add_argument("--compute", default=None, help="activation dtype (default: bf16 for low-bit weights, else weights')")
    p.add_argument("--group", type=int, default=None, help="quantization group size")
    p.add_argument("--sparsity", type=float, default=0.0)
    p.add_argument("--pattern", default="none", help="none, unstructured, 2:4, 4:8")
    p.add_argument("--act-sparsity", type=float, default=0.0, help="fraction of MLP inputs skipped")
    p.add_argument("--kv-dtype", default=None)
    p.add_argument("--kv-window", type=int, default=None, help="KV tokens kept per layer")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--force", action="store_true")
    return p


def main(args) -> int:
    from ..hardware import Plan, estimate, load_profile
    from ..model import load_model

    hw = load_profile(args.hw)
    model = load_model(args.model)
    own = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[str(model.dtype).removeprefix("torch.")]
    weights = args.weights or own
    compute = args.compute or ("bf16" if weights in ("int8", "int4", "fp8") else weights)
    plan = Plan(weight_dtype=weights, compute_dtype=compute, group_size=args.group, sparsity=args.sparsity,
                sparsity_pattern=args.pattern, activation_sparsity=args.act_sparsity, kv_dtype=args.kv_dtype,
                kv_window=args.kv_window)  # fmt: skip
    r = estimate(model.config, hw, plan, args.batch, args.prompt_len, args.context)
    if args.json:
        emit_json(r, args.json, args.force)
    if args.json != "-":
        rows = [("hardware", hw.name), ("plan", f"weights {weights}, compute {compute}" +
                 (f", {args.pattern} sparsity {args.sparsity}" if args.sparsity else "")),
                ("prefill", f"{r['prefill_tok_s']:.1f} tok/s at {args.prompt_len} tokens, batch {args.batch}"),
                ("decode", f"{r['decode_tok_s']:.1f} tok/s ({r['decode_step_ms']:.2f} ms/step, context {args.context})"),
                ("decode breakdown", ", ".join(f"{k} {v:.2f} ms" for k, v in r["decode_breakdown_ms"].items())),
                ("memory", f"{r['memory_gb'] * 1000:.1f} MB (weights {r['weight_mb']:.1f} MB), fits: {r['fits']}"),
                ("energy", f"{r['energy_j_per_token']:.4f} J/token" if hw.power_w else "n/a"),
                ("$ per 1M tokens", f"{r['usd_per_1m_tokens']:.4f}" if r["usd_per_1m_tokens"] else "n/a")]  # fmt: skip
        print(table(rows))
    return 0
