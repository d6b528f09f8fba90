"""Weight quantization: quality and cost of RTN / GPTQ / AWQ at int8 / int4, same run, same process.

For each model: quantize fresh float32 copies with each configuration (wall and CPU time),
then over the same WikiText-2 test windows (40 x 512; DESIGN.md conventions) compute, window
by window, the float32 base logits once and every candidate's logits: perplexity, mean per-token
KL(base || candidate) and top-1 agreement, with the definitions of
leanlm.evaluate.perplexity.kl_divergence (the base perplexity is cross-checked against
leanlm.evaluate.perplexity.perplexity). Speed: prefill tok/s at 512 tokens and batch-1 decode
tok/s over 128 new tokens, all engines interleaved run by run (benchmarks/common.py), medians.
Memory: weight MB (parameters + buffers: packed sizes), size on disk of the saved directory, and
peak RSS of a fresh process that loads the saved model and generates 32 tokens. When
llama-cpp-python is installed, llama.cpp runs Q8_0 and Q4_0 GGUFs exported from the same base
weights (leanlm.export) in the same interleaved speed runs.
Calibration: --calib (default wikitext2-valid, never the test split). The "-tuned" rows then train
every group's scale and zero (codes frozen) by KL distillation to the base model (quant/tune.py)
on --tune-samples other windows of the same text; "-tuned-codes" rows learn each weight's rounding
too. "-recon" rows train each block's grids and rounding, right after quantizing it, to reproduce the
unquantized block's outputs on the calibration windows (quant/reconstruct.py; give them --samples 64);
"-recon-tuned" then also runs the grid tuning. Their quantize time includes the training.

    LEANLM_DATA=../shared/data python benchmarks/bench_quant.py                      # both models
    LEANLM_DATA=../shared/data python benchmarks/bench_quant.py --models gemma3-270m --windows 40
    python benchmarks/bench_quant.py --kernels-only                                  # kernel timings
Writes benchmarks/results/quant.json (one entry per model; re-runs replace that model's entry).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (LeanlmEngine, LlamaCppEngine, add_result_args, interleaved_speed, machine, median, peak_rss_mb,
                    print_table, window_scores, write_result)  # fmt: skip
from tqdm.auto import tqdm

from leanlm import load
from leanlm.evaluate.data import wikitext2_test
from leanlm.evaluate.perplexity import make_windows, perplexity
from leanlm.evaluate.speed import disk_bytes, fixed_prompt, weight_bytes
from leanlm.quant import AWQ, GPTQ, RTN, MixedPrecision, quantize, read_calibration, save_quantized

# rows that train on top of AWQ + GPTQ (the same for every model)
TRAINED = {
    "int4-g128-awq-gptq": lambda: AWQ(bits=4, group=128, gptq=True),
    "int4-g128-awq-gptq-tuned": lambda: AWQ(bits=4, group=128, gptq=True, tune_steps=TUNE_STEPS),
    "int4-g128-awq-gptq-tuned-codes": lambda: AWQ(bits=4, group=128, gptq=True, tune_steps=TUNE_STEPS, tune_codes=True),
    "int4-g128-awq-gptq-recon": lambda: AWQ(bits=4, group=128, gptq=True, recon_steps=RECON_STEPS),
    "int4-g128-awq-gptq-recon-ch": lambda: AWQ(bits=4, group=128, gptq=True, recon_steps=RECON_STEPS,
                                               recon_loss="channel"),  # fmt: skip
    "int4-g128-awq-gptq-recon-tuned": lambda: AWQ(bits=4, group=128, gptq=True, recon_steps=RECON_STEPS,
                                                  tune_steps=TUNE_STEPS),  # fmt: skip
}
# name -> config; the int4 g128 rows are the general result, g32 asym reproduces SmolLM2's Q4_1 source
CONFIGS = {
    "smollm2-135m": {
        "int8-rtn": lambda: RTN(bits=8, group=0, symmetric=True),
        "int4-g128-rtn": lambda: RTN(bits=4, group=128),
        "int4-g128-gptq": lambda: GPTQ(bits=4, group=128),
        "int4-g128-gptq-actorder": lambda: GPTQ(bits=4, group=128, act_order=True),
        "int4-g128-awq": lambda: AWQ(bits=4, group=128),
        "int4-g128-gptq-clip": lambda: GPTQ(bits=4, group=128, act_order=True, clip=True),
        **TRAINED,
        "int4-g32-rtn": lambda: RTN(bits=4, group=32),
        "mixed-5bit-gptq": lambda: GPTQ(bits=4, group=128, mixed=MixedPrecision(target_bits=5.0)),
    },
    "gemma3-270m": {
        "int8-rtn": lambda: RTN(bits=8, group=0, symmetric=True),
        "int4-g128-rtn": lambda: RTN(bits=4, group=128),
        "int4-g128-gptq": lambda: GPTQ(bits=4, group=128),
        "int4-g128-awq": lambda: AWQ(bits=4, group=128),
        "int4-g128-gptq-clip": lambda: GPTQ(bits=4, group=128, act_order=True, clip=True),
        **TRAINED,
    },
}
# the rows a default run measures (the standard int8 / int4-g128 rows; --all adds every row above)
STANDARD = ("int8-rtn", "int4-g128-rtn", "int4-g128-gptq", "int4-g128-awq", "int4-g128-awq-gptq")
DEFAULT_MODELS = "smollm2-135m,gemma3-270m"
TUNE_STEPS = 300  # "-tuned" rows: grid tuning steps (quant/tune.py), --tune-steps overrides
RECON_STEPS = 100  # "-recon" rows: block reconstruction steps per block (quant/reconstruct.py), --recon-steps overrides


@torch.inference_mode()
def quality(base, models: dict, tok, text: str, seq_len: int, windows: int) -> dict:
    """Per candidate: ppl, KL(base || candidate), top-1 agreement; the base logits computed once per window."""
    acc = {n: {"kl": 0.0, "agree": 0.0, "nll": 0.0} for n in models}
    nll_base, count = 0.0, 0
    wins = make_windows(tok, text, seq_len, windows)
    for w in tqdm(wins, desc="quality"):
        lb = F.log_softmax(base(w)[0, :-1].float(), -1)
        target = w[0, 1:]
        nll_base -= lb.gather(-1, target[:, None]).sum().item()
        for name, m in models.items():  # window by window: one window's log-probs held at a time
            k, agree, nll = window_scores(lb, F.log_softmax(m(w)[0, :-1].float(), -1), target)
            a = acc[name]
            a["kl"], a["agree"], a["nll"] = a["kl"] + k, a["agree"] + agree, a["nll"] + nll
        count += target.numel()
    out = {"base": {"ppl": math.exp(nll_base / count), "tokens": count, "windows": len(wins), "seq_len": seq_len}}
    for name, a in acc.items():
        out[name] = {"ppl": math.exp(a["nll"] / count), "kl": a["kl"] / count, "top1_agreement": a["agree"] / count}
    return out


def kernel_timings(threads: int, reps: int = 7) -> dict:
    """Per weight shape: one-row (decode) and 512-row (prefill) times of each path, interleaved."""
    from leanlm.quant import QSpec, QuantLinear, rtn

    def clock(fn, n):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e6

    out = {}
    for N, K in [(960, 576), (3072, 576), (576, 1536), (49152, 576)]:
        w = torch.randn(N, K) * 0.02
        mods = {"int8-pc": QuantLinear(rtn(w, QSpec(8, 0, True))), "int4-g128": QuantLinear(rtn(w, QSpec(4, 128, False))),
                "int4-g32": QuantLinear(rtn(w, QSpec(4, 32, False)))}  # fmt: skip
        wb = w.bfloat16()
        for rows in (1, 512) if N < 10000 else (1,):
            x = torch.randn(rows, K)
            xb = x.bfloat16()
            fns = {"fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(xb, wb)}
            if rows > 1:
                fns["bf16"] = lambda: F.linear(xb.float(), wb.float())  # what runtime.Linear does for many rows
            for name, m in mods.items():
                fns[name] = (lambda m=m: m(xb))
            n = max(2, int(3e6 / (N * K * rows**0.5)))
            for f in fns.values():
                f()
            res = {k: [] for k in fns}
            for _ in range(reps):
                for k, f in fns.items():
                    res[k].append(clock(f, n))
            out[f"{N}x{K} rows={rows}"] = {k: round(median(v), 1) for k, v in res.items()}
            print(f"{N}x{K} rows={rows} (us):", out[f"{N}x{K} rows={rows}"], flush=True)
    return {"threads": threads, "us_median": out}


def run_model(name: str, args, text: str) -> dict:
    base, tok = load(name, "float32")
    bf16, _ = load(name, "bfloat16")
    calib = read_calibration(args.calib, tok, args.samples, args.seq_len)
    keep = args.only.split(",") if args.only else None if args.every else STANDARD
    rows = CONFIGS.get(name, CONFIGS["gemma3-270m"])  # other models (qwen2.5-*, a directory): the general rows
    wanted = {k: v for k, v in rows.items() if keep is None or k in keep}
    tune = None  # "-tuned" rows' windows: other windows of the same text
    if any(make().tune_steps for make in wanted.values()):
        tune = read_calibration(args.calib, tok, args.tune_samples, args.seq_len, seed=1)
    models, info = {"bf16": bf16}, {"bf16": {"weight_mb": weight_bytes(bf16) / 2**20}}
    info["fp32"] = {"weight_mb": weight_bytes(base) / 2**20}
    tmp = Path(tempfile.mkdtemp(prefix="bench_quant_"))
    for label, make in wanted.items():
        cfg = make()
        model = copy.deepcopy(base)
        t0, c0 = time.perf_counter(), time.process_time()
        if cfg.tune_steps:
            cfg.tune_steps = args.tune_steps
            if cfg.tune_codes and args.tune_codes_lr:
                cfg.tune_codes_lr = args.tune_codes_lr
        if cfg.recon_steps:
            cfg.recon_steps, cfg.recon_lr = args.recon_steps, args.recon_lr
        quantize(model, cfg, calib, tune_tokens=tune)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out = save_quantized(model, tok, tmp / label)
        q = model.quantization
        info[label] = {"method": cfg.method, "bits": cfg.bits, "group": cfg.group, "symmetric": cfg.symmetric,
                       "head_bits": cfg.head_bits, "bits_per_weight": q["bits_per_weight"],
                       "quantize_wall_s": wall, "quantize_cpu_s": cpu, "weight_mb": weight_bytes(model) / 2**20,
                       "disk_mb": disk_bytes(out) / 2**20}  # fmt: skip
        if "tune" in q["report"]:
            t = q["report"]["tune"]
            info[label]["tune"] = {k: t[k] for k in ("steps", "lr", "batch_size", "seq_len", "seconds", "first_loss",
                                                     "last_loss", "trained_parameters")}  # fmt: skip
            if "codes_changed" in t:
                info[label]["tune"].update(codes_lr=cfg.tune_codes_lr, codes_changed=t["codes_changed"])
            info[label]["tune"]["samples"] = args.tune_samples
        if "recon" in q["report"]:
            r = q["report"]["recon"]
            info[label]["recon"] = {"steps": cfg.recon_steps, "lr": cfg.recon_lr, "batch": cfg.recon_batch,
                                    "samples": args.samples, "per_block": r}  # fmt: skip
        if "mixed" in q["report"]:
            info[label]["mixed_high"] = q["report"]["mixed"]["high"]
        print(f"{name} {label}: {wall:.1f} s wall, {cpu:.1f} s CPU, {info[label]['weight_mb']:.1f} MB", flush=True)
        models[label] = model
    result = {"calibration": {"text": args.calib, "samples": args.samples, "seq_len": args.seq_len}, "configs": info}
    if args.windows:
        qual = quality(base, models, tok, text, 512, args.windows)
        if args.check_ppl:
            ref = perplexity(base, tok, text, 512, args.windows)["ppl"]
            qual["base"]["ppl_from_leanlm_perplexity"] = ref
            assert abs(ref / qual["base"]["ppl"] - 1) < 1e-5, (ref, qual["base"]["ppl"])
        result["quality"] = qual
        for label in models:
            info[label].update(qual[label])
            info[label]["ppl_change"] = qual[label]["ppl"] / qual["base"]["ppl"] - 1
        info["fp32"]["ppl"] = qual["base"]["ppl"]
    if args.rss:
        for label in info:
            spec, dtype = (name, "float32" if label == "fp32" else "bfloat16") if label in ("fp32", "bf16") else (
                str(tmp / label), "float32")  # fmt: skip
            info[label]["peak_rss_mb"] = peak_rss_mb(spec, dtype, args.threads)
            print(f"{name} {label}: peak RSS {info[label]['peak_rss_mb']:.0f} MB", flush=True)
    if args.runs:
        engines = [LeanlmEngine(base, "fp32")] + [LeanlmEngine(m, label) for label, m in models.items()]
        if args.llama_cpp and importlib.util.find_spec("llama_cpp"):
            from leanlm.export import export_gguf

            from leanlm import LeanlmError

            for t in ("q8_0", "q4_0"):  # llama.cpp's own formats of the same base weights, same run
                try:
                    path = export_gguf(base, tok, tmp / f"{name}-{t}.gguf", t, force=True)
                except LeanlmError as e:  # GGUF export covers the Llama family only
                    result["llama_cpp_skipped"] = str(e)
                    break
                info[f"llama.cpp-{t}"] = {"weight_mb": path.stat().st_size / 2**20, "disk_mb": path.stat().st_size / 2**20}
                engines.append(LlamaCppEngine(str(path), f"llama.cpp-{t}", args.threads))
        prompt = fixed_prompt(base.config.vocab_size, 512)
        short = fixed_prompt(base.config.vocab_size, 32, seed=1)
        speed = interleaved_speed(engines, prompt, short, 128, args.runs)
        result["speed"] = speed
        for label, s in speed.items():
            info[label].update(prefill_tok_s=s["prefill_tok_s"], decode_tok_s=s["decode_tok_s"])
        for label in models:
            info[label]["decode_vs_bf16"] = speed[label]["decode_tok_s"] / speed["bf16"]["decode_tok_s"]
            info[label]["prefill_vs_fp32"] = speed[label]["prefill_tok_s"] / speed["fp32"]["prefill_tok_s"]
    cols = ("bits_per_weight", "ppl", "kl", "top1_agreement", "decode_tok_s", "prefill_tok_s", "weight_mb",
            "peak_rss_mb", "quantize_wall_s")  # fmt: skip
    rows = [{"config": k, **{c: v.get(c) for c in cols}} for k, v in info.items()]
    print_table(rows, ["config", *cols])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--only", help="comma list of config labels (default: the STANDARD rows)")
    ap.add_argument("--all", dest="every", action="store_true", help="every row of CONFIGS (hours: trained rows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=40, help="perplexity/KL windows of 512 tokens (0 = skip)")
    ap.add_argument("--runs", type=int, default=5, help="timed speed runs after a warm-up (0 = skip)")
    ap.add_argument("--calib", default="wikitext2-valid")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tune-steps", type=int, default=TUNE_STEPS, help="grid tuning steps of the -tuned rows")
    ap.add_argument("--tune-codes-lr", type=float, default=None,
                    help="learning rate of the rounding offsets of the -tuned-codes rows (default: QuantConfig's)")
    ap.add_argument("--recon-steps", type=int, default=RECON_STEPS, help="block reconstruction steps of the -recon rows")
    ap.add_argument("--recon-lr", type=float, default=1e-3, help="block reconstruction learning rate of the -recon rows")
    ap.add_argument("--tune-samples", type=int, default=128,
                    help="grid tuning windows of --seq-len (drawn from --calib with another seed)")
    ap.add_argument("--check-ppl", action="store_true", help="also run leanlm.evaluate.perplexity on the base model")
    ap.add_argument("--kernels", action="store_true", help="also time the kernels per weight shape")
    ap.add_argument("--kernels-only", action="store_true")
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the peak-RSS subprocess per config")
    ap.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false",
                    help="skip llama.cpp Q8_0/Q4_0 (exported from the same base weights) in the speed runs")
    ap.add_argument("--out", default="quant", help="benchmarks/results/OUT.json (partial runs: the archive)")
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # --runs 0 / --windows 0 / --no-rss / --no-llama-cpp leave out whole columns: partial too
    partial = bool(args.only or args.models != DEFAULT_MODELS or args.kernels_only or not args.runs or not args.windows
                   or not args.rss or not args.llama_cpp)
    out = dict(partial=partial, archive=args.archive, machine_shared=args.machine_shared)
    result = {"machine": machine(), "models": {}, "baselines": "decode ratios vs leanlm bf16 (decode_vs_bf16), "
              "prefill ratios vs leanlm fp32 (prefill_vs_fp32), same interleaved run"}
    if args.kernels or args.kernels_only:
        result["kernels"] = kernel_timings(args.threads)
    if not args.kernels_only:
        text = wikitext2_test()
        for name in args.models.split(","):
            r = run_model(name, args, text)
            r["settings"] = {k: v for k, v in vars(args).items()}
            result["models"][name] = r
            last = name == args.models.split(",")[-1]
            write_result(args.out, result, checkpoint=not last, **out)  # after each model: a long run keeps its part
    else:
        write_result(args.out, result, **out)


if __name__ == "__main__":
    main()
