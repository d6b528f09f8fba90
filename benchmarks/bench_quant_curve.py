"""Learning curve of end-to-end tuning of an int4 model: quality every N steps, on two texts.

Quantizes a fresh float32 copy (AWQ + GPTQ, int4, group 128 by default), then runs leanlm's end-to-end
tuning (quant/tune.py: every group's scale and zero, and with --codes each weight's rounding, trained by
KL distillation to the unquantized model on WikiText-2 *validation* windows) and, every --every steps,
measures the model as it stands against the float32 base on fixed windows of two texts:
WikiText-2 test (the perplexity the quantization targets are stated in) and a Gutenberg book (text the
tuning never saw a line like: a perplexity gain there is not WikiText-specific). Per checkpoint: ppl,
KL(base || model), top-1 agreement, tokens trained on, wall time. Step 0 is the untuned start.

    LEANLM_DATA=../shared/data python benchmarks/bench_quant_curve.py --steps 900 --every 150
    LEANLM_DATA=../shared/data python benchmarks/bench_quant_curve.py --no-codes --steps 300   # grid only

Writes benchmarks/results/<--out>.json after every checkpoint; --save DIR also saves the tuned model.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import QualityRef, add_result_args, machine, write_result

import leanlm.quant.tune as tune_module
from leanlm import load
from leanlm.evaluate.data import read_text, wikitext2_test
from leanlm.evaluate.perplexity import make_windows
from leanlm.quant import AWQ, GPTQ, quantize, read_calibration, save_quantized

STARTS = {
    "awq-gptq": lambda b, g: AWQ(bits=b, group=g, gptq=True),
    "gptq": lambda b, g: GPTQ(bits=b, group=g, act_order=True, clip=True),
}


def book_windows(tok, name: str, seq_len: int, n: int) -> list[torch.Tensor]:
    """n windows from the middle of a book (past the Gutenberg header and front matter)."""
    text = read_text(name)
    return make_windows(tok, text[len(text) // 3 :], seq_len, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--start", choices=sorted(STARTS), default="awq-gptq", help="the quantized model tuning starts from")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--samples", type=int, default=64, help="calibration windows of the starting quantization")
    ap.add_argument("--tune-samples", type=int, default=1024, help="tuning windows (WikiText-2 validation, another seed)")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--every", type=int, default=150, help="measure every this many steps")
    ap.add_argument("--lr", type=float, default=1e-3, help="grid learning rate")
    ap.add_argument("--codes-lr", type=float, default=2e-3, help="rounding-offset learning rate")
    ap.add_argument("--no-codes", dest="codes", action="store_false", help="tune the grid only (codes frozen)")
    ap.add_argument("--windows", type=int, default=20, help="WikiText-2 test windows of 512")
    ap.add_argument("--book", default="moby-dick")
    ap.add_argument("--book-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", help="also save the tuned model to this directory")
    ap.add_argument("--out", default="quant_curve")
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base, tok = load(args.model, "float32")
    calib = read_calibration("wikitext2-valid", tok, args.samples, 512)
    tune_tokens = read_calibration("wikitext2-valid", tok, args.tune_samples, 512, seed=1)
    refs = {"wikitext2": QualityRef(base, make_windows(tok, wikitext2_test(), 512, args.windows)),
            args.book: QualityRef(base, book_windows(tok, args.book, 512, args.book_windows))}  # fmt: skip
    result = {"machine": machine(), "settings": vars(args), "curve": []}
    t0 = time.perf_counter()

    def checkpoint(model, step: int, final: bool = False) -> None:
        was_training = model.training
        model.eval()
        point = {"step": step, "tokens": step * 512, "wall_s": round(time.perf_counter() - t0, 1)}
        for name, ref in refs.items():
            r = ref(model)
            point[name] = {k: r[k] for k in ("ppl", "ppl_base", "kl", "top1_agreement")}
            point[name]["ppl_change"] = r["ppl"] / r["ppl_base"] - 1
        model.train(was_training)
        result["curve"].append(point)
        w = point["wikitext2"]
        print(f"step {step}: wikitext2 ppl {w['ppl']:.2f} ({100 * w['ppl_change']:+.1f}%) KL {w['kl']:.4f}, "
              f"{args.book} {100 * point[args.book]['ppl_change']:+.1f}% KL {point[args.book]['kl']:.4f}",
              flush=True)  # fmt: skip
        write_result(args.out, result, checkpoint=not final, archive=args.archive, machine_shared=args.machine_shared)

    # the start: quantized, not tuned
    model = copy.deepcopy(base)
    quantize(model, STARTS[args.start](args.bits, args.group), calib)
    result["start_quantize_s"] = round(time.perf_counter() - t0, 1)
    checkpoint(model, 0)

    # the same start again, now tuned; distill is wrapped to measure the model every --every steps
    model = copy.deepcopy(base)
    distill = tune_module.distill

    def distill_measured(student, *a, after_step=None, **kw):
        done = [0]

        def step_hook():
            if after_step is not None:
                after_step()
            done[0] += 1
            if done[0] % args.every == 0 and done[0] < args.steps:
                checkpoint(student, done[0])

        return distill(student, *a, after_step=step_hook, **kw)

    tune_module.distill = distill_measured
    try:
        cfg = STARTS[args.start](args.bits, args.group)
        cfg.tune_steps, cfg.tune_lr, cfg.tune_codes, cfg.tune_codes_lr = args.steps, args.lr, args.codes, args.codes_lr
        quantize(model, cfg, calib, tune_tokens=tune_tokens)
    finally:
        tune_module.distill = distill
    tune = model.quantization["report"]["tune"]
    result["tune"] = {k: tune[k] for k in ("steps", "lr", "batch_size", "seconds", "first_loss", "last_loss")}
    result["tune"]["codes_changed"] = tune.get("codes_changed")
    result["tune"]["losses"] = tune["losses"]
    checkpoint(model, args.steps, final=True)  # the stored model: codes rounded, grid in bf16
    if args.save:
        save_quantized(model, tok, args.save, force=True)


if __name__ == "__main__":
    main()
