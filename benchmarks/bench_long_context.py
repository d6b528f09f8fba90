"""Long-context methods on real text: perplexity, needle recall, KV bytes and decode speed at 2k-16k tokens.

Models: qwen2.5-0.5b, gemma3-270m and smollm2-135m (up to 8k, its context window), bf16 weights by default
(`--weights int8|int4`: leanlm's RTN int8 per channel / int4 group 128 on every variant).

Methods (`--methods`, ';'-separated): KV spec strings as `--kv` takes them (leanlm.attention.KVPolicy.parse),
plus model transforms (`mla:rank=R`: leanlm.attention.mla, built by `leanlm.apply`; see TRANSFORMS). Placeholders
are filled per context from the budget b = context // 4 tokens: {b}, {b4} = b - 4, {w} = b // 2, {p} = b // 16.
Every spec is parsed for every context before any model loads; one that does not parse stops the run.

One pass per (model, context, method, needle depth), sharing one prefill for everything:
- the prompt: book text of the target length with "The secret passphrase is NNNNNN." planted at the depth
  (seeded, at a sentence boundary), then a question, through the chat template when the tokenizer has one
  (leanlm.evaluate.needle); haystack Moby-Dick (pg2701) at the 1st and 3rd depth, Pride and Prejudice
  (pg1342) at the 2nd;
- perplexity: the prompt goes through the method's cache in chunks of --chunk tokens
  (leanlm.attention.longctx.chunked_prefill), scoring the predictions on up to --score book tokens after the
  needle and before the question (the end of the context, where the dropped tokens matter most);
  `ppl_vs_full` is the ratio to the full cache on the same tokens;
- needle: greedy decoding of --answer-tokens tokens from that cache; recalled = the exact number appears;
- KV bytes: what the caches hold after the prompt (bookkeeping included);
- context = prompt + answer + timed decode steps (the prompt is that much shorter), so 8k fits SmolLM2's window;
- speed: right after a method's last-depth prefill, --rounds rounds of --steps decode steps on its own caches
  (one warm-up round first), median tok/s; then its caches are dropped. (Memory: the chunked prefill used to run
  with autograd on, and every chunk's graph stayed reachable from the cache, ~0.8 GB a chunk on Qwen2.5-0.5B:
  that ran a Qwen 8k run out of 24 GB. It now runs in inference mode; tests/test_long_context_bench.py.)
  Real prefilled caches throughout (no random fill), so content-dependent methods are timed honestly.

Default matrix (DEFAULT_PLAN), sized for the 40-minute budget on 2 quiet cores:
  smollm2-135m   2k: all methods x 2 depths, 4k and 8k: long x 1 depth
  gemma3-270m    2k: all x 3 depths, 4k and 8k: long x 1, 16k: full, sinks, tga, int8 x 1
  qwen2.5-0.5b   2k: all x 1, 8k: core x 1
all = every --methods entry; long = all but int4 and the transforms (both measured at 2k); core = full, sinks,
snapkv, quest, topk, tga, int8. Prefill dominates and grows with the context and the model (single-thread CPU seconds for a
2k prefill: smollm2 6.4, gemma3 6.3, qwen2.5 13.0; attention makes smollm2's 8k ~9x its 2k), so qwen2.5-0.5b gets
the short and the summary context only and 16k runs on gemma3, whose sliding-window layers keep it cheap.
Estimate from those timed pieces: ~37 min (31-55 by the assumed parallel efficiency and policy overhead).
`--models`, `--contexts`, `--methods` or `--depths` run that matrix instead (all methods at every listed
context) and mark the result partial (archive). `--quick`: smollm2-135m at 1024 tokens, four methods, one depth
(a smoke run of about a minute on a quiet machine).

Summary: best_sparse_decode_speedup_8k_within_2pct (over sparse methods at 8k with ppl <= +2% vs full and the
needle recalled at every depth where the full cache recalls it: decode tok/s / full), best_sparse_needle_recall,
best_kv_bytes_reduction_within_2pct (8k, same conditions, any method), int8_kv_decode_vs_bf16_kv_8k (per model).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_result_args, leanlm_quant_configs, machine, write_result  # noqa: E402

from leanlm.evaluate.speed import current_rss_mb  # noqa: E402

DEFAULT_METHODS = ("full;sinks:4,window:{b4};h2o:{b};snapkv:{b};quest:pages={p},page=16;topk:keys={b};"
                   "tga:group=16,window={w};int8;int4;mla:rank=128")
CORE = ("full", "sinks", "snapkv", "quest", "topk", "tga", "int8")
LONG = ("full", "sinks", "h2o", "snapkv", "quest", "topk", "tga", "int8")  # 4k / 8k: no int4, no transform
DEFAULT_PLAN = {  # model -> context -> (method kinds or "all", number of needle depths)
    "qwen2.5-0.5b": {2048: ("all", 1), 8192: (CORE, 1)},
    "gemma3-270m": {2048: ("all", 3), 4096: (LONG, 1), 8192: (LONG, 1), 16384: (("full", "sinks", "tga", "int8"), 1)},
    "smollm2-135m": {2048: ("all", 2), 4096: (LONG, 1), 8192: (LONG, 1)},
}
DEPTHS = (0.5, 0.2, 0.8)  # the first k are used
BOOKS = ("moby-dick", "pride-and-prejudice", "moby-dick")
SPARSE = ("sinks", "window", "h2o", "snapkv", "quest", "topk", "tga")
QUICK_METHODS = "full;sinks:4,window:{b4};tga:group=16,window={w};int8"


# ---- methods -----------------------------------------------------------------------------------------
def _mla_config(spec: str):
    """mla:rank=R[,rope_dims=D][,heal_steps=N] -> leanlm.attention.MLA (raises LeanlmError naming a bad item)."""
    from leanlm.attention import MLA
    from leanlm.errors import LeanlmError

    kw = {}
    for item in spec.partition(":")[2].split(","):
        key, _, value = item.partition("=")
        if key not in ("rank", "rope_dims", "heal_steps") or not value.isdigit():
            raise LeanlmError(f"method '{spec}': use mla:rank=R[,rope_dims=D][,heal_steps=N] with whole numbers")
        kw[key] = int(value)
    return MLA(**kw)


def _mla_transform(model, spec: str, tok):
    """leanlm.apply(model, <MLA config>), with calibration text (WikiText-2 validation) when it needs some."""
    import leanlm

    cfg = _mla_config(spec)
    calib = None
    if getattr(cfg, "needs_calibration", False):
        from leanlm.calibration import Calibration

        calib = Calibration(tok, "wikitext2-valid", samples=16, seq_len=512)
    leanlm.apply(model, cfg, calib, progress=False)
    return model


# model transforms: kind -> (parse the spec, or raise; apply it to a fresh copy of the model). The variant is
# evaluated with a full cache. Adding one = a function pair and a line here.
TRANSFORMS = {"mla": (_mla_config, _mla_transform)}


def kind_of(spec: str) -> str:
    return spec.split(",")[0].split(":")[0].strip()


def fill(spec: str, context: int) -> str:
    b = context // 4
    return spec.format(b=b, b4=b - 4, w=b // 2, p=b // 16)


def parse_method(spec: str):
    """spec -> ("kv", KVPolicy | None) or ("transform", spec); a LeanlmError when it does not parse."""
    from leanlm.attention import KVPolicy

    if kind_of(spec) in TRANSFORMS:
        TRANSFORMS[kind_of(spec)][0](spec)  # parses, or raises
        return "transform", spec
    return "kv", (None if spec.strip() == "full" else KVPolicy.parse(spec))


def plan_from_args(args) -> tuple[dict, bool]:
    """model -> context -> (method templates, depths); and whether the run is partial."""
    methods = args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS)
    templates = [m.strip() for m in methods.split(";") if m.strip()]
    if args.quick:
        models = (args.models or "smollm2-135m").split(",")
        contexts, n_depths = [args.contexts or "1024"], args.depths or 1
    elif args.models or args.contexts or args.depths:
        models = (args.models or ",".join(DEFAULT_PLAN)).split(",")
        contexts, n_depths = [args.contexts or "2048,4096,8192,16384"], args.depths or 1
    else:
        models = None
    plan = {}
    if models is None:  # the default matrix
        for model, per in DEFAULT_PLAN.items():
            plan[model] = {}
            for ctx, (kinds, nd) in per.items():
                keep = [t for t in templates if kinds == "all" or kind_of(t) in kinds]
                plan[model][ctx] = (keep, DEPTHS[:nd])
    else:
        for model in models:
            plan[model] = {int(c): (templates, DEPTHS[:n_depths]) for c in contexts[0].split(",")}
    partial = args.quick or bool(args.models or args.contexts or args.depths or args.methods)
    return plan, partial


def check_methods(plan: dict) -> None:
    """Parse every method at every context before any work; stop with the spec that fails."""
    from leanlm.errors import LeanlmError

    for model, per in plan.items():
        for ctx, (templates, _) in per.items():
            for t in templates:
                try:
                    parse_method(fill(t, ctx))
                except (LeanlmError, KeyError, ValueError, TypeError) as e:
                    raise SystemExit(f"bench_long_context: method '{t}' (at {ctx} tokens: '{fill(t, ctx)}') does not "
                                     f"parse: {e}\nfix the spec or leave it out with --methods") from e  # fmt: skip


# ---- measuring ---------------------------------------------------------------------------------------
@torch.inference_mode()
def greedy(model, last: int, pos: int, n: int, eos: set[int]) -> list[int]:
    out, tok = [], last
    for i in range(n):
        logits = model(torch.tensor([[tok]], device=model.device), start=pos + i, last_only=True)[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        if tok in eos:
            break
    return out


def run_case(model, tok, case, policy, args, extra: int) -> dict:
    from leanlm.attention import cache_bytes
    from leanlm.attention.longctx import chunked_prefill
    from leanlm.evaluate.needle import recalled

    ids = torch.tensor([case.ids[:-1]], device=model.device)
    t0 = time.perf_counter()
    # decode-time selection (quest, topk) runs in chunks of <= 16 rows: score their tokens that way
    small = 16 if getattr(policy, "method", None) in ("quest", "topk") else None
    nll, n, _, _ = chunked_prefill(model, ids, policy, args.chunk, max_len=len(case.ids) + extra, score=True,
                                   score_range=case.score_range, score_chunk=small)  # fmt: skip
    prefill_s = time.perf_counter() - t0
    out = greedy(model, case.ids[-1], len(case.ids) - 1, args.answer_tokens, set(model.config.eos_token_ids))
    return {"nll": nll, "n": n, "hit": recalled(tok, out, case), "answer": tok.decode(out, skip_special_tokens=True),
            "kv_bytes": cache_bytes(model), "prefill_s": prefill_s, "pos": len(case.ids) - 1 + len(out)}  # fmt: skip


@torch.inference_mode()
def decode_speed(model, pos: int, steps: int, rounds: int) -> dict:
    """Median decode tok/s of `model` continuing on the caches it holds from position `pos`: rounds of `steps`
    steps after one warm-up round."""
    x = torch.tensor([[min(1000, model.config.vocab_size - 1)]], device=model.device)
    runs = []
    for r in range(rounds + 1):  # round 0 warms up
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x, start=pos, last_only=True)
            pos += 1
        if r:
            runs.append(steps / (time.perf_counter() - t0))
    return {"tok_s": statistics.median(runs), "tok_s_runs": runs}


def load_model(name: str):
    import leanlm

    return leanlm.load(name, dtype="bfloat16")


def quantize_weights(model, weights: str):
    if weights == "bf16":
        return model
    import leanlm

    leanlm.apply(model, leanlm_quant_configs()[f"leanlm-{weights}"], progress=False)
    return model


def bench_model(name: str, per_ctx: dict, args, res: dict, save) -> None:
    from leanlm.evaluate.data import read_text
    from leanlm.evaluate.needle import make_case

    t_load = time.perf_counter()
    base, tok = load_model(name)
    variants = {}  # transform spec -> model (built on first use from an unquantized copy)
    limit = base.config.max_seq_len
    book_ids = {b: tok(read_text(b), add_special_tokens=False).input_ids for b in set(BOOKS)}
    quantize_weights(base, args.weights)
    print(f"[{name}] loaded in {time.perf_counter() - t_load:.1f}s (context window {limit})", flush=True)
    extra = args.answer_tokens + (args.rounds + 1) * args.steps + 2
    for ctx, (templates, depths) in sorted(per_ctx.items()):
        if ctx > limit:
            res["skipped"].append({"model": name, "context": ctx, "why": f"past the model's context window ({limit})"})
            print(f"[{name}] skip {ctx}: past its context window {limit}", flush=True)
            continue
        specs = [fill(t, ctx) for t in templates]
        rows = {s: {"model": name, "context": ctx, "method": s, "kind": kind_of(s), "nll": 0.0, "tokens_scored": 0,
                    "needle": [], "answers": [], "prefill_s": []} for s in specs}  # fmt: skip
        speed = {}
        for di, depth in enumerate(depths):
            book = BOOKS[di]
            # the prompt leaves room for the answer and the timed steps: they end at `ctx` tokens
            case = make_case(tok, "", ctx - extra, depth, seed=args.seed, offset=args.offset, score=args.score,
                             book_ids=book_ids[book])  # fmt: skip
            for s in specs:
                how, what = parse_method(s)
                model, policy = base, what
                if how == "transform":
                    if s not in variants:
                        raw, _ = load_model(name)
                        variants[s] = quantize_weights(TRANSFORMS[kind_of(s)][1](raw, s, tok), args.weights)
                    model, policy = variants[s], None
                r = run_case(model, tok, case, policy, args, extra)
                row = rows[s]
                row["nll"] += r["nll"]
                row["tokens_scored"] += r["n"]
                row["needle"].append({"depth": depth, "book": book, "recalled": r["hit"],
                                      "prompt_tokens": len(case.ids)})  # fmt: skip
                row["answers"].append(r["answer"])
                row["prefill_s"].append(round(r["prefill_s"], 2))
                row["kv_bytes"] = r["kv_bytes"]
                print(f"[{name}] {ctx} depth {depth} {s}: nll/tok {r['nll'] / max(r['n'], 1):.4f} "
                      f"needle {r['hit']} ({r['answer']!r}) kv {r['kv_bytes']} prefill {r['prefill_s']:.1f}s "
                      f"rss {current_rss_mb():.0f} MB",
                      flush=True)  # fmt: skip
                if di == len(depths) - 1:  # timed now, on this method's own caches, then dropped
                    speed[s] = decode_speed(model, r["pos"], args.steps, args.rounds)
                model.clear_cache()
        full = rows.get("full")
        for s, row in rows.items():
            row["ppl"] = math.exp(row.pop("nll") / max(row["tokens_scored"], 1))
            row["needle_recall"] = sum(n["recalled"] for n in row["needle"]) / len(row["needle"])
            row.update(decode_tok_s=speed[s]["tok_s"], decode_tok_s_runs=speed[s]["tok_s_runs"])
            if full:
                row["ppl_vs_full"] = row["ppl"] / full["ppl"] - 1
                row["kv_bytes_reduction"] = full["kv_bytes"] / row["kv_bytes"]
                row["decode_vs_full"] = row["decode_tok_s"] / full["decode_tok_s"]
            res["rows"].append(row)
        save()
    del base, variants


def summarize(rows: list[dict]) -> dict:
    def full_of(r):
        same = (r["model"], r["context"], "full")
        return next((f for f in rows if (f["model"], f["context"], f["method"]) == same), None)

    def ok(r):  # ppl within 2% and the needle recalled wherever the full cache recalls it
        f = full_of(r)
        if f is None or r.get("ppl_vs_full") is None or r["ppl_vs_full"] > 0.02:
            return False
        return all(n["recalled"] or not fn["recalled"] for n, fn in zip(r["needle"], f["needle"]))

    def best(cands, key):
        if not cands:
            return {"value": None, "why": "no method met the conditions"}
        r = max(cands, key=key)
        return {"value": key(r), "method": r["method"], "model": r["model"], "context": r["context"],
                "ppl_vs_full": r.get("ppl_vs_full"), "needle_recall": r["needle_recall"]}  # fmt: skip

    at8k = [r for r in rows if r["context"] == 8192 and r["method"] != "full"]
    sparse = [r for r in rows if r["kind"] in SPARSE]
    by_method: dict = {}
    for r in sparse:
        by_method.setdefault((r["model"], r["method"].split(",")[0].split(":")[0]), []).extend(r["needle"])
    recall = [{"model": m, "kind": k, "needle_recall": sum(n["recalled"] for n in ns) / len(ns), "cases": len(ns)}
              for (m, k), ns in by_method.items()]  # fmt: skip
    return {
        "best_sparse_decode_speedup_8k_within_2pct": best([r for r in at8k if r["kind"] in SPARSE and ok(r)],
                                                          lambda r: r["decode_vs_full"]),
        "best_sparse_needle_recall": max(recall, key=lambda x: (x["needle_recall"], x["cases"]), default=None),
        "best_kv_bytes_reduction_within_2pct": best([r for r in at8k if ok(r)], lambda r: r["kv_bytes_reduction"]),
        "int8_kv_decode_vs_bf16_kv_8k": {r["model"]: r.get("decode_vs_full") for r in at8k if r["method"] == "int8"},
        "conditions": "8k rows; ppl_vs_full <= 0.02 on the scored book tokens; needle recalled at every depth the "
                      "full cache recalled it; sparse = " + ", ".join(SPARSE),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma list (default: the DEFAULT_PLAN matrix)")
    ap.add_argument("--contexts", default="", help="comma list of prompt lengths in tokens (all methods at each)")
    ap.add_argument("--methods", default="", help="';'-separated specs with {b} {b4} {w} {p} placeholders")
    ap.add_argument("--depths", type=int, default=0, help="needle depths per context (1-3)")
    ap.add_argument("--weights", default="bf16", choices=("bf16", "int8", "int4"))
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens)")
    ap.add_argument("--score", type=int, default=1024, help="book tokens scored per prompt (after the needle)")
    ap.add_argument("--answer-tokens", type=int, default=8, help="greedy tokens after the primed answer")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timed round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--offset", type=int, default=10000, help="haystack starts this many tokens into the book "
                    "(past the front matter and Moby-Dick's extracts)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: smollm2-135m, 1024 tokens, 4 methods, 1 depth")
    ap.add_argument("--out", default="long_context", help="results/OUT.json")
    ap.add_argument("--results-root", default=None, help="write results under this folder (tests)")
    add_result_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.score, args.steps, args.rounds = min(args.score, 256), min(args.steps, 4), min(args.rounds, 2)
    if args.depths and not 1 <= args.depths <= len(DEPTHS):
        raise SystemExit(f"--depths must be 1..{len(DEPTHS)}")
    plan, partial = plan_from_args(args)
    check_methods(plan)
    torch.set_num_threads(args.threads)
    partial = partial or args.weights != "bf16"
    t0 = time.time()
    res = {"machine": machine(), "threads": args.threads, "weights": args.weights, "plan": {
        m: {str(c): {"methods": [fill(t, c) for t in ts], "depths": list(ds)} for c, (ts, ds) in per.items()}
        for m, per in plan.items()}, "settings": {k: getattr(args, k) for k in ("chunk", "score", "answer_tokens",
        "steps", "rounds", "seed", "offset")}, "rows": [], "skipped": []}  # fmt: skip
    out = dict(partial=partial, archive=args.archive, machine_shared=args.machine_shared, root=args.results_root)

    def save(final: bool = False):
        res["wall_s"] = round(time.time() - t0, 1)
        res["summary"] = summarize(res["rows"])
        write_result(args.out, res, checkpoint=not final, **out)

    for name, per in plan.items():
        bench_model(name, per, args, res, save)
    save(final=True)
    print(res["summary"])
    print(f"wall time {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
