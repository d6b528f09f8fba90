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


# ---- KV-cache policies (leanlm.attention) ----------------------------------------------
KV_HELP = ("KV-cache policy: int8 | int4 | sinks:4,window:1024[,int8] | h2o:BUDGET[,window:N] | "
           "snapkv:BUDGET[,obs:N] (default: full cache in the model dtype)")


def _kv_policy(args):
    from .attention import KVPolicy

    return KVPolicy.parse(getattr(args, "kv", None))


# ---- generate -----------------------------------------------------------------------
def _speculative_decoder(args, model):
    """--speculate: a decode_fn for generate() running exact speculative decoding."""
    import functools

    from .decode.kernels import pack_model
    from .decode.speculative import make_draft, make_policy, self_draft_model, speculative_generate_tokens
    from .model import fused, load

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


def cmd_generate(args) -> int:
    from .decode.generate import GenerationStats, Sampling, generate

    kv = _kv_policy(args)
    model, tok = _setup(args)
    _apply_adaptive(args, model, tok)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    stats = GenerationStats()
    chat = None if args.chat is None else args.chat
    decode_fn = _speculative_decoder(args, model) if getattr(args, "speculate", None) else None
    if decode_fn is None:
        model.prepare_decode()  # the weight layout batch-1 decoding streams fastest
    text = generate(model, tok, prompt, args.max_new_tokens, sampling, chat, args.stop,
                    stream=None if args.json else sys.stdout, stats=stats, kv=kv, decode_fn=decode_fn)  # fmt: skip
    summary = {
        "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens, "stop_reason": stats.stop_reason,
        "ttft_ms": round(stats.prefill_s * 1e3, 1), "decode_tok_s": round(stats.decode_tok_s, 1),
    }  # fmt: skip
    spec = stats.extra["speculative"].summary() if "speculative" in stats.extra else None
    if spec:
        spec = {k: round(v, 3) if isinstance(v, float) else v for k, v in spec.items()}
    if args.json:
        _emit_json({"text": text, **summary, **({"speculative": spec} if spec else {})}, args.json, args.force)
    else:
        print(" ".join(f"{k}={v}" for k, v in summary.items()), file=sys.stderr)
        if spec:
            print("speculative: " + " ".join(f"{k}={v}" for k, v in spec.items()), file=sys.stderr)
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
    _kv_policy(args)  # a bad --kv fails before the model loads
    model, tok = _setup(args)
    adaptive = _apply_adaptive(args, model, tok)
    want_any = args.ppl or args.kl_ref or args.tasks or args.speed or args.memory
    result: dict = {"model": args.model, "dtype": args.dtype, "threads": __import__("torch").get_num_threads(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    text = None
    if args.ppl or args.kl_ref or not want_any:
        text = data.read_text(args.text, args.data_dir)
    kv = _kv_policy(args)
    if kv is not None and (args.kl_ref or names or args.speed):
        raise LeanlmError("--kv applies to --ppl and --memory only")
    if kv is not None and (args.ppl or not want_any):  # policy-aware scoring (leanlm.attention.longctx)
        from .attention.longctx import policy_perplexity

        r = policy_perplexity(model, tok, text, args.seq_len, args.windows, kv, args.kv_chunk)
        result["perplexity"] = {"text": args.text, "kv": kv.describe(), **r}
    elif args.ppl or not want_any:
        with _compute_meter(model, adaptive):
            result["perplexity"] = {"text": args.text, **perplexity(model, tok, text, args.seq_len, args.windows)}
    if args.kl_ref:
        ref, _ = load(args.kl_ref, dtype="float32", device=args.device)
        with _compute_meter(model, adaptive):
            result["kl"] = {"reference": args.kl_ref, "text": args.text,
                            **kl_divergence(ref, model, tok, text, args.seq_len, args.windows)}  # fmt: skip
        del ref
    if adaptive is not None:
        result["adaptive"] = adaptive
    if names:
        result["tasks"] = {t: tasks.evaluate_task(model, tok, t, args.data_dir, args.limit) for t in names}
    if args.speed or not want_any:
        model.prepare_decode()  # as `leanlm generate` decodes
        result["speed"] = speed.measure_speed(model, args.prompt_len, args.new_tokens, args.runs)
    if args.memory or not want_any:
        result["memory"] = speed.memory_report(model)
        if kv is not None and "perplexity" in result:  # bytes the policy cache held at --seq-len
            result["memory"]["kv_bytes_per_token"] = result["perplexity"]["kv_bytes_per_token"]
    return result


def _apply_adaptive(args, model, tok) -> dict | None:
    """--adaptive specs (leanlm.adaptive): calibrate and install them; None without any."""
    specs = getattr(args, "adaptive", None)
    if not specs:
        return None
    from .adaptive import apply_adaptive, parse_adaptive

    if getattr(args, "kv", None):
        raise LeanlmError("--adaptive cannot be combined with --kv (skipped layers write a full cache); drop one")
    from pathlib import Path

    from .adaptive import load_adaptive

    saved = [s for s in specs if s.endswith(".safetensors") or Path(s).is_dir()]
    cfgs = [parse_adaptive(s) for s in specs if s not in saved]
    reports = [{"method": "saved", "path": s, "loaded": sorted(k for k in load_adaptive(model, s) if k not in
                ("version", "n_layers"))} for s in saved]  # fmt: skip
    reports += apply_adaptive(model, cfgs, tok, args.adaptive_calib, getattr(args, "data_dir", None)) if cfgs else []
    return {"specs": list(specs), "calibration": args.adaptive_calib, "methods": reports}


def _compute_meter(model, adaptive):
    """Count the FLOPs fraction of an adaptive model while quality is scored (same decisions)."""
    import contextlib

    if adaptive is None:
        return contextlib.nullcontext()
    from .adaptive import meter

    @contextlib.contextmanager
    def run():
        with meter(model) as m:
            yield
        adaptive["compute"] = m.summary()

    return run()


def format_eval(r: dict) -> str:
    rows = [("model", f"{r['model']} ({r['dtype']}, {r['threads']} threads)")]
    if "adaptive" in r:
        a = r["adaptive"]
        rows.append(("adaptive", " + ".join(a["specs"])))
        c = a.get("compute")
        if c and c.get("tokens"):
            rows.append(("compute used", f"{c['flops_fraction_layers']:.1%} of the decoder's FLOPs per token "
                                         f"({c['flops_fraction']:.1%} incl. LM head; {c['layers_skipped_fraction']:.2f} "
                                         f"layers skipped per token; {c['tokens']} tokens)"))  # fmt: skip
    if "perplexity" in r:
        p = r["perplexity"]
        rows.append(("perplexity", f"{p['ppl']:.4f}  ({p['text']}, {p['windows']}x{p['seq_len']}, {p['tokens']} tokens)"))
        if "kv" in p:
            rows.append(("KV policy", f"{p['kv']}: {p['kv_bytes_per_token']:,.0f} B/token at {p['seq_len']}, "
                                      f"second-half ppl {p['ppl_tail']:.4f}"))  # fmt: skip
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


def cmd_compress(args) -> int:
    import torch

    from .recipe import compress, load_recipe

    recipe = load_recipe(args.recipe)
    if args.check:
        print(f"recipe {recipe.name}: {len(recipe.steps)} valid step(s): " + ", ".join(s.kind for s in recipe.steps))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    report = compress(args.model, recipe, args.out, args.force)
    print(f"wrote {args.out} in {report['seconds']:.0f} s; measure it with: leanlm eval {args.out}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from .report import render, summary_table

    out = render(args.run, args.out, args.force)
    table = summary_table(json.loads(open(args.run).read()))
    if table:
        print(table)
    print(f"wrote {out}", file=sys.stderr)
    return 0


# ---- prune --------------------------------------------------------------------------
def cmd_prune(args) -> int:
    """Validate everything before loading the model, prune, optionally heal, save atomically."""
    import copy

    from .evaluate.speed import disk_bytes, weight_bytes
    from .io import check_writable
    from .prune import (Structured, Unstructured, calibration_tokens, heal, prune_structured, prune_unstructured,
                        save_compressed)  # fmt: skip

    if (args.method is None) == (args.structured is None):
        raise LeanlmError("choose either --method magnitude|wanda|sparsegpt (unstructured / N:M) "
                          "or --structured neurons|heads|layers")  # fmt: skip
    if args.method:
        cfg = Unstructured(args.method, args.sparsity, args.pattern, args.allocation)
    else:
        cfg = Structured(args.structured, args.ratio, args.remove, args.importance, args.scope, args.head_mode)
    check_writable(args.out, args.force)
    if args.json and args.json != "-":
        check_writable(args.json, args.force)
    if args.heal_steps and args.dtype not in ("float32", "fp32"):
        raise LeanlmError("healing trains in float32: drop --dtype or use --heal-steps 0")

    model, tok = _setup(args)
    needs_calib = cfg.needs_calibration if args.method else (cfg.kind == "layers" or cfg.importance != "magnitude")
    calib = None
    if needs_calib or args.heal_steps:
        calib = calibration_tokens(tok, args.calib_text, args.calib_samples, args.calib_seq_len, data_dir=args.data_dir)
    teacher = copy.deepcopy(model) if args.heal_steps or args.eval_windows else None
    before = {"weight_mb": weight_bytes(model) / 2**20, "params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    if args.method:
        report = prune_unstructured(model, cfg, calib)
    else:
        report = prune_structured(model, cfg, calib)
    result = {"model": args.model, "out": str(args.out), "pruning": report, "before": before,
              "prune_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip

    def quality(tag):
        if not args.eval_windows:
            return
        from .evaluate import data
        from .evaluate.perplexity import kl_divergence

        text = data.read_text("wikitext2", args.data_dir)
        result[tag] = kl_divergence(teacher, model, tok, text, 512, args.eval_windows)
        print(f"{tag}: ppl {result[tag]['ppl']:.3f} (base {result[tag]['ppl_base']:.3f}), KL {result[tag]['kl']:.4f}")

    quality("quality_pruned")
    if args.heal_steps:
        heal_tokens = calibration_tokens(tok, args.calib_text, max(64, args.heal_steps * args.heal_batch),
                                         args.heal_seq_len, seed=1, data_dir=args.data_dir)  # fmt: skip
        result["heal"] = heal(model, teacher, heal_tokens, args.heal_steps, args.heal_lr, args.heal_batch,
                              keep_zeros=bool(args.method))  # fmt: skip
        quality("quality_healed")
    teacher = None  # free it before saving
    if args.method and args.storage == "bitmask":
        save_compressed(model, tok, args.out, args.force)
    else:
        from .model import save

        save(model, tok, args.out, args.force)
    result["after"] = {"weight_mb": weight_bytes(model) / 2**20, "params": sum(p.numel() for p in model.parameters()),
                       "disk_mb": disk_bytes(args.out) / 2**20, "uniform_layers": model.config.is_uniform()}  # fmt: skip
    a = result["after"]
    if args.method:
        note = (f"sparsity {report['sparsity_prunable']:.1%} of block weights ({report['sparsity_all_params']:.1%} of all). "
                + ("Stored as bitmask + values (leanlm.load reads it; transformers does not)."
                   if args.storage == "bitmask" else
                   "Stored dense (zeros kept): same size and speed as the original; --storage bitmask shrinks the file."))  # fmt: skip
    else:
        note = (f"params {before['params']:,} -> {a['params']:,}; "
                + ("uniform widths: loads in transformers." if a["uniform_layers"] else
                   "per-layer widths: loads in leanlm (config.json leanlm_layers), not in transformers."))  # fmt: skip
    print(f"wrote {args.out} ({a['disk_mb']:.1f} MB on disk, weights {before['weight_mb']:.1f} -> {a['weight_mb']:.1f} MB "
          f"in memory). {note}")  # fmt: skip
    if args.json:
        _emit_json(result, args.json, args.force)
    return 0


def cmd_search(args) -> int:
    import os

    import torch

    from .recipe.search import search
    from .report import summary_table

    if args.json and args.json != "-":
        from .io import check_writable

        check_writable(args.json, args.force)
    if args.data_dir:
        os.environ["LEANLM_DATA"] = args.data_dir
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.max_ppl_increase.strip()
    try:
        frac = float(budget[:-1]) / 100 if budget.endswith("%") else float(budget)
    except ValueError:
        raise LeanlmError(f"--max-ppl-increase takes a percentage like 3% or a fraction like 0.03, got {budget!r}")
    result = search(args.model, args.hw, frac, args.trials, args.windows, args.runs)
    print(summary_table(result), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        _emit_json(result, args.json, args.force)
    return 0


# ---- parser -------------------------------------------------------------------------
def _adaptive_args(p) -> None:
    from .adaptive import SPEC_HELP

    p.add_argument("--adaptive", action="append", metavar="SPEC", help=SPEC_HELP + "; e.g. teal:0.5, exit:kl=0.05, skip:0.2")
    p.add_argument("--adaptive-calib", default="wikitext2-valid", metavar="TEXT",
                   help="calibration text for --adaptive (default wikitext2-valid; never the eval split)")  # fmt: skip


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
    p.add_argument("--kv", help=KV_HELP)
    _adaptive_args(p)
    p.add_argument("--json", metavar="PATH", help="write text and stats as JSON instead of streaming")
    p.add_argument("--speculate", choices=("lookup", "self", "draft", "lookup+self", "lookup+draft"),
                   help="exact speculative decoding (same output as without): lookup = prompt n-gram lookup; "
                        "self = a bf16 copy of the model drafts (or its first --draft-layers layers); "
                        "draft = --draft MODEL drafts; lookup+X = lookup, X when nothing matches")  # fmt: skip
    p.add_argument("--draft", metavar="MODEL", help="draft model for --speculate draft (same tokenizer)")
    p.add_argument("--draft-dtype", default="bfloat16", help="dtype of the draft / self copy (default bfloat16)")
    p.add_argument("--draft-layers", type=int, default=None,
                   help="self-draft = the model's first N layers + LM head (shares its KV cache)")  # fmt: skip
    p.add_argument("--draft-threshold", type=float, default=None,
                   help="stop drafting when the draft's confidence falls below this (default: off)")  # fmt: skip
    p.add_argument("--gamma", default="auto", help="draft tokens per round: N, auto (learned online, default) or heuristic")
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
    p.add_argument("--kv", help=KV_HELP + "; perplexity is then scored chunk by chunk through the cache")
    p.add_argument("--kv-chunk", type=int, default=256, help="chunk length for --kv perplexity (default 256)")
    _adaptive_args(p)
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

    p = sub.add_parser("compress", formatter_class=fmt, help="apply a YAML recipe (prune, quantize, dtype, kv) and save",
                       description="Apply the steps of a recipe in order (one calibration pass shared by all steps) "
                                   "and save the result; `leanlm eval OUT` then measures it. See examples/recipes/.",
                       epilog="examples:\n  leanlm compress smollm2-135m examples/recipes/gptq-int4.yaml --out out/gptq4\n"
                              "  leanlm compress smollm2-135m examples/recipes/lean.yaml --out out/lean --force")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("recipe", help="YAML recipe file")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--check", action="store_true", help="only validate the recipe and print its cost-model plan")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("report", formatter_class=fmt, help="HTML report (plots + tables) from a result JSON",
                       description="Render a result JSON (leanlm eval --json, a benchmark's results/*.json, a search) "
                                   "as an HTML page with plots (speed vs peers, Pareto front, sensitivity, predicted vs "
                                   "measured) next to it, and print a compact table.",
                       epilog="example:\n  leanlm report benchmarks/results/runtime_smollm2-135m.json --out report.html")  # fmt: skip
    p.add_argument("run", help="result JSON")
    p.add_argument("--out", help="HTML path (default: RUN.html)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("search", formatter_class=fmt, help="Pareto front of recipes: cost model prunes, measurement confirms",
                       description="Enumerate recipes (dtype x int8/int4 RTN/GPTQ/AWQ x FFN-neuron and layer pruning), "
                                   "price them with the cost model for --hw, measure the most promising --trials "
                                   "(perplexity on --windows WikiText-2 windows, decode tok/s) and report the measured "
                                   "Pareto front within --max-ppl-increase.",
                       epilog="example:\n  leanlm hw calibrate && leanlm search smollm2-135m --hw cpu --max-ppl-increase 3% "
                              "--trials 8 --json runs/search.json\n  leanlm report runs/search.json")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--hw", default="cpu", help="hardware profile used to price candidates (default: calibrated cpu)")
    p.add_argument("--max-ppl-increase", default="3%", help="quality budget, e.g. 3%% or 0.03 (default 3%%)")
    p.add_argument("--trials", type=int, default=6, help="candidates measured, baseline included (default 6)")
    p.add_argument("--windows", type=int, default=8, help="WikiText-2 windows of 512 per trial (default 8)")
    p.add_argument("--runs", type=int, default=3, help="decode timing runs per trial (default 3)")
    p.add_argument("--backend", default="local", choices=["local"], help="where trials run (local)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", help="evaluation data folder (default $LEANLM_DATA)")
    p.add_argument("--json", metavar="PATH", help="write the search as JSON (render it with leanlm report)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_search)

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

    p = sub.add_parser("prune", formatter_class=fmt, help="unstructured / N:M / structured pruning, healing, save",
                       description="Prune a model and save it. Unstructured and N:M (--method) zero weights: the file "
                                   "shrinks only with --storage bitmask (default), speed does not change. Structured "
                                   "pruning (--structured) removes FFN neurons, attention heads or whole layers: a "
                                   "smaller, faster dense model. --heal-steps distils it back towards the original.",
                       epilog="examples:\n  leanlm prune smollm2-135m --method wanda --sparsity 0.5 --out pruned-w50\n"
                              "  leanlm prune smollm2-135m --method sparsegpt --pattern 2:4 --out pruned-24\n"
                              "  leanlm prune smollm2-135m --structured neurons --ratio 0.25 --heal-steps 100 --out ffn75\n"
                              "  leanlm prune smollm2-135m --structured layers --remove 4 --eval-windows 10 --out l26\n"
                              "  leanlm prune gemma3-270m --structured heads --ratio 0.25 --head-mode q --out g-heads")  # fmt: skip
    _common(p)
    p.add_argument("--out", required=True, help="output directory (written atomically; --force to replace)")
    p.add_argument("--force", action="store_true", help="replace an existing --out / --json")
    g = p.add_argument_group("unstructured / N:M")
    g.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), help="weight pruning criterion")
    g.add_argument("--sparsity", type=float, help="fraction of block weights zeroed, in [0, 1)")
    g.add_argument("--pattern", help="N:M semi-structured pattern, e.g. 2:4 or 4:8 (N kept of every M)")
    g.add_argument("--allocation", default="uniform", choices=("uniform", "owl"),
                   help="per-layer ratios: uniform, or OWL outlier-weighted (default uniform)")
    g.add_argument("--storage", default="bitmask", choices=("bitmask", "dense"),
                   help="bitmask: smaller file, leanlm-only (default); dense: zeros stored, transformers-loadable")
    g = p.add_argument_group("structured")
    g.add_argument("--structured", choices=("neurons", "heads", "layers"), help="what to remove physically")
    g.add_argument("--ratio", type=float, help="fraction of FFN neurons / heads removed, in (0, 1)")
    g.add_argument("--remove", type=int, help="number of decoder layers removed (--structured layers)")
    g.add_argument("--importance", default="activation", choices=("activation", "wanda", "magnitude"),
                   help="neuron/head score (default activation: max residual contribution)")
    g.add_argument("--scope", default="layer", choices=("layer", "global"),
                   help="layer: same ratio per layer (uniform, transformers-loadable); global: one ranking")
    g.add_argument("--head-mode", default="kv", choices=("kv", "q"),
                   help="kv: remove whole KV groups; q: remove query heads within every group (default kv)")
    g = p.add_argument_group("calibration and healing")
    g.add_argument("--calib-text", default="wikitext2-valid",
                   help="calibration text: wikitext2-valid (default), pride-and-prejudice, or a file")
    g.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    g.add_argument("--calib-seq-len", type=int, default=512, help="calibration window length (default 512)")
    g.add_argument("--data-dir", help="data folder (default $LEANLM_DATA)")
    g.add_argument("--heal-steps", type=int, default=0, help="distillation steps after pruning (default 0)")
    g.add_argument("--heal-lr", type=float, default=1e-4, help="healing learning rate (default 1e-4)")
    g.add_argument("--heal-batch", type=int, default=2, help="healing windows per step (default 2)")
    g.add_argument("--heal-seq-len", type=int, default=256, help="healing window length (default 256)")
    g.add_argument("--eval-windows", type=int, default=0,
                   help="report WikiText-2 ppl and KL vs the unpruned model on N 512-token windows (default off)")
    p.add_argument("--json", metavar="PATH", help="write the pruning report as JSON ('-' for stdout)")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("quantize", formatter_class=fmt, help="weight quantization (RTN, GPTQ, AWQ; int8/int4) to a directory",
                       description="Quantize the decoder Linears (and the LM head / embeddings, int8 unless --head-bits 0) "
                                   "and write a directory that `leanlm eval` / `generate` / leanlm.load read back. GPTQ "
                                   "and AWQ calibrate block by block on --calib text (never the eval split).",
                       epilog="examples:\n  leanlm quantize smollm2-135m --method gptq --bits 4 --group 128 "
                              "--calib wikitext2-valid --out out/smollm2-gptq4\n"
                              "  leanlm quantize gemma3-270m --method rtn --bits 8 --group 0 --sym --out out/gemma-int8\n"
                              "  leanlm quantize smollm2-135m --method awq --target-bits 5 --out out/smollm2-mixed\n"
                              "  leanlm eval out/smollm2-gptq4 --dtype bfloat16 --kl-ref smollm2-135m")  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    from .quant.cli import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_quantize)
    return parser


def cmd_quantize(args) -> int:
    from .quant.cli import cmd_quantize as run

    return run(args)


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
