"""Exact speculative decoding on one target: decode tok/s vs plain leanlm decoding, same run.

For every prompt, every configuration (draft kind x gamma policy) generates greedily from the
same target (--dtype, bf16 by default: leanlm's fastest unquantized decode) and its output is asserted token-for-token identical to plain greedy decoding
(leanlm's stock decode loop, `generate_tokens`). Configurations run back to back per prompt,
so machine noise hits all of them alike; tok/s of a configuration is its decode tokens over its
decode seconds summed over the prompts of a category, median over --runs runs; speedup is that
over plain decoding in the same run.

Prompts, through the chat template: chat (first turns of MT-Bench and Vicuna-Bench), two
input-grounded kinds built from WikiText-2 / Gutenberg passages: summarization ("Summarize the
following passage." + passage) and proofreading ("Correct the spelling mistakes ..." + the
passage with two letters swapped in every 7th word, so the answer copies most of the input), and
extraction: MT-Bench's own input-grounded category (pull fields out of given reviews, records,
articles; first turns, in file order). "passages" pools summarization and proofreading,
"grounded" pools all three. Also measured: v(k), the time of a k-token verification forward over a
1-token step, for the target's dtype and the other one, each with leanlm's native small-row kernel
(the runtime's default) and with ATen's products (model/fused.py explains the difference).

    LEANLM_DATA=../shared/data python benchmarks/bench_speculative.py
    LEANLM_DATA=../shared/data python benchmarks/bench_speculative.py --quick   # 2+2+2 prompts, 32 tokens
Writes benchmarks/results/speculative.json (speculative_fp32.json for --dtype float32; --result-name NAME for
NAME.json). --configs runs a subset by name, e.g. --configs 'lookup g2,lookup-n2 auto'.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch
from common import add_result_args, machine, print_table, small_kernel, write_result

from leanlm import load
from leanlm.decode.drafts import Draft, EarlyExitDraft, LookupDraft, ModelDraft
from leanlm.decode.generate import GenerationStats, encode_prompt, generate_tokens
from leanlm.decode.speculative import AdaptiveGamma, Target, self_draft_model, speculative_generate_tokens
from leanlm.evaluate.data import data_file, read_jsonl, read_text


# ---- prompts ----------------------------------------------------------------------------------
def passages(text: str, n: int, lo: int = 600, hi: int = 1400, skip: int = 0) -> list[str]:
    """n paragraphs of lo..hi characters, evenly spaced through the text (no headings)."""
    paras = [" ".join(p.split()) for p in text.replace("\r", "").split("\n\n")]
    paras = [p for p in paras[skip:] if lo <= len(p) <= hi and not p.startswith("=")]
    step = max(1, len(paras) // max(n, 1))
    return paras[::step][:n]


def with_typos(text: str, every: int = 7, seed: int = 0) -> str:
    """Swap two inner letters in every `every`-th word (deterministic): a passage to proofread."""
    words = text.split(" ")
    rng = random.Random(seed)
    for i in range(rng.randrange(every), len(words), every):
        w = words[i]
        if len(w) >= 4 and w.isalpha():
            j = rng.randrange(1, len(w) - 2)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def build_prompts(n_chat: int, n_summ: int, n_edit: int, n_extract: int = 0) -> list[tuple[str, str]]:
    rows = read_jsonl(data_file("mt-bench"))
    mt = [r["turns"][0] for r in rows]
    extract = [r["turns"][0] for r in rows if r["category"] == "extraction"][:n_extract]
    vic = [r["turns"][0] for r in read_jsonl(data_file("vicuna-bench"))]
    chat = [p for pair in zip(mt[::7], vic[::7]) for p in pair][:n_chat]  # spread over categories
    wiki = "\n\n".join(l.strip() for l in read_text("wikitext2").split("\n") if l.strip())
    n = n_summ + n_edit
    srcs = [passages(wiki, n), passages(read_text("pride-and-prejudice"), n, skip=40),
            passages(read_text("moby-dick"), n, skip=80)]  # fmt: skip
    texts = [srcs[i % 3][i // 3] for i in range(n)]
    summ, edit = texts[:n_summ], texts[n_summ:]
    return ([("chat", p) for p in chat] + [("summarize", "Summarize the following passage.\n\n" + p) for p in summ]
            + [("edit", "Correct the spelling mistakes in the following passage. Reply with the corrected passage "
                        "only.\n\n" + with_typos(p, seed=i)) for i, p in enumerate(edit)]
            + [("extract", p) for p in extract])  # fmt: skip


# ---- v(k) ---------------------------------------------------------------------------------------
@torch.inference_mode()
def verify_cost(models: dict, ks: list[int], reps: int, ctx: int = 300) -> dict:
    """ms of a k-token forward at context `ctx`, per (model, native small-row kernel on/off);
    interleaved, median of reps x 3 calls."""
    prompt = torch.randint(100, 30000, (ctx,), generator=torch.Generator().manual_seed(0)).tolist()
    targets = {}
    for name, (m, _) in models.items():
        m.setup_cache(1, ctx + max(ks) + 1)
        targets[name] = Target(m)
        targets[name].forward(prompt, 0)
    t = {(n, k): [] for n in models for k in ks}
    g = torch.Generator().manual_seed(1)
    for _ in range(reps):
        for n, tg in targets.items():
            with small_kernel(models[n][1]):
                for k in ks:
                    toks = torch.randint(100, 30000, (k,), generator=g).tolist()
                    t0 = time.perf_counter()
                    for _ in range(3):
                        tg.forward(toks, ctx)
                    t[(n, k)].append((time.perf_counter() - t0) / 3 * 1e3)
    for m, _ in models.values():
        m.clear_cache()
    out = {}
    for n in models:
        step = statistics.median(t[(n, 1)])
        out[n] = {"step_ms": step, "v": {k: statistics.median(t[(n, k)]) / step for k in ks}}
    ref = out[next(iter(models))]["step_ms"]
    for n in out:
        out[n]["step_vs_first"] = out[n]["step_ms"] / ref
    return out


# ---- one generation --------------------------------------------------------------------------
def run_config(cfg: dict, ids: list[int], n: int) -> tuple[list[int], GenerationStats]:
    st = GenerationStats()
    if cfg["draft"] is None:
        out = list(generate_tokens(cfg["model"], ids, n, stats=st))
    else:
        out = list(speculative_generate_tokens(cfg["model"], ids, n, stats=st, draft=cfg["draft"](),
                                               gamma=cfg["gamma"]()))  # fmt: skip
    return out, st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="the target's dtype")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--chat", type=int, default=5, help="chat prompts")
    ap.add_argument("--summarize", type=int, default=5, help="summarization prompts")
    ap.add_argument("--edit", type=int, default=5, help="proofreading prompts (passage with typos, corrected copy back)")
    ap.add_argument("--extract", type=int, default=5, help="MT-Bench extraction prompts (0-10, file order)")
    ap.add_argument("--self-layers", type=int, default=24, help="early-exit self-draft depth")
    ap.add_argument("--vk-reps", type=int, default=5)
    ap.add_argument("--conf", type=float, default=0.3,
                    help="confidence threshold of the 'conf' configurations (a model draft stops below it)")  # fmt: skip
    ap.add_argument("--no-int4", action="store_true", help="skip the int4 (leanlm.quant RTN) self-draft")
    ap.add_argument("--quick", action="store_true", help="2+2+2 prompts, 32 tokens, 1 run (smoke test)")
    ap.add_argument("--configs", default=None,
                    help="comma-separated configuration names to run (e.g. 'lookup g2,lookup-n2 auto'); plain decoding "
                         "always runs as the baseline. Default: all")  # fmt: skip
    ap.add_argument("--result-name", default=None, help="JSON name under benchmarks/results (default: speculative"
                                                         "[_fp32])")  # fmt: skip
    add_result_args(ap)
    args = ap.parse_args()
    partial = bool(args.quick or args.configs or args.no_int4)
    if args.quick:
        args.chat, args.summarize, args.edit, args.extract, args.new_tokens, args.runs, args.vk_reps = 2, 2, 2, 2, 32, 1, 2
    torch.set_num_threads(args.threads)

    target, tok = load(args.model, args.dtype)  # plain and speculative decoding run this same model
    target.prepare_decode()
    other = "float32" if args.dtype == "bfloat16" else "bfloat16"
    sibling = self_draft_model(target, other)  # for v(k) in the other dtype; the bf16 self-draft of an fp32 target
    drafts = {"bf16": sibling} if args.dtype == "float32" else {}
    result = {"model": args.model, "machine": machine(),
              "settings": vars(args)}  # fmt: skip
    if not args.no_int4:
        try:
            from leanlm.quant import RTN, quantize

            q4 = self_draft_model(target, "float32")
            quantize(q4, RTN(bits=4, group=32), progress=False)  # bf16 compute, int8 head
            drafts["int4"] = q4
        except Exception as e:  # optional extra: the quantization package may be absent
            result["int4_error"] = f"{type(e).__name__}: {e}"[:300]

    L = args.self_layers
    fixed = lambda g: (lambda: g)  # noqa: E731
    C = []  # name, kind, policy, model, draft factory, gamma factory

    def add(name, kind, policy, model, draft, gamma):
        C.append({"name": name, "kind": kind, "policy": policy, "model": model, "draft": draft, "gamma": gamma})

    add("plain", "none", "-", target, None, None)
    add("plain-loop", "none", "gamma 0", target, lambda: Draft(), fixed(0))  # the speculative loop, no drafts
    for g in (2, 4, 8):
        add(f"lookup g{g}", "lookup", f"fixed {g}", target, lambda: LookupDraft(), fixed(g))
    add("lookup auto", "lookup", "auto", target, lambda: LookupDraft(), lambda: "auto")
    add("lookup heuristic", "lookup", "heuristic", target, lambda: LookupDraft(), lambda: "heuristic")
    # matches of a single token are weak evidence; proposing only after 2-3 matching tokens wastes fewer verifications
    add("lookup-n2 g4", "lookup-n2", "fixed 4", target, lambda: LookupDraft(min_ngram=2), fixed(4))
    add("lookup-n2 auto", "lookup-n2", "auto", target, lambda: LookupDraft(min_ngram=2), lambda: "auto")
    for name, dm in drafts.items():  # compressed copies of the target, each named: `auto` remembers per draft name
        copy = lambda dm=dm, name=name, t=None: ModelDraft(dm, t, f"self-{name}" + (f"-conf{t}" if t else ""), sync_kv=True)  # noqa: E731
        with_lookup = lambda copy=copy: LookupDraft(fallback=copy())  # noqa: E731
        for g in (2, 4, 6):
            add(f"self-{name} g{g}", f"self-{name}", f"fixed {g}", target, copy, fixed(g))
        add(f"self-{name} auto", f"self-{name}", "auto", target, copy, lambda: "auto")
        add(f"self-{name} heuristic", f"self-{name}", "heuristic", target, copy, lambda: "heuristic")
        # the draft's own confidence (top-1 probability) ends a draft early, below --conf
        conf = lambda copy=copy, t=args.conf: copy(t=t)  # noqa: E731
        add(f"self-{name} conf{args.conf} g8", f"self-{name}-conf", "fixed 8", target, conf, fixed(8))
        add(f"self-{name} conf{args.conf} auto", f"self-{name}-conf", "auto", target, conf, lambda: "auto")
        add(f"lookup+self-{name} auto", f"lookup+self-{name}", "auto", target, with_lookup, lambda: "auto")
        for g in (2, 4, 6):
            add(f"lookup+self-{name} g{g}", f"lookup+self-{name}", f"fixed {g}", target, with_lookup, fixed(g))
    add(f"self-{L}L g2", f"self-{L}L", "fixed 2", target, lambda: EarlyExitDraft(L), fixed(2))
    add(f"self-{L}L auto", f"self-{L}L", "auto", target, lambda: EarlyExitDraft(L), lambda: "auto")

    if args.configs:
        wanted = {n.strip() for n in args.configs.split(",") if n.strip()}
        unknown = wanted - {c["name"] for c in C}
        if unknown:
            sys.exit(f"unknown --configs {sorted(unknown)}; choose from: {', '.join(c['name'] for c in C)}")
        C = [c for c in C if c["name"] in wanted | {"plain"}]

    print("measuring v(k) ...", flush=True)
    ks = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    short = {"float32": "fp32", "bfloat16": "bf16"}
    vk_models = {short[args.dtype]: (target, True), f"{short[args.dtype]}-aten": (target, False),
                 short[other]: (sibling, True), f"{short[other]}-aten": (sibling, False)}  # fmt: skip
    result["verify_cost"] = verify_cost(vk_models, ks, args.vk_reps)
    for n, r in result["verify_cost"].items():
        print(f"  {n:12s} step {r['step_ms']:6.1f} ms  " + " ".join(f"v({k})={v:.2f}" for k, v in r["v"].items()))

    prompts = build_prompts(args.chat, args.summarize, args.edit, args.extract)
    enc = [(cat, encode_prompt(tok, p)) for cat, p in prompts]
    result["prompts"] = [{"category": c, "prompt_tokens": len(i), "text": p[:120]} for (c, i), (_, p) in zip(enc, prompts)]
    print(f"{len(enc)} prompts ({args.chat} chat, {args.summarize} summarize, {args.edit} edit, {args.extract} extract), "
          f"{len(C)} configurations", flush=True)  # fmt: skip
    refs = [list(generate_tokens(target, ids, args.new_tokens)) for _, ids in enc]  # warm-up + references

    cats = ["chat", "summarize", "edit", "extract", "passages", "grounded", "all"]  # passages = summarize + edit
    pools = {"chat": ("chat", "all"), "summarize": ("summarize", "passages", "grounded", "all"),
             "edit": ("edit", "passages", "grounded", "all"), "extract": ("extract", "grounded", "all")}  # fmt: skip
    raw = {c["name"]: {"tok": {k: [0] * args.runs for k in cats}, "s": {k: [0.0] * args.runs for k in cats},
                       "drafted": 0, "accepted": 0, "rounds": 0, "drafting_rounds": 0, "identical": 0,
                       "mismatch": []} for c in C}  # fmt: skip
    for r in range(args.runs):
        for pi, ((cat, ids), ref) in enumerate(zip(enc, refs)):
            for c in C:
                out, st = run_config(c, ids, args.new_tokens)
                d = raw[c["name"]]
                for k in pools[cat]:
                    d["tok"][k][r] += st.new_tokens - 1
                    d["s"][k][r] += st.decode_s
                if r == 0:
                    if out == ref:
                        d["identical"] += 1
                    else:
                        d["mismatch"].append(pi)
                    spec = st.extra.get("speculative")
                    if spec is not None:
                        for f in ("drafted", "accepted", "rounds", "drafting_rounds"):
                            d[f] += getattr(spec, f)
            print(f"run {r + 1}/{args.runs} prompt {pi + 1}/{len(enc)} done", flush=True)

    rows = []
    base = raw["plain"]
    for c in C:
        d = raw[c["name"]]
        row = {"config": c["name"], "draft": c["kind"], "gamma": c["policy"]}
        for k in cats:
            tps = [t / s for t, s in zip(d["tok"][k], d["s"][k]) if s > 0]
            sp = [(t / s) / (bt / bs) for t, s, bt, bs in zip(d["tok"][k], d["s"][k], base["tok"][k], base["s"][k]) if s > 0 and bs > 0]
            row[f"{k}_tok_s"] = statistics.median(tps) if tps else 0.0
            row[f"{k}_speedup"] = statistics.median(sp) if sp else 0.0
        row["acceptance_rate"] = d["accepted"] / d["drafted"] if d["drafted"] else None
        row["mean_accepted"] = d["accepted"] / d["drafting_rounds"] if d["drafting_rounds"] else None
        row["tokens_per_verify"] = (d["accepted"] + d["rounds"]) / d["rounds"] if d["rounds"] else None
        row["identical"] = f"{d['identical']}/{len(enc)}"
        row["mismatch_prompts"] = d["mismatch"]
        rows.append(row)
    result["configs"] = rows

    def best(pred, key):
        cand = [r for r in rows if pred(r)]
        return max(cand, key=lambda r: r[key]) if cand else None

    pure_lookup = lambda r: r["draft"].startswith("lookup") and "+" not in r["draft"]  # noqa: E731 (no model fallback)
    lk = best(pure_lookup, "grounded_speedup")
    lkh = best(lambda r: r["draft"].startswith("lookup"), "grounded_speedup")  # lookup, or lookup + a model fallback
    sd = best(lambda r: r["draft"].startswith("self") or r["draft"].startswith("lookup+self"), "all_speedup")
    targets = {}  # (a --configs subset may lack a kind)
    if lk:
        targets["lookup_grounded_speedup"] = {"target": 1.5, "config": lk["config"], "value": lk["grounded_speedup"],
                                              "summarize": lk["summarize_speedup"], "edit": lk["edit_speedup"],
                                              "extract": lk["extract_speedup"], "passages": lk["passages_speedup"],
                                              "met": lk["grounded_speedup"] >= 1.5}  # fmt: skip
        lp = best(pure_lookup, "passages_speedup")
        targets["lookup_passages_speedup"] = {"target": 1.5, "config": lp["config"], "value": lp["passages_speedup"],
                                              "met": lp["passages_speedup"] >= 1.5}  # fmt: skip
    if lkh:
        targets["lookup_with_fallback_grounded_speedup"] = {
            "target": 1.5, "config": lkh["config"], "value": lkh["grounded_speedup"],
            "summarize": lkh["summarize_speedup"], "edit": lkh["edit_speedup"], "met": lkh["grounded_speedup"] >= 1.5}
    if sd:
        targets["best_self_draft_overall_speedup"] = {"target": 1.3, "config": sd["config"], "value": sd["all_speedup"],
                                                      "met": sd["all_speedup"] >= 1.3}  # fmt: skip
    for kind in sorted({r["draft"] for r in rows if r["draft"] != "none"}):
        auto = best(lambda r, k=kind: r["draft"] == k and r["gamma"] == "auto", "all_speedup")
        fx = best(lambda r, k=kind: r["draft"] == k and r["gamma"].startswith("fixed"), "all_speedup")
        if auto and fx:
            targets[f"auto_vs_best_fixed[{kind}]"] = {
                "auto": auto["all_speedup"], "best_fixed": fx["all_speedup"], "best_fixed_config": fx["config"],
                "ratio": auto["all_speedup"] / fx["all_speedup"], "met": auto["all_speedup"] >= fx["all_speedup"],
            }  # fmt: skip
    result["targets"] = targets
    result["all_identical"] = all(not r["mismatch_prompts"] for r in rows)
    print_table(rows, ["config", "all_tok_s", "chat_speedup", "summarize_speedup", "edit_speedup", "extract_speedup",
                       "passages_speedup", "grounded_speedup", "all_speedup", "acceptance_rate", "mean_accepted",
                       "identical"])  # fmt: skip
    for k, v in targets.items():
        print(k, v)
    write_result(args.result_name or ("speculative" if args.dtype == "bfloat16" else "speculative_fp32"), result,
                 partial=partial, archive=args.archive, machine_shared=args.machine_shared)
    assert result["all_identical"], "speculative output differs from plain greedy (see mismatch_prompts)"


if __name__ == "__main__":
    main()
