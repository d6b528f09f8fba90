"""`leanlm cost`: predicted speed, memory, energy and $ of a model under a compression plan (roofline model)."""

from __future__ import annotations

from .common import MODEL_HELP, check_json_dest, emit_json, integer, number, table, verb_parser


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
    p.add_argument("--weights", default=None,
                   help="weight dtype: fp32 bf16 fp16 fp8 int8 int4 int3 (default: the model's)")
    p.add_argument("--compute", default=None, help="activation dtype (default: bf16 for low-bit weights, else weights')")
    p.add_argument("--group", type=integer(1), default=None, help="quantization group size")
    p.add_argument("--sparsity", type=number(0, 1, high_open=True), default=0.0)
    p.add_argument("--pattern", default="none", help="none, unstructured, 2:4, 4:8")
    p.add_argument("--act-sparsity", type=number(0, 1, high_open=True), default=0.0, help="fraction of MLP inputs skipped")
    p.add_argument("--kv-dtype", default=None)
    p.add_argument("--kv-window", type=integer(1), default=None, help="KV tokens kept per layer")
    p.add_argument("--batch", type=integer(1), default=1)
    p.add_argument("--prompt-len", type=integer(1), default=512)
    p.add_argument("--context", type=integer(1), default=512)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--force", action="store_true")
    return p


def main(args) -> int:
    from ..apply import plan_for
    from ..hardware import Plan, estimate, load_profile
    from ..model import load_model

    hw = load_profile(args.hw)
    Plan(weight_dtype=args.weights or "fp32", compute_dtype=args.compute or "fp32", kv_dtype=args.kv_dtype,
         sparsity=args.sparsity, sparsity_pattern=args.pattern, activation_sparsity=args.act_sparsity).validate()
    check_json_dest(args)  # all of it before the model loads
    model = load_model(args.model)
    # the model's own format: what leanlm applied to it (a quantized directory streams int4/int8 weights)
    plan = plan_for(model)
    if args.weights:
        plan.weight_dtype, plan.group_size = args.weights, None
        plan.compute_dtype = "bf16" if args.weights in ("int8", "int4", "fp8") else args.weights
    if args.compute:
        plan.compute_dtype = args.compute
    overrides = {"group_size": args.group, "kv_dtype": args.kv_dtype, "kv_window": args.kv_window}
    for key, value in overrides.items():
        if value is not None:
            setattr(plan, key, value)
    if args.sparsity:
        plan.sparsity, plan.sparsity_pattern = args.sparsity, args.pattern
    if args.act_sparsity:
        plan.activation_sparsity = args.act_sparsity
    weights, compute = plan.weight_dtype, plan.compute_dtype
    r = estimate(model.config, hw, plan, args.batch, args.prompt_len, args.context)
    if args.json:
        emit_json(r, args.json, args.force)
    if args.json != "-":
        rows = [("hardware", hw.name), ("plan", f"weights {weights}, compute {compute}" +
                 (f", group {plan.group_size}" if plan.group_size else "") +
                 (f", {plan.sparsity_pattern} sparsity {plan.sparsity:g}" if plan.sparsity else "")),
                ("prefill", f"{r['prefill_tok_s']:.1f} tok/s at {args.prompt_len} tokens, batch {args.batch}"),
                ("decode", f"{r['decode_tok_s']:.1f} tok/s ({r['decode_step_ms']:.2f} ms/step, context {args.context})"),
                ("decode breakdown", ", ".join(f"{k} {v:.2f} ms" for k, v in r["decode_breakdown_ms"].items())),
                ("memory", f"{r['memory_gb'] * 1000:.1f} MB (weights {r['weight_mb']:.1f} MB), fits: {r['fits']}"),
                ("energy", f"{r['energy_j_per_token']:.4f} J/token" if hw.power_w else "n/a"),
                ("$ per 1M tokens", f"{r['usd_per_1m_tokens']:.4f}" if r["usd_per_1m_tokens"] else "n/a")]  # fmt: skip
        print(table(rows))
    return 0
