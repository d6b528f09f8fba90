"""MLA-like KV compression (leanlm.attention.MLA): KV bytes per token and perplexity, before and after healing.

For each (rank, rope_dims) the base model is copied and converted (calibration: WikiText-2 validation windows),
then scored on a Gutenberg book (Moby Dick, pg2701, from a quarter in; never used for calibration) in --seq-len windows with full
causal attention; then healed (KL distillation towards the base, only the latent projections train) and scored
again. KV bytes per token are over all layers at bf16 (2 bytes a value), original vs converted.

    LEANLM_DATA=../shared/data python benchmarks/bench_mla.py --model smollm2-135m --configs 72:8,48:16 --archive
Writes benchmarks/results/mla.json (one entry per model) or, with --archive, under results/archive/DATE/.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from common import add_result_args, machine, write_result

import leanlm
from leanlm.attention.mla import MLA, collect_stats, convert, heal, kv_bytes_per_token
from leanlm.calibration import Calibration
from leanlm.evaluate.perplexity import perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", default="72:8,48:16", help="comma-separated RANK:ROPE_DIMS")
    ap.add_argument("--heal-steps", type=int, default=100)
    ap.add_argument("--heal-lr", type=float, default=1e-4)
    ap.add_argument("--heal-scope", default="latent")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--start", type=float, default=0.25,
                    help="score from this fraction of the book on (its start is a header and a table of contents)")
    ap.add_argument("--threads", type=int, default=2)
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = leanlm.load(args.model)
    book = (__import__("pathlib").Path(os.environ["LEANLM_DATA"]) / "gutenberg" / "pg2701.txt").read_text()
    book = book[int(len(book) * args.start) :]
    calib = Calibration(tok, "wikitext2-valid", samples=args.calib_samples, seq_len=args.calib_seq_len)
    tokens = calib.tokens()

    def score(m):
        return round(perplexity(m, tok, book, args.seq_len, args.windows, progress=False)["ppl"], 4)

    bf16 = torch.bfloat16
    t0 = time.perf_counter()
    stats = collect_stats(base, tokens, True, True, progress=False)  # once: every conversion reuses them
    stats_s = round(time.perf_counter() - t0, 2)
    ref = score(base)
    out = {"model": args.model, "eval": {"text": "gutenberg/pg2701.txt", "from_fraction": args.start, "seq_len": args.seq_len, "windows": args.windows},
           "calibration": {"text": "wikitext2-valid", "samples": args.calib_samples, "seq_len": args.calib_seq_len},
           "base": {"ppl": ref, "kv_bytes_per_token_bf16": kv_bytes_per_token(base, bf16)}, "rows": [],
           "stats_s": stats_s, "heal_scope": args.heal_scope, "machine": machine()}  # fmt: skip
    print(f"base ppl {ref:.3f}, KV {out['base']['kv_bytes_per_token_bf16']} B/token (bf16)", flush=True)
    for spec in args.configs.split(","):
        rank, rope = (int(v) for v in spec.split(":"))
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        rep = convert(m, MLA(rank=rank, rope_dims=rope), tokens, progress=False, stats=stats)
        row = {"rank": rank, "rope_dims": rope, "convert_s": round(time.perf_counter() - t0, 2),
               "kv_bytes_per_token_bf16": kv_bytes_per_token(m, bf16),
               "mean_kept_energy": round(sum(rep["kept_energy"]) / len(rep["kept_energy"]), 4)}  # fmt: skip
        row["kv_ratio"] = round(out["base"]["kv_bytes_per_token_bf16"] / row["kv_bytes_per_token_bf16"], 3)
        row["ppl_converted"] = score(m)
        if args.heal_steps:
            h = heal(m, base, tokens, args.heal_steps, args.heal_lr, args.heal_scope, progress=True)
            row["heal"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()}
            row["ppl_healed"] = score(m)
        for k in ("ppl_converted", "ppl_healed"):
            if k in row:
                row[k.replace("ppl", "delta_pct")] = round(100 * (row[k] / ref - 1), 2)
        out["rows"].append(row)
        print(row, flush=True)
        write_result(f"mla_{args.model}", out, archive=args.archive, machine_shared=args.machine_shared,
                     checkpoint=spec != args.configs.split(",")[-1])  # fmt: skip
        del m


if __name__ == "__main__":
    main()
