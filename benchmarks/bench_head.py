"""The LM head's bits: what quantizing the output layer costs in quality, and what it saves per token.

The head (tied to the embedding table on SmolLM2 and Qwen2.5) is the largest single matrix the decode step
reads: on Qwen2.5-0.5B, 136M of its 494M weights. leanlm quantizes it by default at `head_bits=8` (int8 per
channel, round-to-nearest). This measures, on the same WikiText-2 test windows against the float32 model:

- the head alone at bf16 (reference), int8 per channel, and int4 (group 128 / 32), with the body left in float32,
  so the KL is the head's own cost;
- the whole int4 g128 RTN model with the head at 8 and at 4 bits, the pair a user actually chooses between;
- the head's share of the bytes one decode step reads, at each setting.

    LEANLM_DATA=../shared/data python benchmarks/bench_head.py --models qwen2.5-0.5b,smollm2-135m --windows 10

Writes benchmarks/results/head_bits.json; its `summary` maps each model to the head-only KL at 8 and 4 bits and
the int4 model's KL with either head.
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import QualityRef, add_result_args, print_table, write_result

from leanlm import load
from leanlm.evaluate.data import wikitext2_test
from leanlm.evaluate.perplexity import make_windows
from leanlm.evaluate.speed import weight_bytes
from leanlm.quant import RTN, quantize
from leanlm.quant.pipeline import quantize_head


DEFAULT_MODELS, DEFAULT_WINDOWS = "qwen2.5-0.5b,smollm2-135m", 10


def head_bytes(model) -> int:
    head = model.lm_head if model.lm_head is not None else model.tok_embeddings
    return sum(t.numel() * t.element_size() for t in list(head.parameters()) + list(head.buffers()))


def candidates(base) -> dict:
    """name -> a model built from fresh copies of `base` (float32)."""
    def head_only(bits: int, group: int):
        def make():
            m = copy.deepcopy(base)
            quantize_head(m, RTN(bits=4, group=group, head_bits=bits), torch.float32, {})
            return m
        return make

    def int4_body(head: int):
        def make():
            return quantize(copy.deepcopy(base), RTN(bits=4, group=128, head_bits=head), progress=False)
        return make

    return {"head-int8": head_only(8, 128), "head-int4-g128": head_only(4, 128), "head-int4-g32": head_only(4, 32),
            "int4-g128+head-int8": int4_body(8), "int4-g128+head-int4": int4_body(4)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="WikiText-2 test windows of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results, summary = {}, {}
    for name in args.models.split(","):
        base, tok = load(name, dtype=torch.float32)
        windows = make_windows(tok, wikitext2_test(), args.seq_len, args.windows)
        ref = QualityRef(base, windows)
        body_bytes = weight_bytes(base) - head_bytes(base)
        rows = [{"config": "float32 (reference)", "ppl": ref.base_ppl(), "kl": 0.0, "top1_agreement": 1.0,
                 "head_mb": head_bytes(base) / 2e6, "note": "head at bf16 would be this size"}]  # fmt: skip
        for label, make in candidates(base).items():
            m = make()
            r = ref(m)
            hb = head_bytes(m)
            row = {"config": label, "ppl": r["ppl"], "kl": r["kl"], "top1_agreement": r["top1_agreement"],
                   "head_mb": hb / 1e6}  # fmt: skip
            if label.startswith("int4"):
                row["head_share_of_step_bytes"] = hb / weight_bytes(m)
            else:
                row["head_share_of_step_bytes_bf16_body"] = hb / (hb + body_bytes / 2)  # body at bf16
            rows.append(row)
            del m
        print(f"\n{name} ({args.windows} x {args.seq_len} WikiText-2 test tokens, KL to float32)")
        print_table(rows, ["config", "ppl", "kl", "top1_agreement", "head_mb"])
        by = {r["config"]: r for r in rows}
        results[name] = {"rows": rows, "windows": args.windows, "seq_len": args.seq_len}
        summary[name] = {"head_int8_kl": by["head-int8"]["kl"], "head_int4_g128_kl": by["head-int4-g128"]["kl"],
                         "int4_model_kl_head_int8": by["int4-g128+head-int8"]["kl"],
                         "int4_model_kl_head_int4": by["int4-g128+head-int4"]["kl"]}  # fmt: skip
    partial = args.models != DEFAULT_MODELS or args.windows != DEFAULT_WINDOWS
    write_result("head_bits", {"summary": summary, "models": results}, partial=partial, archive=args.archive,
                 machine_shared=args.machine_shared)


if __name__ == "__main__":
    main()
