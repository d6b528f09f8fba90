"""leanlm command line: one verb per job (info, generate, eval)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import LeanlmError

MODEL_HELP = "default name (smollm2-135m, gemma3-270m), a .gguf file, or a Hugging Face model directory"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--dtype", default="float32", help="weights/compute dtype: float32 | bfloat16 (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def _setup(args):
    import torch

    from .model import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, dtype=args.dtype, device=args.device)


def _emit_json(obj, dest: str | None, force: bool) -> None:
    from .io import write_json_atomic

    if dest == "-":
        print(json.dumps(obj, indent=2, default=str))
    elif dest:
        write_json_atomic(dest, obj, force)
        print(f"wrote {dest}", file=sys.stderr)


# ---- info -------------------------------------------------------------------------
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


def cmd_info(args) -> int:
    model, _ = _setup(args)
    info = model_info(model)
    if args.json:
        _emit_json(info, args.json, args.force)
        return 0
    for k, v in info.items():
        if k != "by_kind":
            print(f"{k:22s} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:22s} {v}")
    print(f"\n{'module kind':12s} {'params':>14s} {'MB':>10s}")
    for k, d in info["by_kind"].items():
        print(f"{k:12s} {d['params']:>14,} {d['bytes'] / 2**20:>10.1f}")
    return 0


# ---- generate -----------------------------------------------------------------------
def cmd_generate(args) -> int:
    from .decode.generate import GenerationStats, Sampling, generate

    model, tok = _setup(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    stats = GenerationStats()
    chat = None if args.chat is None else args.chat
    text = generate(model, tok, prompt, args.max_new_tokens, sampling, chat, args.stop,
                    stream=None if args.json else sys.stdout, stats=stats)  # fmt: skip
    summary = {
        "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens, "stop_reason": stats.stop_reason,
        "ttft_ms": round(stats.prefill_s * 1e3, 1), "decode_tok_s": round(stats.decode_tok_s, 1),
    }  # fmt: skip
    if args.json:
        _emit_json({"text": text, **summary}, args.json, args.force)
    else:
        print(" ".join(f"{k}={v}" for k, v in summary.items()), file=sys.stderr)
    return 0


# ---- eval ---------------------------------------------------------------------------
def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def run_eval(args) -> dict:
    """Everything `leanlm eval` measures, as one JSON-able dict."""
    from .evaluate import data, speed, tasks
    from .evaluate.perplexity import kl_divergence, perplexity
    from .model import load

    names = []
    if args.tasks:  # validate before loading anything
        names = list(tasks.TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",")]
        for t in names:
            if t not in tasks.TASKS:
                raise LeanlmError(f"unknown task '{t}'; available: {', '.join(tasks.TASKS)} (or 'all')")
    model, tok = _setup(args)
    want_any = args.ppl or args.kl_ref or args.tasks or args.speed or args.memory
    result: dict = {"model": args.model, "dtype": args.dtype, "threads": __import__("torch").get_num_threads(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    text = None
    if args.ppl or args.kl_ref or not want_any:
        text = data.read_text(args.text, args.data_dir)
    if args.ppl or not want_any:
        result["perplexity"] = {"text": args.text, **perplexity(model, tok, text, args.seq_len, args.windows)}
    if args.kl_ref:
        ref, _ = load(args.kl_ref, dtype="float32", device=args.device)
        result["kl"] = {"reference": args.kl_ref, "text": args.text,
                        **kl_divergence(ref, model, tok, text, args.seq_len, args.windows)}  # fmt: skip
        del ref
    if names:
        result["tasks"] = {t: tasks.evaluate_task(model, tok, t, args.data_dir, args.limit) for t in names}
    if args.speed or not want_any:
        result["speed"] = speed.measure_speed(model, args.prompt_len, args.new_tokens, args.runs)
    if args.memory or not want_any:
        result["memory"] = speed.memory_report(model)
    return result


def format_eval(r: dict) -> str:
    rows = [("model", f"{r['model']} ({r['dtype']}, {r['threads']} threads)")]
    if "perplexity" in r:
        p = r["perplexity"]
        rows.append(("perplexity", f"{p['ppl']:.4f}  ({p['text']}, {p['windows']}x{p['seq_len']}, {p['tokens']} tokens)"))
    if "kl" in r:
        k = r["kl"]
        rows.append(("KL vs reference", f"{k['kl']:.5f}  top-1 agreement {k['top1_agreement']:.2%}  "
                                        f"(ppl {k['ppl']:.3f} vs {k['ppl_base']:.3f})"))  # fmt: skip
    for t, res in r.get("tasks", {}).items():
        line = f"acc {res['acc']:.4f} ± {res['acc_stderr']:.4f}"
        if "acc_norm" in res:
            line += f"  acc_norm {res['acc_norm']:.4f} ± {res['acc_norm_stderr']:.4f}"
        if "ppl" in res:
            line += f"  ppl {res['ppl']:.3f}"
        rows.append((f"{t} (n={res['n']})", line))
    if "speed" in r:
        s = r["speed"]
        rows.append((f"prefill @{s['prompt_len']}", f"{s['prefill_tok_s']['median']:.1f} tok/s "
                     f"(min {s['prefill_tok_s']['min']:.1f}, max {s['prefill_tok_s']['max']:.1f})"))  # fmt: skip
        rows.append(("time to first token", f"{s['ttft_ms']['median']:.1f} ms"))
        rows.append((f"decode ({s['new_tokens']} tokens)", f"{s['decode_tok_s']['median']:.1f} tok/s "
                     f"(min {s['decode_tok_s']['min']:.1f}, max {s['decode_tok_s']['max']:.1f}, {s['decode_tok_s']['runs']} runs)"))  # fmt: skip
    if "memory" in r:
        m = r["memory"]
        rows.append(("weights", f"{m['weight_mb']:.1f} MB"))
        rows.append(("KV cache", f"{m['kv_bytes_per_token'] / 1024:.1f} KiB per token"))
        rows.append(("peak RSS", f"{m['peak_rss_mb']:.0f} MB"))
        if "disk_mb" in m:
            rows.append(("size on disk", f"{m['disk_mb']:.1f} MB"))
    return _table(rows)


def cmd_eval(args) -> int:
    if args.json and args.json != "-":
        from .io import check_writable

        check_writable(args.json, args.force)  # fail before an hour of evaluation, not after
    result = run_eval(args)
    print(format_eval(result), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        _emit_json(result, args.json, args.force)
    return 0


# ---- hardware and cost --------------------------------------------------------------
def cmd_hw(args) -> int:
    from dataclasses import asdict

    from .hardware import load_profile, save_profile
    from .hardware.calibrate import calibrate

    if args.action == "calibrate":
        prof = calibrate(args.threads)
        print(f"saved {save_profile(prof)}", file=sys.stderr)
    else:
        prof = load_profile(args.name)
    d = asdict(prof)
    if args.json:
        _emit_json(d, args.json, args.force)
    if args.json != "-":
        print(_table([(k, json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in d.items()]))
    return 0


def cmd_cost(args) -> int:
    from .hardware import Plan, estimate, load_profile
    from .model import load_model

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
        _emit_json(r, args.json, args.force)
    if args.json != "-":
        rows = [("hardware", hw.name), ("plan", f"weights {weights}, compute {compute}" +
                 (f", {args.pattern} sparsity {args.sparsity}" if args.sparsity else "")),
                ("prefill", f"{r['prefill_tok_s']:.1f} tok/s at {args.prompt_len} tokens, batch {args.batch}"),
                ("decode", f"{r['decode_tok_s']:.1f} tok/s ({r['decode_step_ms']:.2f} ms/step, context {args.context})"),
                ("decode breakdown", ", ".join(f"{k} {v:.2f} ms" for k, v in r["decode_breakdown_ms"].items())),
                ("memory", f"{r['memory_gb'] * 1000:.1f} MB (weights {r['weight_mb']:.1f} MB), fits: {r['fits']}"),
                ("energy", f"{r['energy_j_per_token']:.4f} J/token" if hw.power_w else "n/a"),
                ("$ per 1M tokens", f"{r['usd_per_1m_tokens']:.4f}" if r["usd_per_1m_tokens"] else "n/a")]  # fmt: skip
        print(_table(rows))
    return 0


# ---- export / serve -----------------------------------------------------------------
def cmd_export(args) -> int:
    from .io import check_writable

    check_writable(args.out, args.force)  # fail before loading the model
    if args.format == "hf" and args.type not in (None, "f32", "f16", "bf16"):
        raise LeanlmError(f"--type {args.type} is for --format gguf; hf takes f32 | f16 | bf16")
    if args.format == "gguf" and args.type == "bf16":
        raise LeanlmError("--format gguf takes --type f32 | f16 | q8_0 | q4_0")
    model, tok = _setup(args)
    t0 = time.time()
    if args.format == "gguf":
        from .export import export_gguf

        path = export_gguf(model, tok, args.out, args.type or "f16", force=args.force)
    else:
        from .export import export_hf

        dtype = {None: None, "f32": "float32", "f16": "float16", "bf16": "bfloat16"}[args.type]
        path = export_hf(model, tok, args.out, force=args.force, dtype=dtype)
    size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    print(f"wrote {path} ({size / 2**20:.1f} MB, {time.time() - t0:.1f} s)", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from .serve.app import ServerLimits, serve

    model, tok = _setup(args)
    limits = ServerLimits(max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                          max_tokens=args.max_tokens_limit)  # fmt: skip
    serve(model, tok, args.name or args.model, args.host, args.port, limits)
    return 0


# ---- parser -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="leanlm", formatter_class=fmt,
        description="leanlm: make a transformer LM cheaper per token, and prove it by measurement.",
        epilog="examples:\n  leanlm info smollm2-135m\n  leanlm generate smollm2-135m --prompt 'Tell me a joke'\n"
               "  LEANLM_DATA=../shared/data leanlm eval smollm2-135m --ppl --speed --memory",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("info", formatter_class=fmt, help="architecture, parameters and bytes per module kind",
                       description="Show a model's architecture, parameter count and bytes per module kind.",
                       epilog="example:\n  leanlm info smollm2-135m --json -")  # fmt: skip
    _common(p)
    p.add_argument("--json", metavar="PATH", help="write JSON to PATH ('-' for stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", formatter_class=fmt, help="generate text (greedy or sampled), streamed",
                       description="Generate text from a prompt, streamed to the terminal. Instruct models get "
                                   "their chat template unless --no-chat. Temperature 0 (default) is greedy.",
                       epilog="examples:\n  leanlm generate smollm2-135m --prompt 'What is a GPU?'\n"
                              "  leanlm generate gemma3-270m --prompt 'Once upon a time' --temperature 0.8 "
                              "--top-p 0.9 --seed 1\n  echo 'Hello' | leanlm generate smollm2-135m --stop '.'")  # fmt: skip
    _common(p)
    p.add_argument("--prompt", help="prompt text (default: read standard input)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--chat", dest="chat", action="store_true", default=None, help="force the chat template")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="plain completion, no chat template")
    p.add_argument("--json", metavar="PATH", help="write text and stats as JSON instead of streaming")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", formatter_class=fmt, help="perplexity, KL, zero-shot tasks, speed, memory",
                       description="Measure quality and cost in one report. With no metric flags: --ppl --speed "
                                   "--memory. Data comes from --data-dir or $LEANLM_DATA (layout of shared/data).",
                       epilog="examples:\n  leanlm eval smollm2-135m --ppl --speed --memory --json run.json\n"
                              "  leanlm eval smollm2-135m --dtype bfloat16 --kl-ref smollm2-135m\n"
                              "  leanlm eval gemma3-270m --tasks hellaswag,piqa,arc_easy --limit 500")  # fmt: skip
    _common(p)
    p.add_argument("--data-dir", help="evaluation data folder (default $LEANLM_DATA)")
    p.add_argument("--ppl", action="store_true", help="perplexity on --text")
    p.add_argument("--kl-ref", metavar="MODEL", help="KL divergence and top-1 agreement vs this reference (fp32)")
    p.add_argument("--text", default="wikitext2", help="wikitext2 (default), moby-dick, pride-and-prejudice, or a file")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window length (default 512)")
    p.add_argument("--windows", type=int, default=40, help="number of windows, 0 = whole text (default 40)")
    p.add_argument("--tasks", help="comma list of hellaswag,piqa,arc_easy,arc_challenge,winogrande,boolq,"
                                   "lambada,openbookqa, or 'all'")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    p.add_argument("--speed", action="store_true", help="prefill / decode tok/s and time to first token")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill prompt length (default 512)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode tokens per run (default 128)")
    p.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up (default 5)")
    p.add_argument("--memory", action="store_true", help="weight MB, KV bytes/token, peak RSS, size on disk")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH ('-' for stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("hw", formatter_class=fmt, help="hardware profiles: calibrate this CPU, show profiles",
                       description="Hardware profiles for the cost model. `calibrate` measures this machine "
                                   "(GEMV bandwidth per dtype, GEMM throughput, per-layer dispatch overhead; about a "
                                   "minute) and saves it as the 'cpu' profile; `show` prints a profile.",
                       epilog="examples:\n  leanlm hw calibrate --threads 2\n  leanlm hw show h100")  # fmt: skip
    p.add_argument("action", choices=["calibrate", "show"])
    p.add_argument("name", nargs="?", default="cpu", help="profile for show: a100, h100, h200, groq-lpu, cpu, or a JSON file")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", metavar="PATH", help="also write the profile as JSON to PATH ('-' for stdout)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_hw)

    p = sub.add_parser("cost", formatter_class=fmt, help="predicted speed, memory, energy and $ of a model + plan",
                       description="Roofline cost of the leanlm runtime for MODEL under a compression plan on a "
                                   "hardware profile: prefill and decode tok/s, memory, energy per token and $ per 1M "
                                   "tokens, with the decode time broken down by op kind.",
                       epilog="examples:\n  leanlm cost smollm2-135m --hw cpu --weights bf16\n"
                              "  leanlm cost smollm2-135m --hw h100 --weights int4 --group 128 --batch 8\n"
                              "  leanlm cost smollm2-135m --hw a100 --weights bf16 --sparsity 0.5 --pattern 2:4")  # fmt: skip
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
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("export", formatter_class=fmt, help="write a GGUF file (llama.cpp) or an HF directory",
                       description="Export a model: --format gguf writes one llama.cpp-loadable file (f32 | f16 | "
                                   "q8_0 | q4_0; Llama-family, uniform layers); --format hf writes a transformers "
                                   "directory (safetensors). Written atomically; an existing --out needs --force.",
                       epilog="examples:\n  leanlm export smollm2-135m --format gguf --type q8_0 --out smollm2-q8_0.gguf\n"
                              "  leanlm export smollm2-135m --format hf --type bf16 --out out/smollm2-bf16\n"
                              "  python -c \"from llama_cpp import Llama; print(Llama('smollm2-q8_0.gguf')('Hi', max_tokens=8))\"")  # fmt: skip
    _common(p)
    p.add_argument("--format", choices=("gguf", "hf"), default="gguf", help="gguf (default) or hf")
    p.add_argument("--type", choices=("f32", "f16", "bf16", "q8_0", "q4_0"), default=None,
                   help="gguf: f32 | f16 (default) | q8_0 | q4_0; hf: f32 | f16 | bf16 (default: the model's dtype)")
    p.add_argument("--out", required=True, help="output .gguf file or directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", formatter_class=fmt, help="OpenAI-compatible HTTP server (needs leanlm[serve])",
                       description="Serve one model over an OpenAI-compatible API: /v1/completions, "
                                   "/v1/chat/completions (stream=true for SSE), /v1/models, /health, /metrics. "
                                   "Requests are generated one at a time from a bounded queue (full -> 503).",
                       epilog="examples:\n  leanlm serve smollm2-135m --port 8000\n"
                              "  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' "
                              "-d '{\"model\": \"smollm2-135m\", \"messages\": [{\"role\": \"user\", "
                              "\"content\": \"Hi\"}], \"max_tokens\": 32}'")  # fmt: skip
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", help="model id clients send (default: MODEL as given)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait (default 16; more -> 503)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: context - 1)")
    p.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask (default 512)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LeanlmError as e:
        print(f"leanlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
