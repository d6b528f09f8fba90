"""Same-run A/B of decode speed with a quantized KV cache: the plain cache in the model's dtype (bf16) against
int8 and int4 KV read by the fused kernel (ops.attend_kvquant, csrc/attention_kvquant.cpp), at long contexts.

    python benchmarks/bench_kv_quant.py --archive --machine-shared            # qwen2.5-0.5b, smollm2-135m; 4k, 8k
    python benchmarks/bench_kv_quant.py --reference --contexts 4096 --archive  # + int8 on the Python path

Caches are filled with random keys / values at positions [0, context) (leanlm.attention.longctx.decode_speed's
synthetic fill: decode cost does not depend on the values, and no long prefill runs); decode rounds of --steps
tokens are interleaved across the policies, median tok/s reported, with each policy's speed relative to the
plain cache of the same run. --reference adds `int8-python`: the dequantize-then-attend path the kernel
replaced (PolicyCache.native_kvquant = False), slow at long context.
Writes results/kv_quant.json for a default run, else (and with --archive) results/archive/DATE/kv_quant.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_result_args, machine, write_result  # noqa: E402

DEFAULT_MODELS = "qwen2.5-0.5b,smollm2-135m"
DEFAULT_CONTEXTS = "4096,8192"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--contexts", default=DEFAULT_CONTEXTS, help="comma list of context lengths")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=8, help="decode tokens per round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", action="store_true", help="also int8 KV on the Python dequantize-then-attend path")
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import leanlm
    from leanlm.attention import KVPolicy
    from leanlm.attention.longctx import decode_speed

    @dataclass
    class Reference(KVPolicy):
        """A policy whose caches take the Python path (the kernel's reference)."""

        def __call__(self, *a, **k):
            cache = super().__call__(*a, **k)
            cache.native_kvquant = False
            return cache

    policies = {"plain": None, "int8": KVPolicy.parse("int8"), "int4": KVPolicy.parse("int4")}
    if args.reference:
        policies["int8-python"] = Reference(bits=8)
    res = {"dtype": args.dtype, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
           "machine": machine(), "models": {}}  # fmt: skip
    partial = args.models != DEFAULT_MODELS or args.contexts != DEFAULT_CONTEXTS
    for name in args.models.split(","):
        model, _ = leanlm.load(name, dtype=args.dtype)
        if hasattr(model, "prepare_decode"):
            model.prepare_decode()
        rows = []
        for ctx in (int(c) for c in args.contexts.split(",")):
            r = decode_speed(model, ctx, policies, args.steps, args.rounds, synthetic=True)
            plain = r["policies"]["plain"]["tok_s"]
            for d in r["policies"].values():
                d["vs_plain"] = round(d["tok_s"] / plain, 3)
            rows.append(r)
            print(name, ctx, {k: (round(v["tok_s"], 2), v["vs_plain"]) for k, v in r["policies"].items()}, flush=True)
            res["models"][name] = rows
            write_result("kv_quant", res, checkpoint=True, partial=partial, archive=args.archive,
                         machine_shared=args.machine_shared)  # fmt: skip
        del model
    write_result("kv_quant", res, partial=partial, archive=args.archive, machine_shared=args.machine_shared)


if __name__ == "__main__":
    main()
