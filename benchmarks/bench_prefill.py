"""Prefill speed: leanlm vs OpenVINO GenAI at equal bits, same token ids, one process, engines interleaved.

Pairs (leanlm / OpenVINO on a GGUF that leanlm.export wrote from the same base weights):
- bf16: leanlm bf16 vs OpenVINO F16
- int8: leanlm int8 RTN per channel (symmetric) vs OpenVINO Q8_0
- int4: leanlm int4 RTN group 128 vs OpenVINO Q4_0
--ab adds leanlm's previous multi-row paths as extra engines in the same run (bf16 widened to an fp32 GEMM;
low-bit weights dequantized to an fp32 GEMM), so what the bf16 GEMM and the int8 GEMM (csrc/gemm_int8.cpp)
bought is a same-run ratio too.

Measure: prefill tok/s at --prompt-len tokens (time to the first token, one forward with the LM head on the
last position), median of --runs interleaved runs after a warm-up. Only same-run ratios mean anything on a
shared machine.

    LEANLM_DATA=../shared/data python benchmarks/bench_prefill.py                       # SmolLM2-135M
    LEANLM_DATA=../shared/data python benchmarks/bench_prefill.py --models smollm2-135m qwen2.5-0.5b --ab
Writes benchmarks/results/prefill.json (any narrowing flag: partial, to the archive).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import tempfile
from pathlib import Path

import torch
from common import LeanlmEngine, OpenVINOEngine, add_result_args, machine, median, print_table, write_result

from leanlm import LeanlmError, load
from leanlm.evaluate.speed import fixed_prompt

PAIRS = {"bf16": "f16", "int8": "q8_0", "int4": "q4_0"}  # leanlm label -> GGUF type OpenVINO runs


@contextlib.contextmanager
def previous_paths():
    """Within: the multi-row paths before this benchmark's kernels (bf16 widened to fp32; low-bit weights
    dequantized to fp32), for a same-run A/B."""
    from leanlm import native
    from leanlm.quant.packed import QuantLinear

    native.bf16_matmul()  # fill the cache before overriding it
    saved = native._state["bf16"], QuantLinear.int8_gemm
    native._state["bf16"], QuantLinear.int8_gemm = False, False
    try:
        yield
    finally:
        native._state["bf16"], QuantLinear.int8_gemm = saved


class PreviousPathEngine(LeanlmEngine):
    def prefill(self, ids):
        with previous_paths():
            return super().prefill(ids)


def leanlm_models(name: str) -> tuple:
    from leanlm.quant import RTN, quantize

    m32, tok = load(name, "float32")
    m16, _ = load(name, "bfloat16")
    return m32, tok, {"bf16": m16,
                      "int8": quantize(copy.deepcopy(m32), RTN(bits=8, group=0, symmetric=True), progress=False),
                      "int4": quantize(copy.deepcopy(m32), RTN(bits=4, group=128), progress=False)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    ap.add_argument("--bits", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--ab", action="store_true", help="also leanlm's previous multi-row paths (same-run A/B)")
    ap.add_argument("--no-peers", action="store_true", help="leanlm only (no OpenVINO)")
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from leanlm import native, ops

    result = {"machine": machine(), "settings": vars(args), "skipped": {}, "models": {},
              "kernels": {"isa": ops.isa(), "bf16_gemm": native.bf16_matmul(), "int8_gemm": ops.q_gemm_usable()}}  # fmt: skip
    have_ov = importlib.util.find_spec("openvino_genai") is not None and not args.no_peers
    if not have_ov:
        result["skipped"]["openvino"] = "--no-peers" if args.no_peers else "openvino-genai not installed"
    partial = args.no_peers or not have_ov or args.bits != list(PAIRS)
    tmp = Path(tempfile.mkdtemp(prefix="bench_prefill_"))
    for name in args.models:
        try:
            m32, tok, models = leanlm_models(name)
        except LeanlmError as e:  # a model that is not installed here
            result["skipped"][name] = str(e)[:300]
            partial = True
            continue
        engines, pairs = [], {}
        for bits in args.bits:
            engines.append(LeanlmEngine(models[bits], f"leanlm-{bits}"))
            if args.ab:
                engines.append(PreviousPathEngine(models[bits], f"leanlm-{bits}-previous"))
            if have_ov:
                try:
                    from leanlm.export import export_gguf

                    gguf = export_gguf(m32, tok, tmp / f"{name}-{PAIRS[bits]}.gguf", PAIRS[bits], force=True)
                    engines.append(OpenVINOEngine(str(gguf), f"openvino-{PAIRS[bits]}", args.threads))
                    pairs[bits] = (f"leanlm-{bits}", f"openvino-{PAIRS[bits]}")
                except Exception as e:  # GGUF export covers the Llama family; OpenVINO's reader a subset
                    result["skipped"][f"{name}-openvino-{PAIRS[bits]}"] = f"{type(e).__name__}: {e}"[:300]
                    partial = True
        prompt = fixed_prompt(m32.config.vocab_size, args.prompt_len)
        runs: dict[str, list[float]] = {e.name: [] for e in engines}
        for r in range(1 + args.runs):  # the first round warms up
            for e in engines:
                s = e.prefill(prompt)
                if r:
                    runs[e.name].append(len(prompt) / s)
        speed = {n: {"prefill_tok_s": median(v), "prefill_tok_s_runs": v} for n, v in runs.items()}
        ratios = {bits: speed[a]["prefill_tok_s"] / speed[b]["prefill_tok_s"] for bits, (a, b) in pairs.items()}
        if args.ab:
            ratios.update({f"{bits}_vs_previous": speed[f"leanlm-{bits}"]["prefill_tok_s"]
                           / speed[f"leanlm-{bits}-previous"]["prefill_tok_s"] for bits in args.bits})  # fmt: skip
        result["models"][name] = {"speed": speed, "leanlm_vs_openvino": ratios}
        rows = [{"model": name, "engine": n, "prefill tok/s": s["prefill_tok_s"]} for n, s in speed.items()]
        print_table(rows, ["model", "engine", "prefill tok/s"])
        print(name, {k: round(v, 3) for k, v in ratios.items()})
        del models, m32
    result["summary"] = {name: r["leanlm_vs_openvino"] for name, r in result["models"].items()}
    write_result("prefill", result, partial=partial, archive=args.archive, machine_shared=args.machine_shared)


if __name__ == "__main__":
    main()
