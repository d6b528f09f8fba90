"""Learned 2:4 masks (MaskLLM-style, leanlm.prune.maskllm) against Wanda 2:4 and SparseGPT 2:4, one run.

Every method prunes a fresh copy of the float32 model on the same calibration windows (wikitext2-valid,
--calib-samples x --calib-seq-len) to the same pattern, so all three end at exactly 50% of the block weights.
Quality: WikiText-2 test perplexity, KL(dense || pruned) and top-1 agreement on the same --windows x 512
windows (benchmarks/common.QualityRef: the dense model's log-probs computed once). Minutes per method are
wall-clock minutes of the pruning alone, and cpu_minutes the process CPU time (all threads) it took: on a
shared machine whose other jobs stretch or pause this one, the CPU time is the steadier figure.

    LEANLM_DATA=../shared/data python benchmarks/bench_maskllm.py --archive                       # Qwen2.5-0.5B
    python benchmarks/bench_maskllm.py --model smollm2-135m --archive
Writes benchmarks/results/maskllm_MODEL.json (an --archive run: benchmarks/results/archive/DATE/), with
`learned_nm_ppl_over_sparsegpt_nm` = MaskLLM ppl / SparseGPT ppl (below 1: the learned masks win).
"""

from __future__ import annotations

import argparse
import copy
import gc
import time

import torch
from common import QualityRef, add_result_args, machine, print_table, write_result

import leanlm
from leanlm.apply import config_dict
from leanlm.evaluate.data import wikitext2_test
from leanlm.evaluate.perplexity import make_windows
from leanlm.prune import MaskLLM, Unstructured, calibration_tokens, prune_maskllm, prune_unstructured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=12, help="512-token WikiText-2 test windows for ppl / KL (default 12)")
    ap.add_argument("--calib-samples", type=int, default=8, help="calibration windows, shared by every method")
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--prior", default="sparsegpt", choices=("sparsegpt", "wanda", "magnitude"))
    ap.add_argument("--steps", type=int, default=MaskLLM.steps, help="MaskLLM optimizer steps per block")
    ap.add_argument("--batch", type=int, default=1, help="MaskLLM calibration windows per step")
    ap.add_argument("--lr", type=float, default=MaskLLM.lr)
    ap.add_argument("--temperature", type=float, nargs=2, default=list(MaskLLM.temperature))
    ap.add_argument("--target", default="teacher", choices=("teacher", "block"))
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base, tok = leanlm.load(args.model, "float32")
    calib = calibration_tokens(tok, "wikitext2-valid", args.calib_samples, args.calib_seq_len)
    t0 = time.perf_counter()
    quality = QualityRef(base, make_windows(tok, wikitext2_test(), 512, args.windows))
    rows = [{"method": "dense", "ppl": quality.base_ppl(), "kl": 0.0, "top1_agreement": 1.0, "minutes": 0.0,
             "eval_minutes": (time.perf_counter() - t0) / 60}]  # fmt: skip
    mask_cfg = MaskLLM(args.pattern, prior=args.prior, target=args.target, steps=args.steps, batch=args.batch,
                       lr=args.lr, temperature=tuple(args.temperature))  # fmt: skip
    methods = [("wanda", Unstructured("wanda", pattern=args.pattern)),
               ("sparsegpt", Unstructured("sparsegpt", pattern=args.pattern)), ("maskllm", mask_cfg)]  # fmt: skip
    out = {"model": args.model, "machine": machine(), "settings": vars(args),
           "calibration": {"text": "wikitext2-valid", "samples": args.calib_samples, "seq_len": args.calib_seq_len,
                           "tokens": int(calib.numel())},
           "maskllm_config": config_dict(mask_cfg), "rows": rows}  # fmt: skip
    name = f"maskllm_{args.model}"
    for label, cfg in methods:
        print(f"== {label}", flush=True)
        model = copy.deepcopy(base)
        t0, c0 = time.perf_counter(), time.process_time()
        if isinstance(cfg, MaskLLM):
            rep = prune_maskllm(model, cfg, calib)
        else:
            rep = prune_unstructured(model, cfg, calib)
        minutes, cpu_minutes = (time.perf_counter() - t0) / 60, (time.process_time() - c0) / 60
        t1 = time.perf_counter()
        row = {"method": label, "pattern": args.pattern, "sparsity_prunable": rep["sparsity_prunable"],
               "minutes": minutes, "cpu_minutes": cpu_minutes, **quality(model), "eval_minutes": (time.perf_counter() - t1) / 60}  # fmt: skip
        if label == "maskllm":
            row["maskllm"] = {k: rep[k] for k in ("blocks_learned_kept", "mean_prior_error", "mean_learned_error",
                                                  "blocks")}  # fmt: skip
        rows.append(row)
        print({k: row[k] for k in ("method", "ppl", "kl", "minutes")}, flush=True)
        write_result(name, out, archive=args.archive, checkpoint=True, machine_shared=args.machine_shared)
        del model
        gc.collect()
    ppl = {r["method"]: r["ppl"] for r in rows}
    out["learned_nm_ppl_over_sparsegpt_nm"] = ppl["maskllm"] / ppl["sparsegpt"]
    out["learned_nm_ppl_over_wanda_nm"] = ppl["maskllm"] / ppl["wanda"]
    out["minutes_per_method"] = {r["method"]: r["minutes"] for r in rows if r["method"] != "dense"}
    out["cpu_minutes_per_method"] = {r["method"]: r["cpu_minutes"] for r in rows if r["method"] != "dense"}
    out["learned_beats_sparsegpt"] = ppl["maskllm"] < ppl["sparsegpt"]
    print_table(rows, ["method", "ppl", "kl", "top1_agreement", "minutes", "cpu_minutes", "eval_minutes"])
    print("learned_nm_ppl_over_sparsegpt_nm", round(out["learned_nm_ppl_over_sparsegpt_nm"], 4))
    write_result(name, out, archive=args.archive, machine_shared=args.machine_shared)


if __name__ == "__main__":
    main()
