"""Pruning, measured honestly: quality, size on disk, resident weights and decode speed, one run.

For each configuration the base model is copied and pruned, then measured against the base in
the same process: WikiText-2 perplexity and KL(base || pruned) on --windows x 512 windows
(leanlm.evaluate.kl_divergence's arithmetic, base log-probs computed once), size on disk of the saved model (dense: zeros stored,
transformers-loadable; bitmask: leanlm's compressed layout), resident weight MB in the runtime
(dense, CSR, bitmask) and batch-1 decode tok/s, all engines interleaved in one loop
(benchmarks/common.interleaved_speed) so machine noise hits them alike.

Unstructured / N:M: magnitude, Wanda, SparseGPT at 50%, 70%, 2:4, 4:8 (+ Wanda OWL 70%,
Wanda 90% for the sparse-kernel row). Structured: FFN neurons 25% (three importance scores),
heads (one KV group of three), 4 layers removed (block influence); healing by distillation.

    LEANLM_DATA=../shared/data python benchmarks/bench_prune.py                    # SmolLM2-135M
    LEANLM_DATA=../shared/data python benchmarks/bench_prune.py --model gemma3-270m --structured-only --remove 3
Writes benchmarks/results/prune.json (one entry per model; other models' entries are kept).
Pruned models and a resumable cache live in --work-dir (default /tmp/leanlm_bench_prune).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import time
from pathlib import Path

import torch
from common import (LeanlmEngine, QualityRef, add_result_args, interleaved_speed, machine, print_table,
                    write_result)  # fmt: skip

import leanlm
from leanlm.evaluate.data import wikitext2_test
from leanlm.evaluate.perplexity import make_windows, perplexity
from leanlm.evaluate.speed import disk_bytes, fixed_prompt, weight_bytes
from leanlm.export import check_transformers_load
from leanlm.prune import (
    Structured,
    Unstructured,
    calibration_tokens,
    heal,
    prune_structured,
    prune_unstructured,
    save_compressed,  # fmt: skip
    sparsify_model,
)

MB = 2**20


def unstructured_configs(full: bool) -> list[tuple[str, Unstructured]]:
    out = []
    for method in ("magnitude", "wanda", "sparsegpt"):
        out += [(f"{method}-50%", Unstructured(method, 0.5)), (f"{method}-2:4", Unstructured(method, pattern="2:4"))]
        if full:
            out += [(f"{method}-4:8", Unstructured(method, pattern="4:8")), (f"{method}-70%", Unstructured(method, 0.7))]
    if full:
        out += [("wanda-owl-70%", Unstructured("wanda", 0.7, allocation="owl")), ("wanda-90%", Unstructured("wanda", 0.9))]
    return out


def structured_configs(model, remove: int, heads: bool) -> list[tuple[str, Structured]]:
    out = [(f"neurons-25%-{imp}", Structured("neurons", 0.25, importance=imp)) for imp in ("activation", "wanda", "magnitude")]
    attn = model.layers[0].attn
    if heads:
        if attn.n_kv_heads > 1:
            out.append((f"heads-kv-1of{attn.n_kv_heads}", Structured("heads", 1 / attn.n_kv_heads, head_mode="kv")))
        else:
            group = attn.n_heads // attn.n_kv_heads
            out.append((f"heads-q-1of{group}", Structured("heads", 1 / group, head_mode="q")))
    out.append((f"layers-remove-{remove}", Structured("layers", remove=remove)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=40, help="512-token WikiText-2 windows for ppl / KL (default 40)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--heal-steps", type=int, default=40)
    ap.add_argument("--heal-lr", type=float, default=1e-4)
    ap.add_argument("--heal-batch", type=int, default=2)
    ap.add_argument("--heal-seq-len", type=int, default=256)
    ap.add_argument("--heal-layers", action="store_true", help="also heal the layer-pruned model")
    ap.add_argument("--remove", type=int, default=4, help="layers removed in the layer-pruning row")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="only 50%% and 2:4 unstructured rows")
    ap.add_argument("--structured-only", action="store_true")
    ap.add_argument("--no-heads", action="store_true")
    ap.add_argument("--work-dir", default="/tmp/leanlm_bench_prune")
    ap.add_argument("--fresh", action="store_true", help="ignore the cache in --work-dir")
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(args.work_dir) / Path(args.model).name  # a name, never an absolute path
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / "cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    # rows reused from an earlier run's cache may come from other code: only a --fresh, full run is canonical
    reused_rows = sorted(cache)
    partial = bool(args.quick or args.structured_only or args.no_heads or reused_rows)

    def keep(name, row):
        cache[name] = row
        cache_path.write_text(json.dumps(cache, indent=2, default=str))

    base, tok = leanlm.load(args.model, "float32")
    text = wikitext2_test()
    calib = calibration_tokens(tok, "wikitext2-valid", args.calib_samples, args.calib_seq_len)
    heal_tokens = calibration_tokens(tok, "wikitext2-valid", max(64, args.heal_steps * args.heal_batch),
                                     args.heal_seq_len, seed=1)  # fmt: skip
    base_disk = disk_bytes(base.directory + "/model.safetensors") / MB

    # The base model's log-probabilities are computed once and reused for every configuration
    # (the same windows and arithmetic as leanlm.evaluate.kl_divergence, which the base row checks).
    quality = QualityRef(base, make_windows(tok, text, 512, args.windows))

    if "base" not in cache:
        q = perplexity(base, tok, text, 512, args.windows)
        assert abs(q["ppl"] - quality(base)["ppl"]) < 1e-3 * q["ppl"]  # the cached path is the harness's arithmetic
        keep("base", {"name": "base", "kind": "base", "ppl": q["ppl"], "kl": 0.0, "top1_agreement": 1.0,
                      "disk_mb": base_disk, "weight_mb": weight_bytes(base) / MB,
                      "params": sum(p.numel() for p in base.parameters())})  # fmt: skip

    # ---- unstructured / N:M ---------------------------------------------------------------
    if not args.structured_only:
        for name, cfg in unstructured_configs(not args.quick):
            if name in cache:
                continue
            print(f"== {name}", flush=True)
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            rep = prune_unstructured(model, cfg, calib)
            t_prune = time.perf_counter() - t0
            row = {"name": name, "kind": "unstructured", "method": cfg.method, "pattern": cfg.pattern or "unstructured",
                   "allocation": cfg.allocation, "target_sparsity": cfg.sparsity, "prune_s": t_prune,
                   "sparsity_prunable": rep["sparsity_prunable"], "sparsity_all_params": rep["sparsity_all_params"],
                   **quality(model)}  # fmt: skip
            d_dense = leanlm.save(model, tok, work / name / "dense", force=True)
            d_bits = save_compressed(model, tok, work / name / "bitmask", force=True)
            row["disk_mb"] = disk_bytes(d_dense / "model.safetensors") / MB
            row["disk_mb_bitmask"] = disk_bytes(d_bits / "model.safetensors") / MB
            row["weight_mb"] = weight_bytes(model) / MB
            for fmt in ("csr", "bitmask"):
                m2 = copy.deepcopy(model)
                sparsify_model(m2, fmt)
                row[f"weight_mb_{fmt}"] = weight_bytes(m2) / MB
                del m2
            keep(name, row)
            del model
            gc.collect()

    # ---- structured ------------------------------------------------------------------------
    heads = not args.no_heads
    for name, cfg in structured_configs(base, args.remove, heads):
        if name in cache:
            continue
        print(f"== {name}", flush=True)
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        rep = prune_structured(model, cfg, calib)
        row = {"name": name, "kind": "structured", "method": cfg.kind, "importance": cfg.importance,
               "pattern": "structured", "prune_s": time.perf_counter() - t0, "params": rep["params_after"],
               "params_removed_frac": 1 - rep["params_after"] / rep["params_before"],
               "removed_layers": rep["removed"] if cfg.kind == "layers" else None, **quality(model)}  # fmt: skip
        if cfg.kind == "layers":
            row["block_influence"] = rep["block_influence"]
        d = leanlm.save(model, tok, work / name / "dense", force=True)
        row["disk_mb"] = disk_bytes(d / "model.safetensors") / MB
        row["weight_mb"] = weight_bytes(model) / MB
        load = check_transformers_load(d, model)  # an actual transformers load of the saved directory
        row["transformers_loadable"], row["transformers_load_error"] = load.loadable, load.error
        keep(name, row)
        del model
        gc.collect()

    heal_targets = [n for n, c in structured_configs(base, args.remove, heads)
                    if (c.kind == "neurons" and c.importance == "activation") or (c.kind == "layers" and args.heal_layers)]  # fmt: skip
    for name in heal_targets:
        hname = f"{name}+heal{args.heal_steps}"
        if hname in cache or not args.heal_steps:
            continue
        print(f"== {hname}", flush=True)
        model = leanlm.load(work / name / "dense", "float32")[0]
        h = heal(model, base, heal_tokens, args.heal_steps, args.heal_lr, args.heal_batch)
        row = {**cache[name], "name": hname, "heal": {k: h[k] for k in ("steps", "lr", "batch_size", "seq_len",
               "seconds", "first_loss", "last_loss")}, **quality(model)}  # fmt: skip
        leanlm.save(model, tok, work / hname / "dense", force=True)
        keep(hname, row)
        del model
        gc.collect()

    # ---- speed: every engine in one interleaved loop ---------------------------------------
    engines = [LeanlmEngine(base, "base")]
    speed_rows = {"base": "base"}

    def add(row_name, dirname, fmt=None):
        if not (work / dirname / "dense").exists():
            return
        m = leanlm.load(work / dirname / "dense", "float32")[0]
        if fmt:
            sparsify_model(m, fmt)
        label = f"{row_name} [{fmt or 'dense'}]"
        engines.append(LeanlmEngine(m, label))
        speed_rows[label] = row_name

    if not args.structured_only:
        add("wanda-50%", "wanda-50%")
        for s in ("50%", "70%", "90%"):
            add(f"wanda-{s}", f"wanda-{s}", "csr")
        add("wanda-2:4", "wanda-2:4", "csr")
        add("wanda-50%", "wanda-50%", "bitmask")
    for name, _ in structured_configs(base, args.remove, heads):
        if not name.startswith("neurons") or name.endswith("activation"):
            add(name, name)
    vocab = base.config.vocab_size
    speed = interleaved_speed(engines, fixed_prompt(vocab, args.prompt_len), fixed_prompt(vocab, 32, seed=1),
                              args.new_tokens, args.runs)  # fmt: skip
    base_dec, base_pre = speed["base"]["decode_tok_s"], speed["base"]["prefill_tok_s"]
    for label, s in speed.items():
        s["decode_speedup"] = s["decode_tok_s"] / base_dec
        s["prefill_speedup"] = s["prefill_tok_s"] / base_pre
        row = cache.get(speed_rows[label])
        if row is not None:
            fmt = label.split("[")[-1].rstrip("]") if "[" in label else "dense"
            row.setdefault("speed", {})[fmt] = {k: s[k] for k in ("decode_tok_s", "decode_speedup", "prefill_tok_s",
                                                                  "prefill_speedup", "decode_tok_s_runs")}  # fmt: skip
            # a healed model has the shape (so the speed) of its unhealed parent
            for other in cache.values():
                if other.get("name", "").startswith(speed_rows[label] + "+heal"):
                    other["speed"] = row["speed"]

    rows = list(cache.values())
    table = []
    for r in rows:
        sp = r.get("speed", {})
        table.append({"config": r["name"], "pattern": r.get("pattern", ""), "sparsity": r.get("sparsity_prunable"),
                      "ppl": r["ppl"], "kl": r["kl"], "disk_MB": r.get("disk_mb"), "disk_MB_bitmask": r.get("disk_mb_bitmask"),
                      "weight_MB": r.get("weight_mb"), "weight_MB_csr": r.get("weight_mb_csr"),
                      "decode_tok_s": (sp.get("dense") or {}).get("decode_tok_s"),
                      "decode_x": (sp.get("dense") or {}).get("decode_speedup"),
                      "csr_decode_x": (sp.get("csr") or {}).get("decode_speedup"),
                      "bitmask_decode_x": (sp.get("bitmask") or {}).get("decode_speedup")})  # fmt: skip
    cols = ["config", "sparsity", "ppl", "kl", "disk_MB", "disk_MB_bitmask", "weight_MB", "weight_MB_csr",
            "decode_tok_s", "decode_x", "csr_decode_x", "bitmask_decode_x"]  # fmt: skip
    print_table(table, cols)

    def ppl(name):
        return cache[name]["ppl"] if name in cache else None

    checks = {}
    for pat in ("50%", "2:4"):
        mag = ppl(f"magnitude-{pat}")
        for m in ("wanda", "sparsegpt"):
            if mag is not None and ppl(f"{m}-{pat}") is not None:
                checks[f"{m}_{pat}_ppl_below_magnitude"] = ppl(f"{m}-{pat}") < mag
    n25 = cache.get("neurons-25%-activation", {}).get("speed", {}).get("dense")
    if n25:
        checks["neurons_25_decode_speedup"] = n25["decode_speedup"]
        checks["neurons_25_decode_speedup_ge_1.15"] = n25["decode_speedup"] >= 1.15
    lay = cache.get(f"layers-remove-{args.remove}", {}).get("speed", {}).get("dense")
    if lay:
        checks[f"layers_remove_{args.remove}_decode_speedup"] = lay["decode_speedup"]

    entry = {"model": args.model, "machine": machine(), "settings": vars(args), "rows_from_cache": reused_rows,
             "calibration": {"text": "wikitext2-valid", "samples": args.calib_samples, "seq_len": args.calib_seq_len},
             "rows": rows, "table": table, "speed": speed, "checks": checks}  # fmt: skip
    write_result(f"prune_{args.model}", entry, partial=partial, archive=args.archive,
                 machine_shared=args.machine_shared)
    print(json.dumps(checks, indent=2))


if __name__ == "__main__":
    main()
