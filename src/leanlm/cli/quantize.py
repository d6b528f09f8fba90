"""`leanlm quantize`: load (float32, or bf16 for a bf16 checkpoint), calibrate, quantize, write the directory atomically."""

from __future__ import annotations

import sys
import time

from ..errors import LeanlmError
from .common import MODEL_HELP, SEED, THREADS, integer, number, verb_parser


def add_parser(subparsers):
    p = verb_parser(subparsers, "quantize", help="weight quantization (RTN, GPTQ, AWQ; int8/int4) to a directory",
                    description="Quantize the decoder Linears (and the LM head / embeddings, int8 unless --head-bits "
                                "0) and write a directory that `leanlm eval` / `generate` / leanlm.load read back. "
                                "GPTQ and AWQ calibrate block by block on --calib text (never the eval split).",
                    examples=["leanlm quantize smollm2-135m --method gptq --bits 4 --group 128 --calib wikitext2-valid "
                              "--out out/smollm2-gptq4",
                              "leanlm quantize gemma3-270m --method rtn --bits 8 --group 0 --sym --out out/gemma-int8",
                              "leanlm quantize smollm2-135m --method awq --target-bits 5 --out out/smollm2-mixed",
                              "leanlm eval out/smollm2-gptq4 --dtype bfloat16 --kl-ref smollm2-135m"])  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    add_arguments(p)
    return p


def config_from_args(args):
    from ..quant.config import MixedPrecision, make_config

    mixed = MixedPrecision(target_bits=args.target_bits) if args.target_bits else None
    kwargs = dict(bits=args.bits, group=args.group, symmetric=args.sym, levels=args.levels, head_bits=args.head_bits,
                  embed_bits=args.embed_bits, skip=args.skip or [], dtype=args.dtype, pad=args.pad, mixed=mixed)  # fmt: skip
    # method-specific flags only when given, so that e.g. --act-order with --method rtn is an error
    if args.damp is not None:
        kwargs["damp"] = args.damp
    if args.act_order:
        kwargs["act_order"] = True
    if args.no_true_sequential:
        kwargs["true_sequential"] = False
    if args.no_clip:
        kwargs["clip"] = False
    if args.clip:
        kwargs["clip"] = True
    if args.gptq_rounding:
        kwargs["gptq"] = True
    if args.tune_steps:
        kwargs.update(tune_steps=args.tune_steps, tune_lr=args.tune_lr, tune_batch=args.tune_batch,
                      tune_codes=args.tune_codes, tune_codes_lr=args.tune_codes_lr)  # fmt: skip
    elif args.tune_codes:
        raise LeanlmError("--tune-codes trains during grid tuning: give --tune-steps N too (e.g. 200)")
    if args.recon_steps:
        kwargs.update(recon_steps=args.recon_steps, recon_lr=args.recon_lr, recon_batch=args.recon_batch,
                      recon_loss=args.recon_loss)  # fmt: skip
    return make_config(args.method, **kwargs)


def main(args) -> int:
    import torch

    from ..evaluate.speed import disk_bytes, weight_bytes
    from ..io import check_writable, estimated_bytes
    from ..model import load
    from ..model.load import checkpoint_dtype
    from ..quant.calibrate import read_calibration
    from ..quant.pipeline import quantize
    from ..quant.save import save_quantized

    config = config_from_args(args)  # bad options, and an output that cannot be written, fail before the load
    check_writable(args.out, args.force, directory=True, need_bytes=estimated_bytes(args.model, config.bits))
    if args.threads:
        torch.set_num_threads(args.threads)
    # a bf16 checkpoint stays bf16 in memory (quantize widens one block at a time); mixed precision and grid tuning
    # need the whole model in fp32
    dtype = checkpoint_dtype(args.model) if config.mixed is None and not config.tune_steps else torch.float32
    model, tok = load(args.model, dtype=dtype)
    before = weight_bytes(model)
    calib = tune = None
    if config.method != "rtn" or config.mixed is not None:
        calib = read_calibration(args.calib, tok, args.samples, args.seq_len, args.seed, args.data_dir)
    if config.tune_steps:
        tune = read_calibration(args.calib, tok, args.tune_samples, args.seq_len, args.seed + 1, args.data_dir)
    t0 = time.perf_counter()
    quantize(model, config, calib, tune_tokens=tune)
    seconds = time.perf_counter() - t0
    save_quantized(model, tok, args.out, args.force)
    q = model.quantization
    print(f"{config.method} {config.spec.label()}: {len(q['layers'])} modules quantized in {seconds:.1f} s, "
          f"{q['bits_per_weight']:.2f} bits/weight in decoder Linears", file=sys.stderr)  # fmt: skip
    if "tune" in q["report"]:
        t = q["report"]["tune"]
        moved = f", {t['codes_changed']:.2%} of codes moved" if "codes_changed" in t else ""
        print(f"grid tuning: KL {t['first_loss']:.4f} -> {t['last_loss']:.4f} in {t['steps']} steps "
              f"({t['seconds']:.0f} s){moved}", file=sys.stderr)  # fmt: skip
    if "recon" in q["report"]:
        r = list(q["report"]["recon"].values())
        before, after = (sum(x[k] for x in r) / len(r) for k in ("loss_before", "loss_after"))
        moved = sum(x["codes_changed"] for x in r) / len(r)
        print(f"block reconstruction: relative output error {before:.4f} -> {after:.4f} (mean over {len(r)} blocks), "
              f"{moved:.2%} of codes moved", file=sys.stderr)  # fmt: skip
    if "mixed" in q["report"]:
        print(f"mixed precision: {len(q['report']['mixed']['high'])} Linears at {config.mixed.high.label()}",
              file=sys.stderr)  # fmt: skip
    print(f"weights {before / 2**20:.1f} MB -> {weight_bytes(model) / 2**20:.1f} MB; "
          f"wrote {args.out} ({disk_bytes(args.out) / 2**20:.1f} MB)", file=sys.stderr)  # fmt: skip
    return 0


def add_arguments(p) -> None:
    """Options of `leanlm quantize` after MODEL."""
    p.add_argument("--method", default="gptq", help="rtn | gptq | awq (default gptq)")
    p.add_argument("--bits", type=integer(), default=4, help="4 or 8 (default 4); 3 on a table grid (--levels iq3 or "
                   "learned); 3 to 6 on --levels signed")
    p.add_argument("--group", type=integer(), default=128, help="input columns per scale: 32, 64, 128, 256, or 0 = per "
                                                          "output channel (default 128)")  # fmt: skip
    p.add_argument("--sym", action="store_true", help="symmetric grid (no zero point); default asymmetric")
    p.add_argument("--levels", default="uniform", help="uniform | iq4nl | iq3 | learned | signed: iq4nl (--bits 4) / iq3 "
                   "(--bits 3) are fixed 16- / 8-level tables, learned fits one per tensor at --bits 4 or 3, signed is "
                   "every integer -2**(bits-1)..2**(bits-1)-1 at --bits 3 to 6 (llama.cpp's Q4_0 / Q5_0 grids; "
                   "--bits 5 --group 32 exports as Q5_0); tables take one scale per group (need --sym; RTN or GPTQ)")
    p.add_argument("--calib", default="wikitext2-valid",
                   help="calibration text: wikitext2-valid (default), pride-and-prejudice, moby-dick or a file")  # fmt: skip
    p.add_argument("--samples", type=integer(1), default=16, help="calibration windows (default 16)")
    p.add_argument("--seq-len", type=integer(16), default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=SEED, default=0, help="seed for picking calibration windows")
    p.add_argument("--data-dir", help="data folder for named texts (default $LEANLM_DATA)")
    p.add_argument("--head-bits", type=integer(), default=8, help="LM head (and tied embeddings) bits: 8, 4 or 0 = keep; "
                   "6 or 5 for an untied head (the signed integer table, g32 unless --head-group)")
    p.add_argument("--embed-bits", type=integer(), default=8, help="untied input embedding bits: 8, 4 or 0 = keep")
    p.add_argument("--skip", action="append", help="leave Linears whose name contains this unquantized (repeatable)")
    p.add_argument("--target-bits", type=number(0, low_open=True), default=None,
                   help="mixed precision: promote the most sensitive Linears to int8 up to this average bits/weight")  # fmt: skip
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--damp", type=number(0, low_open=True), default=None, help="GPTQ: dampening, fraction of mean diagonal (default 0.01)")
    p.add_argument("--no-true-sequential", action="store_true",
                   help="GPTQ: calibrate all four Linears of a block on the unquantized block")  # fmt: skip
    p.add_argument("--no-clip", action="store_true", help="AWQ: skip the clipping search")
    p.add_argument("--clip", action="store_true",
                   help="GPTQ: clip each group's grid by an output-error search first (AWQ's clipping search)")  # fmt: skip
    p.add_argument("--gptq", dest="gptq_rounding", action="store_true",
                   help="AWQ: round the scaled weights with GPTQ instead of to nearest (AWQ + GPTQ, best g128 quality)")  # fmt: skip
    p.add_argument("--tune-steps", type=integer(0), default=0,
                   help="after quantizing, train every group's scale and zero (codes frozen) by KL distillation to "
                        "the unquantized model for this many steps (e.g. 200; ~6.5 s per 512-token step for "
                        "SmolLM2 on 2 cores); default 0 = off")  # fmt: skip
    p.add_argument("--tune-samples", type=integer(1), default=128, help="grid tuning: calibration windows (default 128)")
    p.add_argument("--tune-lr", type=number(0, 1, low_open=True, high_open=True), default=1e-3, help="grid tuning: learning rate (default 1e-3)")
    p.add_argument("--tune-batch", type=integer(1), default=1, help="grid tuning: windows per step (default 1)")
    p.add_argument("--tune-codes", action="store_true",
                   help="grid tuning: also learn each weight's rounding (a code moves one step at most; same "
                        "storage and kernels)")  # fmt: skip
    p.add_argument("--tune-codes-lr", type=number(0, 1, low_open=True, high_open=True), default=2e-3,
                   help="grid tuning: learning rate of the rounding offsets, in code steps (default 2e-3)")  # fmt: skip
    p.add_argument("--recon-steps", type=integer(0), default=0,
                   help="GPTQ/AWQ: after each block is quantized, train its grids and rounding (one code step at "
                        "most) for this many steps so that its output matches the unquantized block's "
                        "(AutoRound-style block reconstruction; e.g. 100, with --samples 64); default 0 = off")  # fmt: skip
    p.add_argument("--recon-lr", type=number(0, 1, low_open=True, high_open=True), default=1e-3, help="block reconstruction: learning rate (default 1e-3)")
    p.add_argument("--recon-batch", type=integer(1), default=4, help="block reconstruction: windows per step (default 4)")
    p.add_argument("--recon-loss", default="mse", choices=["mse", "channel"],
                   help="block reconstruction: squared error (mse, default), or per residual channel relative to its "
                        "mean square (channel)")  # fmt: skip
    p.add_argument("--no-pad", dest="pad", action="store_false",
                   help="refuse layers whose in_features the group does not divide (default: shorter last group)")  # fmt: skip
    p.add_argument("--dtype", default="bfloat16", help="compute dtype of the result: bfloat16 (default) | float32")
    p.add_argument("--threads", type=THREADS, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", required=True, help="output directory (refuses to overwrite without --force)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
