"""The headline: leanlm vs llama.cpp vs OpenVINO GenAI vs transformers on one model, by weight bits,
same token ids, one process, engines interleaved run by run.

Engines (each row's "bits" group):
- 16-bit: leanlm bf16, transformers bf16, llama.cpp F16 and OpenVINO F16 (a GGUF exported from the same
  base weights by leanlm.export); 32-bit: leanlm fp32, transformers fp32 (the reference).
- 8-bit: leanlm int8 (RTN, per channel) beside llama.cpp / OpenVINO Q8_0 of the same weights.
- 4-bit: leanlm int4 (RTN, group 128) beside llama.cpp / OpenVINO Q4_0 of the same weights, and both peers
  on the model's own 4-bit GGUF (the file the base weights were dequantized from).
A peer that is not installed, or cannot read a file (GGUF export covers the Llama family; OpenVINO's GGUF
reader covers a subset), is skipped and the reason recorded under "skipped".

Measures (DESIGN.md conventions): prefill tok/s at --prompt-len tokens, time to first token, batch-1 decode
tok/s over --new-tokens after a 32-token prompt, median of --runs runs after a warm-up; WikiText-2 perplexity
on --windows x 512 (leanlm fp32 / bf16 / int8 / int4, transformers fp32); weight memory.
Ratios (same run): decode and prefill against the fastest engine of the same bits, and against llama.cpp
of the same bits.

    LEANLM_DATA=../shared/data python benchmarks/bench_runtime.py                       # SmolLM2-135M
    LEANLM_DATA=../shared/data python benchmarks/bench_runtime.py --model gemma3-270m
Writes benchmarks/results/runtime_<model>.json (--no-ppl / --no-peers / --no-quant: partial, to the archive).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
from pathlib import Path

import torch
from common import (HFEngine, LeanlmEngine, LlamaCppEngine, OpenVINOEngine, add_result_args, interleaved_speed,
                    leanlm_quant_configs, machine, print_table, write_result)  # fmt: skip

from leanlm import LeanlmError, load
from leanlm.evaluate.data import wikitext2_test
from leanlm.evaluate.perplexity import perplexity
from leanlm.evaluate.speed import fixed_prompt, memory_report
from leanlm.model.load import DEFAULT_MODELS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--no-peers", action="store_true", help="skip llama.cpp / OpenVINO even if installed")
    ap.add_argument("--no-quant", action="store_true", help="skip the int8 / int4 rows")
    ap.add_argument("--aten-ab", action="store_true",
                    help="also leanlm with ATen's GEMVs instead of its small-row kernel (a same-run A/B)")
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    partial = args.no_ppl or args.no_peers or args.no_quant
    from leanlm.quant import quantize

    m32, tok = load(args.model, "float32")
    m16, _ = load(args.model, "bfloat16")
    result = {"model": args.model, "machine": machine(), "settings": vars(args), "skipped": {},
              "baselines": "ratios are against the fastest engine of the same bits (bits_group) and against "
              "llama.cpp of the same bits, in the same interleaved run"}  # fmt: skip
    quant = {}
    if not args.no_quant:
        for label, cfg in leanlm_quant_configs().items():
            quant[label] = quantize(copy.deepcopy(m32), cfg, progress=False)

    if not args.no_ppl:
        text = wikitext2_test()
        hf32 = HFEngine(m32.directory, torch.float32, "transformers-fp32").model
        ppl = {"leanlm-fp32": perplexity(m32, tok, text, 512, args.windows),
               "leanlm-bf16": perplexity(m16, tok, text, 512, args.windows),
               **{k: perplexity(m, tok, text, 512, args.windows) for k, m in quant.items()},
               "transformers-fp32": perplexity(hf32, tok, text, 512, args.windows)}  # fmt: skip
        del hf32
        result["perplexity"] = ppl
        result["perplexity_check"] = {
            "leanlm_fp32_equals_transformers_4_sig_digits":
                f"{ppl['leanlm-fp32']['ppl']:.4g}" == f"{ppl['transformers-fp32']['ppl']:.4g}",
            "leanlm_bf16_rel_change_vs_fp32": ppl["leanlm-bf16"]["ppl"] / ppl["leanlm-fp32"]["ppl"] - 1,
        }  # fmt: skip

    # each LeanlmEngine prepares its model for decode, as `leanlm generate` does (common.LeanlmEngine)
    bits = {"leanlm-fp32": 32, "leanlm-bf16": 16, "transformers-fp32": 32, "transformers-bf16": 16}
    engines = [LeanlmEngine(m32, "leanlm-fp32"), LeanlmEngine(m16, "leanlm-bf16")]
    for label, m in quant.items():
        engines.append(LeanlmEngine(m, label))
        bits[label] = 8 if "int8" in label else 4
    if args.aten_ab:
        m32_aten, _ = load(args.model, "float32")
        m32_aten.set_decode_layout(True)
        engines += [LeanlmEngine(m32_aten, "leanlm-fp32-aten-gemv", small_kernel=False, prepare=False),
                    LeanlmEngine(m16, "leanlm-bf16-aten-gemv", small_kernel=False, prepare=False)]  # fmt: skip
        bits.update({"leanlm-fp32-aten-gemv": 32, "leanlm-bf16-aten-gemv": 16})
    engines += [HFEngine(m32.directory, torch.float32, "transformers-fp32"),
                HFEngine(m32.directory, torch.bfloat16, "transformers-bf16")]  # fmt: skip
    result["peers_installed"] = {p: importlib.util.find_spec(p) is not None for p in ("llama_cpp", "openvino_genai")}
    if args.no_peers:
        result["skipped"]["peers"] = "--no-peers"
    else:
        engines += peer_engines(args, m32, tok, bits, result["skipped"])
    prompt = fixed_prompt(m32.config.vocab_size, args.prompt_len)
    short = fixed_prompt(m32.config.vocab_size, 32, seed=1)
    speed = interleaved_speed(engines, prompt, short, args.new_tokens, args.runs)
    for name, s in speed.items():
        s["bits_group"] = bits[name]
    result["speed"] = speed
    result["memory"] = {"leanlm-fp32": memory_report(m32), "leanlm-bf16": memory_report(m16),
                        **{k: memory_report(m) for k, m in quant.items()}}  # fmt: skip
    result["ratios"] = same_bits_ratios(speed)

    rows = [{"engine": n, "bits": s["bits_group"], "prefill tok/s": s["prefill_tok_s"], "TTFT ms": s["ttft_ms"],
             "decode tok/s": s["decode_tok_s"], "decode / fastest same bits": result["ratios"][n]["decode_vs_fastest"]}
            for n, s in speed.items()]  # fmt: skip
    print_table(rows, ["engine", "bits", "prefill tok/s", "TTFT ms", "decode tok/s", "decode / fastest same bits"])
    write_result(f"runtime_{args.model}", result, partial=partial, archive=args.archive,
                 machine_shared=args.machine_shared)


def peer_engines(args, m32, tok, bits: dict, skipped: dict) -> list:
    """llama.cpp and OpenVINO on GGUFs exported from the same base weights (F16, Q8_0, Q4_0) and on the
    model's own GGUF; what cannot run is recorded in `skipped`."""
    have_llama = importlib.util.find_spec("llama_cpp") is not None
    have_ov = importlib.util.find_spec("openvino_genai") is not None
    if not have_llama:
        skipped["llama.cpp"] = "llama-cpp-python not installed (benchmarks/setup_peers.sh)"
    if not have_ov:
        skipped["openvino"] = "openvino-genai not installed (benchmarks/setup_peers.sh)"
    files = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_runtime_"))
    if have_llama or have_ov:
        from leanlm.export import export_gguf

        for t, b in (("f16", 16), ("q8_0", 8), ("q4_0", 4)):
            try:
                files[t] = (str(export_gguf(m32, tok, tmp / f"{args.model}-{t}.gguf", t, force=True)), b)
            except LeanlmError as e:  # GGUF export covers the Llama family only
                skipped[f"export-{t}"] = str(e)[:300]
        m32.prepare_decode()  # export switched the layout back to row-major
        if args.model in DEFAULT_MODELS:
            files["own"] = (str(DEFAULT_MODELS[args.model]()), 4)
    engines = []
    for t, (path, b) in files.items():
        for peer, ok, make in (("llama.cpp", have_llama, lambda p, n: LlamaCppEngine(p, n, args.threads)),
                               ("openvino", have_ov, lambda p, n: OpenVINOEngine(p, n, args.threads))):  # fmt: skip
            if not ok:
                continue
            name = f"{peer}-{t}-gguf"
            try:
                engines.append(make(path, name))
                bits[name] = b
            except Exception as e:  # a reader that does not support this architecture or type
                skipped[name] = f"{type(e).__name__}: {e}"[:300]
    return engines


def same_bits_ratios(speed: dict) -> dict:
    """Per engine: decode / prefill against the fastest engine of the same bits and against llama.cpp's."""
    out = {}
    for name, s in speed.items():
        group = {n: v for n, v in speed.items() if v["bits_group"] == s["bits_group"]}
        r = {}
        for kind in ("decode", "prefill"):
            key = f"{kind}_tok_s"
            fastest = max(group, key=lambda n: group[n][key])
            r[f"{kind}_vs_fastest"] = s[key] / group[fastest][key]
            r[f"{kind}_fastest_engine"] = fastest
            llama = [n for n in group if n.startswith("llama.cpp") and "-own-" not in n]
            if llama:
                r[f"{kind}_vs_llama_cpp"] = s[key] / group[llama[0]][key]
                r[f"{kind}_llama_cpp_engine"] = llama[0]
        out[name] = r
    return out


if __name__ == "__main__":
    main()
