"""Quality beside llama.cpp's own imatrix quantizer at equal bits per weight, on the same weights (ISSUE 23).

One model per run (--model); its block goes to models/<model> of benchmarks/results/quality_vs_llamacpp.json (the
other models' blocks are kept) and the summary is recomputed over every model in the file.

Same weights: llama.cpp converts leanlm's own HF directory of the model (convert_hf_to_gguf.py -> F16 GGUF), so
both engines start from identical float weights; the reference is the float32 leanlm model. Texts: WikiText-2 test
and a Gutenberg book (its middle third: past the header), --windows x --seq-len tokens each; neither is used for
calibration. Calibration: --samples windows of WikiText-2 *validation* (seed 0): leanlm's GPTQ runs on these token
windows, and llama-imatrix on the same windows as text (decoded; one chunk of --seq-len tokens per window).

Rows:
- llama.cpp: Q4_0, Q4_K_S, Q4_K_M, IQ4_XS, Q5_K_M (--gguf-types), each made by llama-quantize --imatrix from the
  F16 GGUF, scored on the same token windows through llama-cpp-python's logits.
- leanlm: GPTQ (act-order), one row per bits-per-weight point: the bpw of each llama.cpp row (rows within 0.2 of
  each other share one leanlm row at their middle, within +-0.1 of both), and the issue's int4 point (<= 4.6 bpw;
  always a plain setting: the 4-bit table grid, the recipe a user runs, with no sensitivity pass). For a point the
  plan picks the LM head's and an untied embedding's bits (HEADS, tried in HEAD_ORDER; a 4-bit untied head is
  rounded by GPTQ on IQ4_NL's table) and the decoder grid: the 6-bit or 5-bit signed integer table (g32), or the
  4-bit table (--levels) at g32 / g64 / g128. Without --mixed: the setting of most bits within +-0.1 of the point,
  or no row when none lands there. With --mixed: the richest grid that fits, and what is left spent by mixed
  precision: the most sensitive decoder Linears promoted to the next richer grid (int8 per channel above the 6-bit
  table; sensitivity measured once per model, uniform int4 g32 as the probe, --sens-tokens; reused by every row).
  Scored through the decode kernels' numerics (table grids through their kernel, CodebookLinear.kernel_all_rows).

bpw: storage bits of the whole model (codes, scales, zeros, tables, the LM head, embeddings counted once when tied,
norms) over its parameter count; llama.cpp's from the GGUF's tensor bytes, leanlm's from the packed modules.
Source-grid trap: the named models are dequantized GGUFs (Qwen2.5-0.5B mostly Q5_0, SmolLM2-135M Q4_1, Gemma-3-270M
and Qwen2.5-1.5B Q4_K); a llama.cpp row whose tensor types include that type partly reproduces the source's own
rounding, and is marked (matches_source_grid); so is a leanlm row with Linears on the same grid (the 5-bit signed
table at g32 is Q5_0's grid, with bf16 instead of fp16 scales).

Summary, per model and text: for each leanlm row, the ratio of its KL (and of its ppl delta over fp32) to the best
(lowest) of the llama.cpp rows within +-0.1 bpw of it; kl_ratio_vs_llamacpp_best / ppl_delta_ratio_vs_llamacpp_best
are the worst (largest) over the leanlm rows (the target: <= 0.7 everywhere); *_unmarked the same where neither
side uses the source grid (unmarked leanlm rows against unmarked llama.cpp rows). A ppl-delta ratio is left out (None) where llama.cpp's delta is <= 0.
int4_ppl_delta_pct_at_4.6bpw: WikiText-2 ppl delta of the int4 point; quantize_minutes: its quantization time
(GPTQ plus its share of the sensitivity measurement) on --threads threads.

    LEANLM_DATA=/path/to/data python benchmarks/bench_quality_peers.py --model qwen2.5-0.5b
    ... --resume benchmarks/results/archive/DATE/quality_vs_llamacpp.json   # rows an interrupted run measured
    (a run that differs only in leanlm's settings, e.g. without --mixed, gives its llama.cpp rows only)

Needs llama.cpp's tools (bash benchmarks/setup_peers.sh --tools) and llama-cpp-python; --no-llamacpp runs the
leanlm int4 point only (a partial run, archived).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from common import _START, RESULTS, QualityRef, add_result_args, bench_command, machine, write_result

from leanlm import LeanlmError
from leanlm.evaluate.data import read_text, wikitext2_test
from leanlm.evaluate.peers import gguf_scores
from leanlm.evaluate.perplexity import make_windows
from leanlm.evaluate.speed import weight_bytes
from leanlm.model import load_model
from leanlm.provenance import stamp
from leanlm.model.load import load_tokenizer, resolve
from leanlm.quant import GPTQ, RTN, CodebookLinear, MixedPrecision, QSpec, quantize, read_calibration
from leanlm.quant.mixed import layer_sensitivity
from leanlm.quant.pipeline import quantizable

NAME = "quality_vs_llamacpp"
GGUF_TYPES = ("q4_0", "q4_k_s", "q4_k_m", "iq4_xs", "q5_k_m")
# the GGUF type of each named model's source checkpoint (leanlm's named models are converted from these GGUFs)
SOURCE_GRID = {"qwen2.5-0.5b": "q5_0", "smollm2-135m": "q4_1", "gemma3-270m": "q4_k", "qwen2.5-1.5b": "q4_k"}
BPW_TOL = 0.1  # "equal bits per weight"
INT4_POINT = 4.6  # the int4 target: <= 4.6 bpw
PROBE = QSpec(4, 32, True)  # sensitivity probe: uniform int4 g32, a quick stand-in for the table grid
# LM head / untied embedding settings (tied models: the one table takes head_bits)
HEADS = {"int8": dict(head_bits=8), "int8-g32-embed-int4": dict(head_bits=8, head_group=32, embed_bits=4),
         "int8-embed-int4": dict(head_bits=8, embed_bits=4),
         "int6-g32-embed-int4": dict(head_bits=6, head_group=32, embed_bits=4),  # untied heads only
         "int4-g32": dict(head_bits=4, head_group=32, embed_bits=4)}  # fmt: skip
# the order plan() tries them in: a 6-bit head first (GPTQ-rounded, it costs a fraction of an int8 head's KL gain in
# bits), then 4-bit, then the int8 settings; the first that leaves the decoder at least the 4-bit g32 grid wins
HEAD_ORDER = ("int6-g32-embed-int4", "int4-g32", "int8-g32-embed-int4", "int8-embed-int4", "int8")
# a tied table serves the lookup and the head and is rounded to nearest (GPTQ rounds untied heads only), and 4-bit
# RTN there costs more than any decoder grid saves (SmolLM2-135M: KL 0.15-0.22 at every point): int8 first
TIED_HEAD_ORDER = ("int8", "int8-g32-embed-int4", "int4-g32")
TEXTS = ("wikitext2", "book")
LEANLM_ONLY = ("mixed", "sens_tokens", "levels", "heads")  # settings that change leanlm's rows only (--resume keeps llama.cpp's)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def delta(r: dict) -> float:
    return 100 * (r["ppl"] / r["ppl_base"] - 1)


def module_bits(module) -> int:
    return 8 * sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def outside_decoder_bits(directory, head: dict) -> int | None:
    """Storage bits of everything but the decoder Linears, with this head setting (measured on an RTN copy); None
    where the model cannot take it (a 6-bit head on a tied table)."""
    m = load_model(directory, "float32")
    if head["head_bits"] in (5, 6) and m.lm_head is None:
        return None
    m = quantize(m, RTN(bits=4, group=32, symmetric=True, **head), progress=False)
    dec = sum(module_bits(mod) for n, mod in m.named_modules() if n.startswith("layers.") and n in m.quantization["layers"])
    return weight_bytes(m) * 8 - dec


def leanlm_grids(model) -> set[str]:
    """The GGUF types whose grid some of the model's Linears use (the signed tables at g32: Q4_0 / Q5_0's grids, up
    to the scale's rounding, bf16 here and fp16 there), for the source-grid mark."""
    same = {(4, 32): "q4_0", (5, 32): "q5_0"}
    return {same[(m["bits"], m["group"])] for m in model.quantization["layers"].values()
            if m.get("levels") == "signed" and (m["bits"], m["group"]) in same}  # fmt: skip


def tiers(levels: str) -> list[QSpec]:
    """The decoder grids a point can start from, most bits first: the signed integer tables at 6 and 5 bits (g32),
    then the 4-bit table (--levels) at groups 32, 64 and 128."""
    return [QSpec(6, 32, True, "signed"), QSpec(5, 32, True, "signed"), *(QSpec(4, g, True, levels) for g in (32, 64, 128))]


def tier_bits(spec: QSpec) -> float:
    return spec.bits_per_weight(4096)


def plan(target: float, outside: dict[str, int], n_dec: int, n_params: int, mixed: bool, levels: str = "iq4nl",
         heads: tuple[str, ...] = tuple(HEADS)) -> dict | None:  # fmt: skip
    """Head setting, decoder grid (low), the grid its most sensitive Linears are promoted to (high) and the decoder
    Linears' average bits reaching `target` whole-model bpw; None when none does. Without mixed precision: the
    setting of most bits within BPW_TOL of the target (one grid). With it: for the first head setting (in `heads`'
    order) that leaves the decoder at least the 4-bit g128 grid, the richest grid that fits as low and the next
    richer grid (int8 per channel above the 6-bit table) as high."""
    grids = tiers(levels)
    heads = [h for h in heads if outside.get(h) is not None]  # (None: a setting this model cannot take)
    if not mixed:
        near = [((outside[h] + tier_bits(s) * n_dec) / n_params, tier_bits(s), h, s) for h in heads for s in grids]
        near = [x for x in near if abs(x[0] - target) <= BPW_TOL - 0.01]
        if not near:
            return None
        _, b, h, s = max(near, key=lambda x: x[:2])
        return {"head": h, "low": s.label(), "group": s.group, "decoder_bits": b, "spec": s}
    g32 = next(i for i, s in enumerate(grids) if s.bits == 4 and s.group == 32)
    for worst in (g32, len(grids) - 1):  # a head that leaves the 4-bit g32 grid, else any that leaves a grid
        for head in heads:
            t = (target * n_params - outside[head]) / n_dec
            fits = [i for i, s in enumerate(grids[: worst + 1]) if tier_bits(s) <= t + 0.005]
            if fits:
                low = grids[fits[0]]
                high = grids[fits[0] - 1] if fits[0] > 0 else QSpec(8, 0, True)
                return {"head": head, "low": low.label(), "high": high.label(), "group": low.group, "decoder_bits": t,
                        "spec": low, "high_spec": high}  # fmt: skip
    return None


def leanlm_config(p: dict, sens):
    low = p["spec"]
    mixed = None
    if p["decoder_bits"] - tier_bits(low) > 0.02:  # spend the rest on the most sensitive Linears
        mixed = MixedPrecision(target_bits=round(p["decoder_bits"], 4), high=p["high_spec"], probe=PROBE,
                               sensitivity=sens())  # fmt: skip
    return GPTQ(bits=low.bits, group=low.group, symmetric=True, levels=low.levels, act_order=True, mixed=mixed,
                **HEADS[p["head"]])  # fmt: skip


def targets(gguf_bpw: list[float]) -> list[float]:
    """One leanlm point per cluster of llama.cpp bpw values spanning <= 2 x BPW_TOL (its middle)."""
    out, group = [], []
    for b in sorted(gguf_bpw):
        if group and b - group[0] > 2 * BPW_TOL - 0.01:
            out.append((group[0] + group[-1]) / 2)
            group = []
        group.append(b)
    if group:
        out.append((group[0] + group[-1]) / 2)
    return out


def book_windows(tok, name: str, seq_len: int, n: int) -> list[torch.Tensor]:
    text = read_text(name)
    return make_windows(tok, text[len(text) // 3 :], seq_len, n)


def log_row(name: str, rec: dict) -> None:
    log(f"  {name}: bpw {rec['bpw']:.3f}  wikitext2 ppl {delta(rec['wikitext2']):+.2f}% KL "
        f"{rec['wikitext2']['kl']:.4f}  book ppl {delta(rec['book']):+.2f}% KL {rec['book']['kl']:.4f}")  # fmt: skip


def llamacpp_rows(args, directory, calib, tok, refs, n_params, source, rows: dict, save) -> None:
    from llamacpp_tools import build_ggufs, compute_imatrix, gguf_tensors, quantize_gguf

    f16 = build_ggufs(directory, args.model, ("f16",), args.threads, log=log)["f16"]
    imatrix = f16.with_name(f16.name.replace("-f16.gguf", f"-imatrix-wt2valid-{len(calib)}x{calib.shape[1]}.gguf"))
    if not imatrix.exists():
        text = f16.with_name(imatrix.stem + ".txt")
        text.write_text("\n\n".join(tok.decode(w, skip_special_tokens=True) for w in calib), encoding="utf-8")
        log(f"llama-imatrix: {len(calib)} chunks of {calib.shape[1]} tokens (the GPTQ calibration windows)")
        compute_imatrix(f16, text, imatrix, calib.shape[1], len(calib), args.threads)
    for t in args.gguf_types:
        name = f"llama.cpp-{t}-imatrix"
        if name in rows:
            continue
        path = f16.with_name(f"{imatrix.stem.replace('-imatrix-', f'-{t}-imatrix-')}.gguf")
        if not path.exists():
            log(f"llama-quantize --imatrix F16 -> {t.upper()}")
            quantize_gguf(f16, path, t, args.threads, imatrix=imatrix)
        tensors = gguf_tensors(path)
        types = sorted({v["type"] for v in tensors.values()})
        bits = sum(v["bytes"] for v in tensors.values()) * 8
        rec = {"engine": "llama.cpp", "type": t.upper(), "imatrix": imatrix.name, "gguf": path.name, "types": types,
               "bpw": round(bits / n_params, 3),
               "matches_source_grid": bool(source) and any(x.lower() == source for x in types)}  # fmt: skip
        log(f"llama.cpp {t} (imatrix): scoring ({', '.join(types)})")
        rec.update(gguf_scores(path, refs(), args.threads))
        rows[name] = rec
        log_row(name, rec)
        save()


def pair_ratios(rows: dict) -> None:
    """Each leanlm row's ratios to the best llama.cpp row within BPW_TOL (all rows, and unmarked rows)."""
    peers = {n: r for n, r in rows.items() if r["engine"] == "llama.cpp"}
    for rec in rows.values():
        if rec["engine"] != "leanlm":
            continue
        near = {n: r for n, r in peers.items() if abs(r["bpw"] - rec["bpw"]) <= BPW_TOL + 1e-9}
        rec["llamacpp_within_bpw_tol"] = sorted(near)
        # _unmarked: neither side on the source's grid (a leanlm row that uses it has no unmarked ratio)
        unmarked = {} if rec.get("matches_source_grid") else {n: r for n, r in near.items() if not r["matches_source_grid"]}
        for suffix, pool in (("", near), ("_unmarked", unmarked)):
            for text in TEXTS:
                r = rec[text]
                if not pool:
                    r[f"kl_ratio_vs_llamacpp_best{suffix}"] = r[f"ppl_delta_ratio_vs_llamacpp_best{suffix}"] = None
                    continue
                best_kl = min(pool.values(), key=lambda p: p[text]["kl"])
                best_d = min(delta(p[text]) for p in pool.values())
                r[f"kl_ratio_vs_llamacpp_best{suffix}"] = r["kl"] / best_kl[text]["kl"]
                r[f"ppl_delta_ratio_vs_llamacpp_best{suffix}"] = delta(r) / best_d if best_d > 0 else None


def summarize(models: dict) -> dict:
    summary = {}
    for model, block in models.items():
        s = summary[model] = {}
        lean = {n: r for n, r in block["rows"].items() if r["engine"] == "leanlm"}
        for text in TEXTS:
            t = s[text] = {}
            for key in ("kl_ratio_vs_llamacpp_best", "ppl_delta_ratio_vs_llamacpp_best",
                        "kl_ratio_vs_llamacpp_best_unmarked", "ppl_delta_ratio_vs_llamacpp_best_unmarked"):  # fmt: skip
                vals = {n: r[text].get(key) for n, r in lean.items() if r[text].get(key) is not None}
                t[key] = max(vals.values()) if vals else None
                t[key + "_by_row"] = vals
        point = block["rows"].get(f"leanlm@{INT4_POINT}")
        if point is not None:
            s[f"int4_ppl_delta_pct_at_{INT4_POINT}bpw"] = delta(point["wikitext2"])
            s[f"int4_book_ppl_delta_pct_at_{INT4_POINT}bpw"] = delta(point["book"])
            s[f"int4_bpw_at_{INT4_POINT}bpw"] = point["bpw"]
            s["quantize_minutes"] = point["quantize_s_with_sensitivity"] / 60
            s["quantize_cpu_minutes"] = point["quantize_cpu_s"] / 60
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--windows", type=int, default=10, help="windows of --seq-len per text")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--book", default="pride-and-prejudice")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (WikiText-2 validation)")
    ap.add_argument("--mixed", action="store_true", help="reach every llama.cpp bpw with mixed precision (measures "
                                                         "each Linear's sensitivity once); default: leanlm rows only "
                                                         "where a head / group setting lands within 0.1 bpw")
    ap.add_argument("--sens-tokens", type=int, default=128, help="tokens (one window) of the sensitivity measurement")
    ap.add_argument("--levels", default="iq4nl", choices=("iq4nl", "learned"), help="leanlm's 4-bit table")
    ap.add_argument("--gguf-types", nargs="*", default=list(GGUF_TYPES))
    ap.add_argument("--no-llamacpp", action="store_true", help="leanlm's int4 point only (partial)")
    ap.add_argument("--resume", type=Path, nargs="+", help="results of interrupted (or --targets) runs with the "
                                                           "same settings: their rows are kept, not measured again")
    ap.add_argument("--targets", type=float, nargs="+", help="measure leanlm at these bpw points only (no llama.cpp "
                                                              "rows; partial: a feeder for --resume)")  # fmt: skip
    ap.add_argument("--heads", nargs="+", choices=tuple(HEADS), help="the LM head / embedding settings the plan tries, in "
                                                                  "this order (default: HEAD_ORDER, TIED_HEAD_ORDER for a tied "
                                                                  "embedding)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "targets", "archive", "machine_shared")}
    if args.heads is None:  # (the default order: runs before the option existed have the same settings)
        settings.pop("heads")
    rows, resumed = {}, []
    for path in args.resume or []:
        old = json.loads(path.read_text())
        block = old.get("models", {}).get(args.model) or {}
        theirs = block.get("settings") or {}
        shared = {k: v for k, v in settings.items() if k not in LEANLM_ONLY}
        if {k: v for k, v in theirs.items() if k not in LEANLM_ONLY} != shared:
            raise LeanlmError(f"--resume {path}: its settings {theirs} differ from this run's {settings} beyond "
                              f"leanlm's own ({', '.join(LEANLM_ONLY)}); resume only a run of the same texts, "
                              "calibration and llama.cpp types")  # fmt: skip
        same = theirs == settings  # else only its llama.cpp rows carry over (leanlm's rows depend on the rest)
        kept = {n: r for n, r in block["rows"].items() if n not in rows and (same or r["engine"] == "llama.cpp")}
        rows.update(kept)
        resumed.append({"file": str(path), "rows": sorted(kept), "provenance": old.get("provenance")})
        log(f"resuming: {len(kept)} rows from {path}")

    directory = resolve(args.model)
    base, tok = load_model(directory, "float32"), load_tokenizer(directory)
    n_params = sum(p.numel() for p in base.parameters())
    tied = base.lm_head is None
    base.set_decode_layout(False)
    names = quantizable(base)
    n_dec = sum(base.get_submodule(n).weight.numel() for n in names)
    log(f"{args.model}: {n_params / 1e6:.1f} M parameters, {n_dec / 1e6:.1f} M in decoder Linears")
    del base
    gc.collect()
    cache: dict = {}

    def refs() -> dict:
        """The reference log-probs, computed when a row is first measured (a resumed run may measure none)."""
        if "refs" not in cache:
            log("reference windows (float32)")
            m = load_model(directory, "float32")
            cache["refs"] = {"wikitext2": QualityRef(m, make_windows(tok, wikitext2_test(), args.seq_len, args.windows)),
                             "book": QualityRef(m, book_windows(tok, args.book, args.seq_len, args.windows))}  # fmt: skip
        return cache["refs"]

    def outside() -> dict:
        if "outside" not in cache:
            cache["outside"] = block["outside_decoder_bits"] = {h: outside_decoder_bits(directory, HEADS[h]) for h in HEADS}
        return cache["outside"]
    calib = read_calibration("wikitext2-valid", tok, args.samples, args.seq_len)
    measured: dict = {}

    def sens() -> dict:
        """Each Linear's sensitivity, measured on the first call (on a fresh fp32 copy) and reused."""
        if "kl" not in measured:
            t0 = time.perf_counter()
            m = load_model(directory, "float32")
            m.set_decode_layout(False)
            measured["kl"] = layer_sensitivity(m, calib[:1, : args.sens_tokens], names, PROBE, progress=False)
            block["sensitivity_s"] = measured["s"] = time.perf_counter() - t0
            log(f"sensitivity of {len(names)} Linears: {measured['s']:.0f} s")
        return measured["kl"]

    partial = args.no_llamacpp or bool(args.targets) or set(args.gguf_types) != set(GGUF_TYPES)
    source = SOURCE_GRID.get(args.model)
    block = {"settings": settings, "n_params": n_params, "n_decoder_linear_params": n_dec,
             "reference": "leanlm float32", "source_grid": source, "calibration": "wikitext2-valid",
             "book": args.book,
             "rows": rows, "resumed": resumed}  # fmt: skip
    canonical = RESULTS / f"{NAME}.json"
    # one run per model: each model's block keeps the provenance of the run that measured it (the file's top-level
    # stamp is the latest run's); a block written before blocks carried one takes the file's stamp, its run's
    existing = json.loads(canonical.read_text()) if canonical.exists() else {}
    models = existing.get("models", {})
    for other in models.values():
        other.setdefault("provenance", existing.get("provenance"))
    block["provenance"] = {**stamp(bench_command(), code=_START or None), "machine_shared": args.machine_shared}

    def save(final: bool = False) -> None:
        pair_ratios(rows)
        models[args.model] = block
        result = {"machine": machine(), "models": models, "summary": summarize(models)}
        write_result(NAME, result, partial=partial, archive=args.archive, checkpoint=not final,
                     machine_shared=args.machine_shared)  # fmt: skip

    def leanlm_row(target: float, name: str, mixed: bool) -> None:
        if name in rows:
            return
        order = args.heads or (TIED_HEAD_ORDER if tied else HEAD_ORDER)
        p = plan(target, outside(), n_dec, n_params, mixed, args.levels, tuple(order))
        if p is None:
            why = f"no head / group reaches {target:.3f} +- {BPW_TOL} bpw" + ("" if mixed else " without --mixed")
            log(f"leanlm {name}: {why}; skipped")
            block.setdefault("skipped", {})[name] = why
            return
        cfg = leanlm_config(p, sens)
        p = {k: v for k, v in p.items() if not k.endswith("spec")}  # (the labels stay in the record)
        log(f"leanlm {name}: head {p['head']}, decoder {p['low']}, decoder bits {p['decoder_bits']:.3f}"
            f"{' (mixed, up to ' + p['high'] + ')' if cfg.mixed else ''}: quantizing")  # fmt: skip
        t1, c1 = time.perf_counter(), time.process_time()
        model = quantize(load_model(directory, "float32"), cfg, calib, progress=False)
        seconds, cpu = time.perf_counter() - t1, time.process_time() - c1
        config = cfg.to_dict()
        if config["mixed"]:
            config["mixed"]["sensitivity"] = "measured once per model (see sensitivity_s)"
        rec = {"engine": "leanlm", "target_bpw": round(target, 3), "plan": p, "config": config,
               "bpw": round(weight_bytes(model) * 8 / n_params, 3),
               "bpw_decoder_linears": round(model.quantization["bits_per_weight"], 3),
               "promoted_linears": len((model.quantization["report"].get("mixed") or {}).get("high", [])),
               "matches_source_grid": source in leanlm_grids(model),
               "quantize_s": round(seconds, 1), "quantize_cpu_s": round(cpu, 1),
               "quantize_s_with_sensitivity": round(seconds + (measured.get("s", 0.0) if cfg.mixed else 0.0), 1)}  # fmt: skip
        CodebookLinear.kernel_all_rows = True  # score table grids with the decode kernel's numerics (not while
        try:  # quantizing: GPTQ's calibration forwards would run 16 rows per kernel call)
            for text, ref in refs().items():
                rec[text] = ref(model)
        finally:
            CodebookLinear.kernel_all_rows = False
        rows[name] = rec
        log_row(name, rec)
        del model
        gc.collect()
        save()

    # the int4 point: the plain recipe a user runs (one grid, no sensitivity pass, also under --mixed), with the most
    # bits that stay <= 4.6 (a head / group setting within [4.42, 4.6])
    if args.targets:
        for t in args.targets:
            leanlm_row(t, f"leanlm@{t:.2f}", args.mixed)
        save(final=True)
        return
    leanlm_row(INT4_POINT - BPW_TOL + 0.01, f"leanlm@{INT4_POINT}", mixed=False)
    if not args.no_llamacpp:
        llamacpp_rows(args, directory, calib, tok, refs, n_params, source, rows, save)
        gguf = [r["bpw"] for r in rows.values() if r["engine"] == "llama.cpp"]
        for t in targets(gguf):
            leanlm_row(t, f"leanlm@{t:.2f}", args.mixed)
    save(final=True)
    print_table(args.model, block)


def print_table(model: str, block: dict) -> None:
    s = block["settings"]
    print(f"\n{model}: ppl delta / KL vs leanlm fp32 ({s['windows']} x {s['seq_len']} tokens per text)")
    print(f"{'row':28} {'bpw':>6} {'wikitext2 ppl / KL':>22} {'book ppl / KL':>22}  note")
    for name, rec in sorted(block["rows"].items(), key=lambda kv: kv[1]["bpw"]):
        note = "types " + ",".join(rec["types"]) if "types" in rec else ""
        if rec.get("matches_source_grid"):
            note += f"  [includes the source's own grid {block['source_grid'].upper()}]"
        if rec["engine"] == "leanlm":
            note = "KL ratio vs llama.cpp best " + ", ".join(
                f"{t} {rec[t]['kl_ratio_vs_llamacpp_best']:.2f}" for t in TEXTS
                if rec[t].get("kl_ratio_vs_llamacpp_best") is not None) or "no llama.cpp row within 0.1 bpw"
        cells = [f"{delta(rec[t]):+.2f}% / {rec[t]['kl']:.4f}" for t in TEXTS]
        print(f"{name:28} {rec['bpw']:6.3f} {cells[0]:>22} {cells[1]:>22}  {note}")


if __name__ == "__main__":
    main()
