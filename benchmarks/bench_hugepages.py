"""Decode with large weights in transparent huge pages vs in ordinary 4 KiB pages: a same-run A/B.

Two copies of each model in one process, one prepared for decode with huge pages (leanlm's default,
model/hugepages.py) and one with LEANLM_HUGEPAGES=0, timed interleaved run by run. Rows: bf16, int8 RTN per
channel, int4 RTN group 128. It records the kernel's THP setting and how much memory ended in huge pages.

    LEANLM_DATA=../shared/data python benchmarks/bench_hugepages.py --models smollm2-135m,qwen2.5-0.5b
Writes benchmarks/results/hugepages.json (fewer models or paths than the defaults: partial, to the archive).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from common import LeanlmEngine, add_result_args, interleaved_speed, print_table, write_result

from leanlm import load
from leanlm.evaluate.speed import fixed_prompt
from leanlm.model import hugepages

DEFAULT_MODELS = "smollm2-135m,gemma3-270m,qwen2.5-0.5b"
PATHS = ("bf16", "int8", "int4")


def prepared(model, huge: bool):
    os.environ["LEANLM_HUGEPAGES"] = "1" if huge else "0"
    try:
        model.prepare_decode()
    finally:
        os.environ.pop("LEANLM_HUGEPAGES")
    return model


def variants(name: str, path: str):
    from leanlm.quant import RTN, quantize

    if path == "bf16":
        base, _ = load(name, "bfloat16")
        return base, copy.deepcopy(base)
    m32, _ = load(name, "float32")
    cfg = RTN(bits=8, group=0, symmetric=True) if path == "int8" else RTN(bits=4, group=128)
    q = quantize(m32, cfg, progress=False)
    return q, copy.deepcopy(q)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models, paths = args.models.split(","), args.paths.split(",")
    result = {"thp_mode": hugepages.thp_mode(), "settings": vars(args), "models": {}}
    rows = []
    for name in models:
        result["models"][name] = {}
        for path in paths:
            plain, huge = variants(name, path)
            before = hugepages.huge_bytes()
            prepared(plain, False)
            prepared(huge, True)
            placed = hugepages.huge_bytes() - before
            engines = [LeanlmEngine(plain, f"{path}-4k", prepare=False), LeanlmEngine(huge, f"{path}-huge", prepare=False)]
            short = fixed_prompt(plain.config.vocab_size, 32, seed=1)
            speed = interleaved_speed(engines, short, short, args.new_tokens, args.runs)
            a, b = speed[f"{path}-4k"]["decode_tok_s"], speed[f"{path}-huge"]["decode_tok_s"]
            result["models"][name][path] = {"decode_tok_s_4k": a, "decode_tok_s_huge": b, "huge_over_4k": b / a,
                                            "huge_page_bytes": placed, "speed": speed}  # fmt: skip
            rows.append({"model": name, "path": path, "4k tok/s": a, "huge tok/s": b, "huge / 4k": b / a,
                         "MB in huge pages": placed / 2**20})  # fmt: skip
            del plain, huge, engines
    print_table(rows, ["model", "path", "4k tok/s", "huge tok/s", "huge / 4k", "MB in huge pages"])
    partial = set(models) != set(DEFAULT_MODELS.split(",")) or set(paths) != set(PATHS)
    write_result("hugepages", result, partial=partial, archive=args.archive, machine_shared=args.machine_shared)


if __name__ == "__main__":
    main()
