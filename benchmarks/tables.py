"""The published tables, each rendered from ONE result JSON under benchmarks/results/.

    python benchmarks/tables.py            # rewrite BENCHMARKS.md and every marker block in README.md and docs/*.md
    python benchmarks/tables.py --check    # exit 1 when a file is out of date or a table's JSON is missing
    python benchmarks/tables.py --list     # the table names, their JSONs and whether each exists

A document places a table with a marker pair; everything between the markers is replaced:

    <!-- table:quant -->
    <!-- /table:quant -->

Every rendered table ends with a source line: the JSON (linked), the command that wrote it, the commit (short),
the machine (CPU, ISA, cores), threads and the date, all from the JSON's "provenance" block.
Ratios are always same-run ratios; each table's columns say which baseline a ratio uses.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
MARKER = re.compile(r"(<!-- table:([A-Za-z0-9_-]+) -->)(.*?)(<!-- /table:\2 -->)", re.S)


class TableError(Exception):
    """A table cannot be rendered: its JSON is missing or lacks what the table reads."""


# ---- formatting -----------------------------------------------------------------------------------------
def num(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"
    return str(v)


def pct(v, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:+.{digits}f}%"


def ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def source_line(rel: str, data: dict, link_prefix: str) -> str:
    """Where the figures come from: JSON, command, commit, machine, threads, date."""
    p = data.get("provenance")
    if not isinstance(p, dict):
        raise TableError(f"{rel} has no provenance block")
    m = p.get("machine") or {}
    isa = [f for f in m.get("isa", []) if f.startswith(("avx512", "amx", "avx_vnni"))] or m.get("isa", [])[:2]
    commit = (p.get("commit") or "unknown")[:7] + (" (uncommitted changes)" if p.get("dirty") else "")
    parts = [f"Source: [{rel}]({link_prefix}{rel})", f"command `{p.get('command', '?')}`", f"commit {commit}",
             f"{m.get('cpu', '?')} ({', '.join(isa) or 'ISA not recorded'}; {m.get('cores', '?')} cores, "
             f"{m.get('threads', '?')} threads)", f"{str(p.get('date', '?'))[:10]}"]  # fmt: skip
    if p.get("machine_shared"):
        parts.append("machine shared with other jobs during the run: speed figures are noisy")
    if p.get("stamped_from_history"):
        parts.append("provenance rebuilt from git history")
    return "*" + "; ".join(parts) + ".*"


def get(data: dict, *path, rel: str = ""):
    """data[path...] or a TableError naming the missing field."""
    cur = data
    for k in path:
        try:
            cur = cur[k]
        except (KeyError, IndexError, TypeError):
            raise TableError(f"{rel}: no field {'/'.join(map(str, path))}") from None
    return cur


# ---- the tables -----------------------------------------------------------------------------------------
BITS_ORDER = {32: 0, 16: 1, 8: 2, 4: 3}


def runtime(d: dict, rel: str) -> str:
    speed, ratios = get(d, "speed", rel=rel), get(d, "ratios", rel=rel)
    s = d.get("settings", {})
    names = sorted(speed, key=lambda n: (BITS_ORDER.get(speed[n].get("bits_group"), 9), -speed[n]["decode_tok_s"]))
    rows = [[n, speed[n].get("bits_group", "-"), num(speed[n]["prefill_tok_s"], 0), num(speed[n]["decode_tok_s"]),
             ratio(ratios[n].get("decode_vs_fastest")), ratio(ratios[n].get("decode_vs_llama_cpp")),
             ratio(ratios[n].get("prefill_vs_fastest"))] for n in names]  # fmt: skip
    head = [f"{d.get('model', '')}: engine", "weight bits", f"prefill tok/s ({s.get('prompt_len', '?')} tokens)",
            f"decode tok/s ({s.get('new_tokens', '?')} new)", "decode ÷ fastest same bits",
            "decode ÷ llama.cpp same bits", "prefill ÷ fastest same bits"]  # fmt: skip
    out = md_table(head, rows)
    if d.get("skipped"):
        out += "\n\nNot run: " + "; ".join(f"{k} ({v})" for k, v in d["skipped"].items()) + "."
    return out


def quant(d: dict, rel: str) -> str:
    parts = []
    for model, r in get(d, "models", rel=rel).items():
        info = r["configs"]
        rows = []
        for label, v in info.items():
            rows.append([label, num(v.get("bits_per_weight"), 2), num(v.get("ppl"), 2), pct(v.get("ppl_change")),
                         num(v.get("kl"), 3), num(v.get("top1_agreement"), 3), num(v.get("decode_tok_s")),
                         ratio(v.get("decode_vs_bf16")), num(v.get("prefill_tok_s"), 0), num(v.get("weight_mb")),
                         num(v.get("peak_rss_mb"), 0)])  # fmt: skip
        windows = r.get("quality", {}).get("base", {}).get("windows", "?")
        parts.append(f"**{model}** (quality: WikiText-2 test, {windows} x 512 tokens; KL and top-1 against the fp32 "
                     "model)\n\n" + md_table(
                         ["config", "bits/weight", "ppl", "ppl vs fp32", "KL", "top-1", "decode tok/s",
                          "decode ÷ leanlm bf16", "prefill tok/s", "weight MB", "peak RSS MB"], rows))  # fmt: skip
    return "\n\n".join(parts)


def generic(d: dict, rel: str, key: str = "table", cols: list[str] | None = None) -> str:
    rows = get(d, key, rel=rel)
    if not rows:
        raise TableError(f"{rel}: {key} is empty")
    cols = cols or list(rows[0])
    return md_table(cols, [[num(r.get(c), 3) if isinstance(r.get(c), float) else num(r.get(c)) for c in cols]
                           for r in rows])  # fmt: skip


def prune(d: dict, rel: str) -> str:
    return generic(d, rel, cols=["config", "pattern", "sparsity", "ppl", "kl", "weight_MB", "disk_MB", "decode_tok_s",
                                 "decode_x"]) + "\n\ndecode_x: decode tok/s ÷ the dense fp32 model's, same run."


def adaptive(d: dict, rel: str) -> str:
    out = generic(d, rel, cols=["config", "ppl", "ppl_+%", "kl", "top1", "flops_frac", "decode_tok_s", "decode_x"])
    s = d.get("settings", {})
    base = "int8 (RTN per channel)" if d.get("weights") == "int8" else d.get("dtype", "")
    return out + (f"\n\nQuality: WikiText-2 test, {s.get('windows', '?')} x 512 tokens, KL and top-1 against the dense "
                  "model; calibration on WikiText-2 validation. decode_x: decode tok/s ÷ the dense "
                  f"{base} model's (leanlm's fused runtime), interleaved in the same run ({s.get('prompt_len', '?')}-token "
                  f"prompt, {s.get('new_tokens', '?')} new tokens, median of {s.get('runs', '?')} runs); flops_frac: "
                  "predicted fraction of decoder FLOPs per token.")


def kv(d: dict, rel: str) -> str:
    speed = ((d.get("speed") or {}).get("policies")) or {}
    rows = []
    for r in get(d, "ppl", rel=rel):
        sp = speed.get(r["spec"], {})
        rows.append([r["spec"], num(r["kv_bytes_per_token"], 0), ratio(r.get("kv_reduction")), num(r["ppl"], 3),
                     pct(r.get("ppl_vs_full"), 2), num(r["ppl_tail"], 3), pct(r.get("ppl_tail_vs_full"), 2),
                     num(sp.get("tok_s")), ratio(sp.get("speedup_vs_full"))])  # fmt: skip
    ctx = (d.get("speed") or {}).get("context", "?")
    first = d["ppl"][0] if d["ppl"] else {}
    head = ["policy", "KV bytes/token", "full ÷ this (KV bytes)",
            f"ppl ({d.get('text', '?')}, {first.get('seq_len', '?')}-token window)", "vs full", "ppl, 2nd half", "vs full",
            f"decode tok/s at {ctx} context", "decode ÷ full cache"]
    return md_table(head, rows)


def speculative(d: dict, rel: str) -> str:
    cols = [("config", None), ("all_tok_s", 1), ("all_speedup", 2), ("summarize_speedup", 2), ("edit_speedup", 2),
            ("extract_speedup", 2), ("chat_speedup", 2), ("acceptance_rate", 2), ("identical", None)]
    rows = [[num(r.get(c), k) if k else num(r.get(c)) for c, k in cols] for r in get(d, "configs", rel=rel)]
    return md_table([c for c, _ in cols], rows) + (
        f"\n\nspeedups: tok/s ÷ plain greedy decoding of the same {d.get('settings', {}).get('dtype', '')} target, "
        "same run; identical: outputs equal to plain greedy.")


def costmodel(d: dict, rel: str) -> str:
    rows = [[v["variant"], v["kind"], num(v["measured"]), num(v["predicted"]), pct(v["error"])]
            for v in get(d, "verification", rel=rel)]
    return md_table(["recipe", "phase", "measured tok/s", "predicted tok/s", "error"], rows) + (
        f"\n\nMedian |error|: {pct(d.get('median_abs_error'))} (decode {pct(d.get('median_abs_error_decode'))}, "
        f"prefill {pct(d.get('median_abs_error_prefill'))}).")


def memory(d: dict, rel: str) -> str:
    rows = [[r["dtype"], num(r["peak_rss_mb"], 0)] for r in get(d, "peak_rss", rel=rel)]
    return md_table([f"{d.get('model', '')} dtype", "peak RSS MB (load + 32 tokens)"], rows)


def memory_large(d: dict, rel: str) -> str:
    s = get(d, "summary", rel=rel)
    rows = [["conversion of the GGUF (streamed, bf16 cache)", num(s["convert_peak_rss_gb"], 2), "4.00",
             num(s["convert_seconds"] / 60, 1)]]
    if "gptq" in d:
        g = d["gptq"]
        rows.append([f"GPTQ int4 g{g['group']}, {g['samples']} x {g['seq_len']} tokens, {g['threads']} threads",
                     num(s["gptq_int4_peak_rss_gb"], 2), num(g["peak_bound_gb"], 2), num(s["gptq_int4_minutes"], 1)])
    return md_table([f"{d.get('model', '')}: step", "peak RSS GB", "bound GB", "minutes"], rows)


def head_bits(d: dict, rel: str) -> str:
    rows = []
    for model, s in get(d, "summary", rel=rel).items():
        rows.append([model, f"{s['head_int8_kl']:.4f}", f"{s['head_int4_g128_kl']:.4f}",
                     f"{s['int4_model_kl_head_int8']:.4f}", f"{s['int4_model_kl_head_int4']:.4f}"])
    return md_table(["model", "KL: head int8, body bf16", "head int4 g128, body bf16", "int4 g128 body, head int8",
                     "int4 g128 body, head int4"], rows)  # fmt: skip


def tasks(d: dict, rel: str) -> str:
    rows = []
    for model, res in get(d, "results", rel=rel).items():
        for task, r in res.items():
            rows.append([model, task, r["n"], f"{r['acc']:.3f} ± {r['acc_stderr']:.3f}",
                         "-" if r.get("acc_norm") is None else f"{r['acc_norm']:.3f} ± {r['acc_norm_stderr']:.3f}"])
    return md_table(["model", "task", "documents", "acc ± s.e.", "acc_norm ± s.e."], rows)


def export(d: dict, rel: str) -> str:
    rows = [[t, num(r.get("file_mb")), f"{r.get('greedy_equal')}/{r.get('greedy_prompts')}",
             num(r.get("llama_cpp_ppl"), 3),
             pct(r.get("ppl_rel_vs_leanlm_fp32"), 2), num(r.get("prefill_tok_s"), 0), num(r.get("decode_tok_s"))]
            for t, r in get(d, "types", rel=rel).items()]  # fmt: skip
    return md_table(["GGUF type (loaded in llama.cpp)", "file MB", "greedy = leanlm", "ppl", "vs leanlm fp32",
                     "prefill tok/s", "decode tok/s"], rows)  # fmt: skip


def serve_load(d: dict, rel: str) -> str:
    """Batched server at each client count, and the 8-client rounds against the serial server (--max-active 1)."""
    sm = get(d, "summary", rel=rel)
    rows = [[r["clients"], r["requests"], num(r["tok_s"]), num(r["p50_s"], 2), num(r["p99_s"], 2), num(r["mean_batch"], 2),
             f"{r['served']}/{r['mixed']}/{r['wrong']}/{r['lost']}"] for r in get(d, "levels", rel=rel)]  # fmt: skip
    out = md_table([f"{sm['model']} {sm['dtype']}, {sm['max_tokens']} tokens/answer: clients", "requests",
                    "tok/s (batched server)", "p50 latency s", "p99 latency s", "mean batch",
                    "answers exact/mixed/wrong/lost"], rows)  # fmt: skip
    rounds = get(d, "rounds_8_clients", rel=rel)
    out += "\n\n" + md_table(["8 clients, round", "serial server tok/s (--max-active 1)", "batched server tok/s",
                               "batched ÷ serial"],
                              [[i + 1, num(r["serial"]["tok_s"]), num(r["batched"]["tok_s"]), ratio(r["ratio"])]
                               for i, r in enumerate(rounds)])  # fmt: skip
    out += (f"\n\nThroughput at 8 clients vs the serial server (median of rounds): "
            f"**{ratio(sm['throughput_8_clients_vs_serial'])}**; mixed or lost answers: "
            f"**{sm['mixed_or_lost_answers']}** of {sm['answers_checked']} checked against sequential references.")
    return out


def server_chaos(d: dict, rel: str) -> str:
    """What a mix of normal, streaming, abandoned, oversized and malformed requests got, and /health's latency."""
    sm, h, c = get(d, "summary", rel=rel), get(d, "health_ms", rel=rel), get(d, "config", rel=rel)
    busy = h["while_disruptive"]
    rows = [["answers lost, mixed or wrong", sm["lost_or_mixed_answers"]],
            ["answers served exact", sm["served"]],
            ["malformed / oversized requests rejected with an OpenAI-shaped 4xx", sm["rejected"]],
            ["requests refused 503 (queue full)", sm["rejected_busy_503"]],
            ["unexpected responses", sm["unexpected_rejections"]],
            ["server tracebacks", sm["server_tracebacks"]],
            ["/health p50 / p99 / max ms, all probes", f"{num(h['p50'], 1)} / {num(h['p99'], 1)} / {num(h['max'], 1)}"],
            ["/health p99 ms while a 10 MB or abandoned request was in flight",
             f"{num(busy['p99'], 1)} ({busy['probes']} probes)"],
            ["normal request p50 / p99 s", f"{num(sm['normal_request_p50_s'], 2)} / {num(sm['normal_request_p99_s'], 2)}"]]  # fmt: skip
    head = [f"{c['model']}, {c['clients']} clients for {num(c['duration'], 0)} s", "result"]
    return md_table(head, [[a, num(b) if not isinstance(b, str) else b] for a, b in rows])


def gguf_compat(d: dict, rel: str) -> str:
    """Per model and GGUF type: llama.cpp's next-token logits against leanlm's on the same token ids."""
    rows = []
    groups = [(m, r.get("types", {}), "") for m, r in get(d, "models", rel=rel).items()]
    groups += [(f"smollm2-135m {label}", r, " (own codes)") for label, r in d.get("exact", {}).items()]
    for model, types, note in groups:
        for t, r in types.items():
            rows.append([model, t + note, num(r["file_mb"]), num(r["top1_agreement"], 3), f"{r['mean_kl']:.4f}",
                         num(r["last_logits_corr_min"], 4), f"{r['greedy_equal']}/{r['greedy_prompts']}"])  # fmt: skip
    not_run = [f"{m} ({r['not_run']})" for m, r in d["models"].items() if "not_run" in r]
    out = md_table(["model", "GGUF type", "file MB", "top-1 = leanlm", "KL (nats)", "logit corr (min)",
                    f"greedy {d.get('greedy_tokens', '?')} = leanlm"], rows)  # fmt: skip
    return out + ("\n\nNot run: " + "; ".join(not_run) + "." if not_run else "")


def ab_refactor(d: dict, rel: str) -> str:
    """Before/after medians (tok/s, same run, interleaved) per model, dtype and phase, from bench_ab_commits.py."""
    rows = []
    for r in get(d, "results", rel=rel):
        for key, phase in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill")):
            try:
                b, a = r[key]["before"], r[key]["after"]
                rows.append([r["model"], r["dtype"], phase, f"{num(b['median'])} ({num(b['min'])}-{num(b['max'])})",
                             f"{num(a['median'])} ({num(a['min'])}-{num(a['max'])})", ratio(r[key]["after_over_before"])])
            except (KeyError, TypeError) as e:
                raise TableError(f"{rel}: each result needs {key} with before/after medians: {e}") from None
    b, a = get(d, "before", "commit", rel=rel), get(d, "after", "commit", rel=rel)
    s = get(d, "settings", rel=rel)
    note = (f"\n\nbefore: commit {str(b)[:7]}, after: commit {str(a)[:7]}; median (min-max) of {s['runs']} interleaved "
            f"rounds, one fresh process each, {s['threads']} threads; decode: {s['new_tokens']} new tokens after a "
            f"{s['prompt_tokens']}-token prompt; prefill: {s['prefill_tokens']} tokens.")
    return md_table(["model", "dtype", "phase", "before tok/s", "after tok/s", "after ÷ before"], rows) + note


def int4_tuning_curve(d: dict, rel: str) -> str:
    book = get(d, "settings", "book", rel=rel)
    rows = []
    for p in get(d, "curve", rel=rel):
        w, b = p["wikitext2"], p[book]
        rows.append([p["step"], f"{w['ppl']:.2f} ({pct(w['ppl_change'])})", num(w["kl"], 3),
                     num(w["top1_agreement"], 3),
                     f"{b['ppl']:.2f} ({pct(b['ppl_change'])})", num(b["kl"], 3)])  # fmt: skip
    return md_table(["tuning step", "WikiText-2 ppl (vs fp32)", "KL", "top-1", f"{book} ppl (vs fp32)", f"{book} KL"],
                    rows)  # fmt: skip


def optimize(d: dict, rel: str) -> str:
    """bench_optimize.py: every trial (format x draft) with its quality, the peers, then the interleaved speed
    table of the answers against llama.cpp and the summary."""
    table = get(d, "speed_table", rel=rel)
    answers = {v: k for k, v in get(d, "answers", rel=rel).items() if v}
    rows = []
    for t in get(d, "trials", rel=rel) + list(get(d, "peers", rel=rel).values()):
        timed = table.get(t["name"], {}).get("decode_tok_s")
        rows.append([t["name"], num(t.get("bits") or t.get("gguf_type", ""), 3), pct(t["ppl_increase"], 2),
                     num(t["kl"], 4), f"{t.get('identical_to_reference', '-')}" if "identical_to_reference" in t else "-",
                     num(t["decode_tok_s"]), num(timed) if timed else "-", answers.get(t["name"], "")])  # fmt: skip
    s = get(d, "summary", rel=rel)
    n = len(get(d, "settings", "prompts", rel=rel))
    out = md_table(["configuration", "bits", "ppl vs fp32", "KL", f"greedy outputs = fp32's (of {n})", "decode tok/s (trial)",
                    "decode tok/s (speed table)", "answer"], rows)  # fmt: skip
    return out + (f"\n\nSame-run ratios from the speed table: lossless ({s['lossless']}) "
                  f"{ratio(s['lossless_decode_vs_llamacpp_q8_0'])} llama.cpp Q8_0; at Q4_K_M's KL or lower "
                  f"({s['q4_k_m_quality']}) {ratio(s['q4km_quality_decode_vs_llamacpp_q4_k_m'])} llama.cpp Q4_K_M; "
                  f"within the budget ({s['budget']}) {ratio(s['budget_decode_vs_llamacpp_q8_0'])} llama.cpp Q8_0.")


def long_context(d: dict, rel: str) -> str:
    rows = []
    for r in get(d, "rows", rel=rel):
        rows.append([r["model"], f"{r['context'] // 1024}k", r["method"], pct(r.get("ppl_vs_full"), 2),
                     num(r.get("needle_recall"), 2), num(r["kv_bytes"] / 2**20, 1), ratio(r.get("kv_bytes_reduction")),
                     num(r.get("decode_tok_s")), ratio(r.get("decode_vs_full"))])  # fmt: skip
    out = md_table(["model", "context", "method", "ppl vs full", "needle recall", "KV MiB", "KV ÷ full",
                    "decode tok/s", "decode ÷ full"], rows)  # fmt: skip
    s = d.get("summary") or {}
    lines = []
    for key, what in (("best_sparse_decode_speedup_8k_within_2pct", "best sparse decode ÷ full at 8k"),
                      ("best_kv_bytes_reduction_within_2pct", "best KV bytes reduction at 8k")):
        best = s.get(key) or {}
        if best.get("value") is None:
            lines.append(f"{what}: no method met the conditions")
        else:
            lines.append(f"{what}: {ratio(best['value'])} ({best['model']}, {best['method']})")
    for model, v in (s.get("int8_kv_decode_vs_bf16_kv_8k") or {}).items():
        lines.append(f"int8 KV decode ÷ bf16 KV at 8k ({model}): {ratio(v)}")
    weights = d.get("weights", "bf16")
    out += (f"\n\nWeights {weights}; ppl on the book tokens after the needle (the end of the context), against the "
            "full cache; decode tok/s: median of timed rounds on each method's own prefilled caches.")  # fmt: skip
    if lines:
        out += "\n\n" + "; ".join(lines) + f" (conditions: {s.get('conditions', '?')})."
    return out


def maskllm(d: dict, rel: str) -> str:
    rows = [[r["method"], r.get("pattern", "-"), num(r.get("sparsity_prunable"), 3), num(r["ppl"], 2), num(r["kl"], 3),
             num(r.get("top1_agreement"), 3), num(r.get("minutes"), 1), num(r.get("cpu_minutes"), 1)]
            for r in get(d, "rows", rel=rel)]  # fmt: skip
    out = md_table(["method", "pattern", "sparsity (block linears)", "ppl", "KL", "top-1", "minutes", "CPU minutes"],
                   rows)  # fmt: skip
    cal = d.get("calibration", {})
    out += (f"\n\nWikiText-2 test, {d.get('settings', {}).get('windows', '?')} x 512 tokens; KL and top-1 against the "
            f"dense model. Calibration: {cal.get('samples', '?')} x {cal.get('seq_len', '?')} tokens of "
            f"{cal.get('text', '?')}. Learned ppl ÷ SparseGPT ppl: "
            f"{num(get(d, 'learned_nm_ppl_over_sparsegpt_nm', rel=rel), 3)}.")  # fmt: skip
    return out


def share(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def peers(d: dict, rel: str) -> str:
    """bench_peers.py: one row per model x engine (idle prefill and decode, decode with one core busy, share of
    the DRAM-read bound), then the per-model summary ratios."""
    s, bw = d.get("settings", {}), get(d, "bandwidth", rel=rel)
    rows, summary_rows = [], []
    for model, rec in get(d, "models", rel=rel).items():
        for name, e in get(rec, "engines", rel=rel).items():
            idle, busy = e.get("idle") or {}, e.get("busy") or {}
            d_idle, d_busy = idle.get("decode_tok_s"), busy.get("decode_tok_s")
            busy_cell = "-" if d_busy is None else f"{num(d_busy)} ({share(d_busy / d_idle if d_idle else None)})"
            rows.append([model, name, e.get("bits", "-"), num(idle.get("prefill_tok_s"), 0), num(d_idle), busy_cell,
                         num(e["bytes_per_token"] / 1e6), num(e.get("dram_bound_tok_s")),
                         share(e.get("share_of_dram_bound"))])  # fmt: skip
        sm = (d.get("summary") or {}).get(model) or {}
        pv, bc = sm.get("prefill_vs_best_peer") or {}, sm.get("busy_core_share_of_idle") or {}
        summary_rows.append([model, ratio(pv.get("bf16")), ratio(pv.get("int8")), ratio(pv.get("int4")),
                             ratio(sm.get("decode_bf16_vs_llamacpp_f16")),
                             ratio(sm.get("decode_int8_vs_llamacpp_q8_0")),
                             ratio(sm.get("decode_int4_vs_llamacpp_q4_0")), share(bc.get("leanlm-int8")),
                             share(bc.get("llama.cpp-q8_0")), share(sm.get("int8_share_of_dram_bound")),
                             share(sm.get("int4_share_of_dram_bound"))])  # fmt: skip
    if not rows:
        raise TableError(f"{rel}: no engines measured")
    head = ["model", "engine", "weight bits", f"prefill tok/s ({s.get('prompt_len', '?')} tokens)",
            f"decode tok/s ({s.get('new_tokens', '?')} new)", "decode, one core busy (share of idle)",
            "MB read / token", "DRAM-bound tok/s", "decode share of bound"]  # fmt: skip
    out = md_table(head, rows) + "\n\n" + md_table(
        ["model", "prefill bf16 ÷ best 16-bit peer", "int8 ÷ best 8-bit peer", "int4 ÷ best 4-bit peer",
         "decode bf16 ÷ llama.cpp F16", "int8 ÷ Q8_0", "int4 ÷ Q4_0", "leanlm int8 busy ÷ idle",
         "llama.cpp Q8_0 busy ÷ idle", "int8 share of bound", "int4 share of bound"], summary_rows)  # fmt: skip
    out += (f"\n\nDRAM read: {num(get(bw, 'dram_read_gb_s', rel=rel))} GB/s at {bw.get('threads', '?')} threads "
            f"(best torch.sum over a {num(bw.get('tensor_gb'))} GB tensor). MB read / token: "
            f"{d.get('bytes_per_token', '?')}. DRAM-bound tok/s = bound bandwidth ÷ bytes read per token; the bound "
            "bandwidth is the larger of that probe and the fastest weight-read rate an engine reached on the model ("
            + ", ".join(f"{m}: {num(rec.get('bound_bandwidth_gb_s'))} GB/s" for m, rec in d["models"].items())
            + "). One core busy: "
            f"another process spinning on CPU {s.get('busy_cpu', '?')}. Median of {s.get('runs', '?')} runs, engines "
            "interleaved in one process.")  # fmt: skip
    spun = {m: (rec.get("busy_core") or {}).get("spinner_core_share") for m, rec in d["models"].items()}
    if any(v is not None for v in spun.values()):
        out += " The busy process held " + ", ".join(f"{share(v)} of a core ({m})" for m, v in spun.items()
                                                   if v is not None) + "."  # fmt: skip
    skipped = {f"{m}: {k}": v for m, rec in d["models"].items() for k, v in (rec.get("skipped") or {}).items()}
    skipped.update(d.get("skipped") or {})
    if skipped:
        out += "\n\nNot run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "."
    return out


def quality_vs_llamacpp(d: dict, rel: str) -> str:
    """bench_quality_peers.py: per model, leanlm's rows and llama.cpp's imatrix quants by bpw, then the summary."""
    rows, summary_rows = [], []
    for model, block in get(d, "models", rel=rel).items():
        source = (block.get("source_grid") or "").upper()
        for name, r in sorted(block["rows"].items(), key=lambda kv: kv[1]["bpw"]):
            if r["engine"] == "leanlm":
                c = r["config"]
                p = r.get("plan", {})
                promoted = r.get("promoted_linears", r.get("int8_linears"))  # (older records: promotions to int8)
                grid = f"{c['bits']}-bit {c['levels']}" if c["levels"] == "signed" else c["levels"]
                what = (f"GPTQ {grid} g{c['group']}, head / embedding {p.get('head', '?')}"
                        + (" (head by GPTQ)" if c.get("head_gptq") and c.get("head_bits") in (4, 5, 6) else "")
                        + (f", {promoted} Linears {p.get('high', 'int8-pc-sym')}" if promoted else "")
                        + (f" (partly on the source's {source} grid)" if r.get("matches_source_grid") else ""))  # fmt: skip
            else:
                what = ("imatrix; " + ",".join(r["types"]) + (f" (includes the source's {source})"
                                                              if r.get("matches_source_grid") else ""))  # fmt: skip
            cells = [f"{pct(r[t]['ppl'] / r[t]['ppl_base'] - 1, 2)} / {num(r[t]['kl'], 4)}" for t in ("wikitext2", "book")]
            kl_r = [r[t].get("kl_ratio_vs_llamacpp_best") for t in ("wikitext2", "book")] if r["engine"] == "leanlm" else []
            rows.append([model, name, what, num(r["bpw"], 3), *cells, " / ".join(ratio(v) for v in kl_r) or "-"])
        sm = (d.get("summary") or {}).get(model) or {}
        w, b = sm.get("wikitext2") or {}, sm.get("book") or {}
        summary_rows.append([model, ratio(w.get("kl_ratio_vs_llamacpp_best")), ratio(b.get("kl_ratio_vs_llamacpp_best")),
                             ratio(w.get("ppl_delta_ratio_vs_llamacpp_best")),
                             ratio(b.get("ppl_delta_ratio_vs_llamacpp_best")),
                             ratio(w.get("kl_ratio_vs_llamacpp_best_unmarked")),
                             ratio(b.get("kl_ratio_vs_llamacpp_best_unmarked")),
                             "-" if sm.get("int4_ppl_delta_pct_at_4.6bpw") is None
                             else f"{sm['int4_ppl_delta_pct_at_4.6bpw']:+.2f}% ({num(sm.get('int4_bpw_at_4.6bpw'), 3)} bpw)",
                             f"{num(sm.get('quantize_minutes'), 1)} ({num(sm.get('quantize_cpu_minutes'), 1)} CPU)"])  # fmt: skip
    if not rows:
        raise TableError(f"{rel}: no rows")
    s = next(iter(d["models"].values()))["settings"]
    out = md_table(["model", "row", "grid", "bpw", "WikiText-2 ppl / KL", "book ppl / KL",
                    "KL ÷ best llama.cpp within 0.1 bpw (WikiText-2 / book)"], rows)  # fmt: skip
    out += "\n\n" + md_table(
        ["model", "KL ratio WikiText-2 (worst row)", "KL ratio book", "ppl-delta ratio WikiText-2", "ppl-delta ratio book",
         "KL ratio WikiText-2, unmarked llama.cpp rows", "KL ratio book, unmarked", "int4 ppl delta at <= 4.6 bpw",
         "quantize minutes, wall (CPU) (int4 point)"], summary_rows)  # fmt: skip
    out += (f"\n\nppl deltas and KL against the float32 leanlm model on the same {s['windows']} x {s['seq_len']}-token "
            f"windows of WikiText-2 test and of {s['book']} (never used for calibration); both engines calibrate on "
            f"{s['samples']} windows of WikiText-2 validation (leanlm's GPTQ; llama-imatrix). bpw: every tensor's "
            "storage bits over the parameter count. A ratio divides leanlm's figure by the best llama.cpp row within "
            "0.1 bpw; 'unmarked' compares only rows off the source checkpoint's own grid: llama.cpp rows whose types "
            "include it, and leanlm rows with Linears on it, are left out.")  # fmt: skip
    return out


@dataclass(frozen=True)
class Table:
    name: str
    json: str  # path under the repository root
    render: Callable[[dict, str], str]
    title: str
    optional: bool = False  # left out of BENCHMARKS.md while its JSON is missing (an error only where a doc cites it)


TABLES = [
    Table("runtime", "benchmarks/results/runtime_smollm2-135m.json", runtime,
          "Runtime: leanlm vs llama.cpp, OpenVINO and transformers by weight bits (SmolLM2-135M)"),
    Table("runtime_gemma", "benchmarks/results/runtime_gemma3-270m.json", runtime,
          "Runtime: leanlm vs peers by weight bits (Gemma-3-270M)", optional=True),
    Table("quant", "benchmarks/results/quant.json", quant, "Weight quantization: quality, speed and memory",
          optional=True),
    Table("prune", "benchmarks/results/prune_smollm2-135m.json", prune, "Pruning (SmolLM2-135M)", optional=True),
    Table("kv", "benchmarks/results/kv.json", kv, "KV-cache policies at one budget (SmolLM2-135M)"),
    Table("adaptive", "benchmarks/results/adaptive_smollm2-135m-bf16.json", adaptive,
          "Adaptive computation against dense bf16 (SmolLM2-135M)"),
    Table("adaptive_qwen_int8", "benchmarks/results/adaptive_qwen2.5-0.5b-int8.json", adaptive,
          "Activation sparsity on int8 weights against dense int8 (Qwen2.5-0.5B)", optional=True),
    Table("adaptive_gemma", "benchmarks/results/adaptive_gemma3-270m-bf16.json", adaptive,
          "Adaptive computation against dense bf16 (Gemma-3-270M)", optional=True),
    Table("speculative", "benchmarks/results/archive/2026-11-24/speculative_fp32_2threads.json", speculative,
          "Speculative decoding, fp32 target, 2 threads (archived run)"),
    Table("costmodel", "benchmarks/results/costmodel.json", costmodel, "Cost model: predicted vs measured tok/s",
          optional=True),
    Table("memory", "benchmarks/results/memory_smollm2-135m.json", memory, "Peak memory (SmolLM2-135M)"),
    Table("memory_large", "benchmarks/results/memory_qwen2.5-1.5b.json", memory_large,
          "Memory and time of the 1.5B: conversion and GPTQ int4 calibration", optional=True),
    Table("head_bits", "benchmarks/results/head_bits.json", head_bits,
          "The LM head's bits: KL to the fp32 model", optional=True),
    Table("tasks", "benchmarks/results/tasks_smollm2-135m.json", tasks, "Zero-shot tasks (SmolLM2-135M)"),
    Table("tasks_gemma", "benchmarks/results/tasks_gemma3-270m.json", tasks, "Zero-shot tasks (Gemma-3-270M)",
          optional=True),
    Table("export", "benchmarks/results/export.json", export, "GGUF export loaded in llama.cpp", optional=True),
    Table("gguf_compat", "benchmarks/results/archive/2026-12-07/gguf_compat.json", gguf_compat,
          "GGUF exports of the real models run in llama.cpp: logit agreement with leanlm (archived run, stopped "
          "before its last row, the IQ4_NL own-codes model)"),
    Table("peers", "benchmarks/results/peers.json", peers,
          "leanlm vs llama.cpp and OpenVINO on real-size models: idle, one core busy, DRAM-read bound", optional=True),
    Table("serve_load", "benchmarks/results/serve_load.json", serve_load,
          "Server under load: continuous batching vs one request at a time (openai client)", optional=True),
    Table("server_chaos", "benchmarks/results/server_chaos.json", server_chaos,
          "Server chaos: normal, streaming, abandoned, oversized and malformed requests at once", optional=True),
    Table("ab_refactor", "benchmarks/results/ab_refactor.json", ab_refactor,
          "Same-run A/B before and after the restructuring"),
    Table("quality_vs_llamacpp", "benchmarks/results/quality_vs_llamacpp.json", quality_vs_llamacpp,
          "4-bit quality beside llama.cpp's imatrix quants at equal bits per weight", optional=True),
    Table("long_context", "benchmarks/results/long_context.json", long_context,
          "Long context: sparse attention and KV compression on real text with a needle", optional=True),
    Table("maskllm_qwen", "benchmarks/results/maskllm_qwen2.5-0.5b.json", maskllm,
          "Learned 2:4 masks (MaskLLM-style) against Wanda and SparseGPT 2:4 (Qwen2.5-0.5B)", optional=True),
    Table("optimize_qwen", "benchmarks/results/optimize_qwen2.5-0.5b.json", optimize,
          "leanlm optimize on Qwen2.5-0.5B: every format and draft, llama.cpp in the same run", optional=True),
    Table("int4_tuning_curve", "benchmarks/results/archive/2026-11-25/quant_int4_e2e_tuning_curve.json",
          int4_tuning_curve, "Int4 g128 end-to-end tuning curve (SmolLM2-135M, archived run)"),
]
BY_NAME = {t.name: t for t in TABLES}


def render(name: str, link_prefix: str = "") -> str:
    """Table NAME as markdown with its source line; TableError when its JSON is missing or incomplete."""
    if name not in BY_NAME:
        raise TableError(f"unknown table '{name}'; known: {', '.join(BY_NAME)}")
    t = BY_NAME[name]
    path = ROOT / t.json
    if not path.exists():
        raise TableError(f"table {name}: {t.json} does not exist (run its benchmark; see BENCHMARKS.md)")
    data = json.loads(path.read_text())
    try:
        body = t.render(data, t.json)
    except (KeyError, TypeError, IndexError) as e:
        raise TableError(f"table {name}: {t.json} lacks a field the table reads ({type(e).__name__}: {e})") from None
    return body + "\n\n" + source_line(t.json, data, link_prefix)


def prefix_for(doc: Path) -> str:
    """The relative path from a document's folder to the repository root (links in rendered tables)."""
    depth = len(doc.resolve().parent.relative_to(ROOT).parts)
    return "../" * depth


INTRO = """# Benchmarks

Generated by `python benchmarks/tables.py` from the JSONs under `benchmarks/results/`; do not edit by hand.
Each table comes from one JSON, named under it with the command that wrote it, the commit, the machine
(CPU, ISA extensions, cores, threads) and the date. Runs under `benchmarks/results/archive/` are kept
runs that are costly to repeat (or partial re-runs); their date folder says when they ran.

Every ratio is a same-run ratio: the engines or configurations in one table were measured in one process,
interleaved run by run, on the same token ids. Each table says which baseline a ratio divides by:
- runtime: the fastest engine of the same weight bits, and llama.cpp of the same bits;
- quant: leanlm bf16 (decode); ppl, KL and top-1 against the fp32 model;
- prune: the dense fp32 model; adaptive: the dense model of the same dtype (bf16) on leanlm's fused runtime;
- kv: the full (unevicted, unquantized) cache; speculative: plain greedy decoding of the same target;
- ab_refactor: the commit before the restructuring;
- serve_load: the same server with --max-active 1 (one request at a time), in alternating rounds of one run;
- peers: the best peer of the same weight bits (prefill), llama.cpp of the same type (decode), the engine's own
  idle decode (one core busy), bound bandwidth ÷ bytes read per token (DRAM bound).
Speed figures from a run marked "machine shared" were taken while other jobs ran: read their ratios, not
their absolute tok/s.
"""


def benchmarks_md() -> tuple[str, list[str]]:
    """BENCHMARKS.md's text and the errors of tables that could not be rendered."""
    parts, errors = [INTRO], []
    for t in TABLES:
        if t.optional and not (ROOT / t.json).exists():
            continue
        try:
            body = render(t.name)
        except TableError as e:
            errors.append(str(e))
            body = f"*Not available: {e}*"
        parts.append(f"## {t.title}\n\n<!-- table:{t.name} -->\n{body}\n<!-- /table:{t.name} -->\n")
    return "\n".join(parts), errors


def fill_markers(text: str, link_prefix: str, errors: list[str], where: str) -> str:
    def sub(m: re.Match) -> str:
        try:
            body = render(m.group(2), link_prefix)
        except TableError as e:
            errors.append(f"{where}: {e}")
            return m.group(0)  # leave the block as it was: --check fails on the error
        return f"{m.group(1)}\n{body}\n{m.group(4)}"

    return MARKER.sub(sub, text)


def documents() -> list[Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.exists()]


def build() -> tuple[dict[Path, str], list[str]]:
    """{path: new text} for BENCHMARKS.md and every document with markers, and the errors."""
    out, errors = {}, []
    text, errs = benchmarks_md()
    out[BENCHMARKS_MD], errors = text, errs
    for doc in documents():
        old = doc.read_text()
        if MARKER.search(old):
            out[doc] = fill_markers(old, prefix_for(doc), errors, str(doc.relative_to(ROOT)))
    return out, errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is stale or a table fails")
    ap.add_argument("--list", action="store_true", help="list the tables and their JSONs")
    args = ap.parse_args(argv)
    if args.list:
        for t in TABLES:
            print(f"{t.name:20s} {'ok     ' if (ROOT / t.json).exists() else 'MISSING'} {t.json}")
        return 0
    files, errors = build()
    stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"out of date: {p.relative_to(ROOT)} (run python benchmarks/tables.py)")
        for e in errors:
            print(f"error: {e}")
        return 1 if stale or errors else 0
    for p in stale:
        p.write_text(files[p])
        print(f"wrote {p.relative_to(ROOT)}")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
