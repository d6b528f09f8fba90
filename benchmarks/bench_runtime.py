"""leanlm's runtime vs its peers on one model, same token ids, one process, interleaved runs.

Measures (DESIGN.md conventions): WikiText-2 perplexity on 40x512 windows (leanlm fp32,
leanlm bf16, transformers fp32), prefill tok/s at 512 tokens, time to first token, batch-1
decode tok/s over 128 new tokens after a 32-token prompt (median of --runs runs after a
warm-up), weight memory. Peers: transformers fp32/bf16 always; llama.cpp (llama-cpp-python)
and OpenVINO GenAI on the model's own GGUF when those packages are installed.

    LEANLM_DATA=../shared/data python benchmarks/bench_runtime.py            # SmolLM2-135M
    python benchmarks/bench_runtime.py --model gemma3-270m --no-ppl
Writes benchmarks/results/runtime_<model>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch
from common import (HFEngine, LeanlmEngine, LlamaCppEngine, OpenVINOEngine, interleaved_speed, machine,
                    print_table, write_result)  # fmt: skip

from leanlm import load
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    m32, tok = load(args.model, "float32")
    m16, _ = load(args.model, "bfloat16")
    result = {"model": args.model, "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "settings": vars(args)}  # fmt: skip

    if not args.no_ppl:
        text = wikitext2_test()
        hf32 = HFEngine(m32.directory, torch.float32, "transformers-fp32").model
        ppl = {
            "leanlm-fp32": perplexity(m32, tok, text, 512, args.windows),
            "leanlm-bf16": perplexity(m16, tok, text, 512, args.windows),
            "transformers-fp32": perplexity(hf32, tok, text, 512, args.windows),
        }
        del hf32
        result["perplexity"] = ppl
        base = ppl["transformers-fp32"]["ppl"]
        result["perplexity_check"] = {
            "leanlm_fp32_equals_transformers_4_sig_digits": f"{ppl['leanlm-fp32']['ppl']:.4g}" == f"{base:.4g}",
            "leanlm_bf16_rel_change_vs_fp32": ppl["leanlm-bf16"]["ppl"] / ppl["leanlm-fp32"]["ppl"] - 1,
        }

    # leanlm decodes with its native small-row kernel on row-major weights (prepare_decode, as
    # `leanlm generate` / `eval --speed` do); beside it, for a same-run A/B, the same models with
    # ATen's GEMVs (fp32 on the column-major layout ATen streams fastest)
    m32.prepare_decode()
    m32_aten, _ = load(args.model, "float32")
    m32_aten.set_decode_layout(True)
    engines = [LeanlmEngine(m32, "leanlm-fp32"), LeanlmEngine(m16, "leanlm-bf16"),
               LeanlmEngine(m32_aten, "leanlm-fp32-aten-gemv", small_kernel=False),
               LeanlmEngine(m16, "leanlm-bf16-aten-gemv", small_kernel=False),
               HFEngine(m32.directory, torch.float32, "transformers-fp32"),
               HFEngine(m32.directory, torch.bfloat16, "transformers-bf16")]  # fmt: skip
    gguf = str(DEFAULT_MODELS[args.model]()) if args.model in DEFAULT_MODELS else None
    if gguf and not args.no_peers:
        if importlib.util.find_spec("llama_cpp"):
            engines.append(LlamaCppEngine(gguf, "llama.cpp-gguf", args.threads))
        if importlib.util.find_spec("openvino_genai"):
            try:
                engines.append(OpenVINOEngine(gguf, "openvino-gguf", args.threads))
            except Exception as e:  # OpenVINO's GGUF reader supports a subset of architectures
                result["openvino_error"] = f"{type(e).__name__}: {e}"[:300]
    prompt = fixed_prompt(m32.config.vocab_size, args.prompt_len)
    short = fixed_prompt(m32.config.vocab_size, 32, seed=1)
    speed = interleaved_speed(engines, prompt, short, args.new_tokens, args.runs)
    result["speed"] = speed
    result["memory"] = {"leanlm-fp32": memory_report(m32), "leanlm-bf16": memory_report(m16)}

    hf, hf16 = speed["transformers-fp32"], speed["transformers-bf16"]
    ratios = {}
    for name in ("leanlm-fp32", "leanlm-bf16", "leanlm-fp32-aten-gemv", "leanlm-bf16-aten-gemv"):
        s = speed[name]
        ratios[name] = {
            "decode_vs_transformers_fp32": s["decode_tok_s"] / hf["decode_tok_s"],
            "decode_vs_transformers_bf16": s["decode_tok_s"] / hf16["decode_tok_s"],
            "prefill_vs_transformers_fp32": s["prefill_tok_s"] / hf["prefill_tok_s"],
            "prefill_vs_transformers_bf16": s["prefill_tok_s"] / hf16["prefill_tok_s"],
        }
    result["ratios"] = ratios

    rows = []
    for name, s in speed.items():
        row = {"engine": name, "prefill tok/s": s["prefill_tok_s"], "TTFT ms": s["ttft_ms"], "decode tok/s": s["decode_tok_s"]}
        if "perplexity" in result and name in result["perplexity"]:
            row["ppl"] = result["perplexity"][name]["ppl"]
        rows.append(row)
    print_table(rows, ["engine", "ppl", "prefill tok/s", "TTFT ms", "decode tok/s"])
    for name, r in ratios.items():
        print(name, {k: round(v, 3) for k, v in r.items()})
    write_result(f"runtime_{args.model}", result)


if __name__ == "__main__":
    main()
