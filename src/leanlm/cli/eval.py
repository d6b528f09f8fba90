"""`leanlm eval`: quality (perplexity, KL, tasks) and cost (speed, memory) in one report, with provenance."""

from __future__ import annotations

import sys
import time

from ..errors import LeanlmError
from .common import (KV_HELP, add_adaptive_args, add_model_args, apply_adaptive, check_json_dest, compute_meter,
                     emit_json, integer, kv_policy, load_model, table, verb_parser)  # fmt: skip


def add_parser(subparsers):
    p = verb_parser(subparsers, "eval", help="perplexity, KL, zero-shot tasks, speed, memory",
                    description="Measure quality and cost in one report. With no metric flags: --ppl --speed "
                                "--memory. Data comes from --data-dir or $LEANLM_DATA (layout of shared/data). "
                                "--json also records the provenance (commit, command, machine, versions, date).",
                    examples=["leanlm eval smollm2-135m --ppl --speed --memory --json run.json",
                              "leanlm eval smollm2-135m --dtype bfloat16 --kl-ref smollm2-135m",
                              "leanlm eval gemma3-270m --tasks hellaswag,piqa,arc_easy --limit 500"])  # fmt: skip
    add_model_args(p)
    p.add_argument("--data-dir", help="evaluation data folder (default $LEANLM_DATA)")
    p.add_argument("--ppl", action="store_true", help="perplexity on --text")
    p.add_argument("--kl-ref", metavar="MODEL", help="KL divergence and top-1 agreement vs this reference (fp32)")
    p.add_argument("--text", default="wikitext2", help="wikitext2 (default), moby-dick, pride-and-prejudice, or a file")
    p.add_argument("--seq-len", type=integer(2), default=512, help="perplexity window length (default 512)")
    p.add_argument("--windows", type=integer(0), default=40, help="number of windows, 0 = whole text (default 40)")
    p.add_argument("--tasks", help="comma list of hellaswag,piqa,arc_easy,arc_challenge,winogrande,boolq,"
                                   "lambada,openbookqa, or 'all'")  # fmt: skip
    p.add_argument("--limit", type=integer(1), default=None, help="first N documents of each task")
    p.add_argument("--speed", action="store_true", help="prefill / decode tok/s and time to first token")
    p.add_argument("--prompt-len", type=integer(1), default=512, help="prefill prompt length (default 512)")
    p.add_argument("--new-tokens", type=integer(1), default=128, help="decode tokens per run (default 128)")
    p.add_argument("--runs", type=integer(1), default=5, help="timed runs after one warm-up (default 5)")
    p.add_argument("--memory", action="store_true", help="weight MB, KV bytes/token, peak RSS, size on disk")
    p.add_argument("--kv", help=KV_HELP + "; perplexity is then scored chunk by chunk through the cache")
    p.add_argument("--kv-chunk", type=integer(1), default=256, help="chunk length for --kv perplexity (default 256)")
    add_adaptive_args(p)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH ('-' for stdout)")
    p.add_argument("--cascade", metavar="MODEL[,MODEL]",
                   help="with --tasks: a cascade; MODEL answers first and these larger models (same tokenizer, "
                        "cheapest first) are asked when its confidence is below --cascade-threshold")
    p.add_argument("--cascade-threshold", default="0.6", metavar="P[,P]",
                   help="per rung but the last: escalate when the chosen answer's probability over the choices "
                        "is below P (default 0.6)")
    p.add_argument("--hw", default="cpu", help="hardware profile that prices a cascade's cost (default cpu: this "
                                                 "machine, calibrated on first use)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    return p


def _cascade(args, model, tok):
    """The cascade --cascade asks for: MODEL, then the listed models (loaded in --dtype), priced by the cost model."""
    from ..adaptive.cascade import Cascade, Rung, check_shared_tokenizer, price_rungs
    from ..model import load

    names = [m.strip() for m in args.cascade.split(",") if m.strip()]
    try:
        th = [float(x) for x in args.cascade_threshold.split(",")]
    except ValueError:
        raise LeanlmError(f"--cascade-threshold takes probabilities like 0.6 or 0.6,0.7, got {args.cascade_threshold!r}")
    if len(th) == 1 and len(names) > 1:
        th = th * len(names)
    if any(not 0 <= t <= 1 for t in th):
        raise LeanlmError(f"--cascade-threshold values must be in [0, 1], got {args.cascade_threshold}")
    rungs, toks = [Rung(args.model, model)], [tok]
    for n in names:
        m, t = load(n, dtype=args.dtype, device=args.device)
        rungs.append(Rung(n, m))
        toks.append(t)
    check_shared_tokenizer(toks, [args.model, *names])
    price_rungs(rungs, args.hw, log=lambda m: print(m, file=sys.stderr))
    return Cascade(rungs, th)


def run_eval(args) -> dict:
    """Everything `leanlm eval` measures, as one JSON-able dict."""
    import torch

    from ..evaluate import data, speed, tasks
    from ..evaluate.perplexity import kl_divergence, perplexity
    from ..model import load

    names = []
    if args.tasks:  # validate before loading anything
        names = list(tasks.TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",")]
        for t in names:
            if t not in tasks.TASKS:
                raise LeanlmError(f"unknown task '{t}'; available: {', '.join(tasks.TASKS)} (or 'all')")
    kv = kv_policy(args)  # a bad --kv fails before the model loads
    if kv is not None and (args.kl_ref or names or args.speed):
        raise LeanlmError("--kv applies to --ppl and --memory only")
    model, tok = load_model(args)
    adaptive = apply_adaptive(args, model, tok)
    if kv is None and adaptive is None:  # a policy the model was saved with (recipe `kv:` step) scores as it decodes
        from ..decode.generate import recorded_kv_policy

        kv = recorded_kv_policy(model)
    want_any = args.ppl or args.kl_ref or args.tasks or args.speed or args.memory
    result: dict = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    text = None
    if args.ppl or args.kl_ref or not want_any:
        text = data.read_text(args.text, args.data_dir)
    if kv is not None and (args.ppl or not want_any):  # policy-aware scoring (leanlm.attention.longctx)
        from ..attention.longctx import policy_perplexity

        r = policy_perplexity(model, tok, text, args.seq_len, args.windows, kv, args.kv_chunk)
        result["perplexity"] = {"text": args.text, "kv": kv.describe(), **r}
    elif args.ppl or not want_any:
        with compute_meter(model, adaptive):
            result["perplexity"] = {"text": args.text, **perplexity(model, tok, text, args.seq_len, args.windows)}
    if args.kl_ref:
        ref, _ = load(args.kl_ref, dtype="float32", device=args.device)
        with compute_meter(model, adaptive):
            result["kl"] = {"reference": args.kl_ref, "text": args.text,
                            **kl_divergence(ref, model, tok, text, args.seq_len, args.windows)}  # fmt: skip
        del ref
    if adaptive is not None:
        result["adaptive"] = adaptive
    if args.cascade and not names:
        raise LeanlmError("--cascade scores choice tasks: add --tasks (e.g. --tasks arc_easy,piqa)")
    if names and args.cascade:
        from ..adaptive.cascade import evaluate_task_cascade

        cascade = _cascade(args, model, tok)
        result["tasks"] = {t: evaluate_task_cascade(cascade, tok, t, args.data_dir, args.limit) for t in names}
    elif names:
        result["tasks"] = {t: tasks.evaluate_task(model, tok, t, args.data_dir, args.limit) for t in names}
    if args.speed or not want_any:
        model.prepare_decode()  # as `leanlm generate` decodes
        result["speed"] = speed.measure_speed(model, args.prompt_len, args.new_tokens, args.runs)
    if args.memory or not want_any:
        result["memory"] = speed.memory_report(model)
        if kv is not None and "perplexity" in result:  # bytes the policy cache held at --seq-len
            result["memory"]["kv_bytes_per_token"] = result["perplexity"]["kv_bytes_per_token"]
    return result


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
        if "answered_share" in res:  # a cascade
            shares = " / ".join(f"{s:.0%}" for s in res["answered_share"])
            rows.append((f"{t} (n={res['n']}, cascade)", f"acc {res['acc']:.4f}  answered per model {shares}  "
                                                         f"cost {res['cost_share_of_large']:.0%} of the last alone"))
            continue
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
    return table(rows)


def main(args) -> int:
    from ..provenance import stamp

    check_json_dest(args)  # fail before an hour of evaluation, not after
    result = run_eval(args)
    result["provenance"] = stamp(getattr(args, "command_line", None))  # the command as typed, not pytest's argv
    print(format_eval(result), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        emit_json(result, args.json, args.force)
    return 0
