"""GGUF export checked in llama.cpp: greedy parity with leanlm, perplexity and speed per type.

For each type (f32, f16, q8_0, q4_0) the model is exported with leanlm.export.export_gguf and
loaded by llama.cpp (llama-cpp-python). Measured:
- greedy parity: new tokens of llama.cpp vs leanlm fp32 on chat prompts (same token ids in);
  tokens equal and index of the first difference;
- perplexity in llama.cpp on WikiText-2 windows (--windows x --seq-len, same token ids as
  leanlm's perplexity), beside leanlm fp32 on the same windows;
- speed (benchmarks/common.py conventions): prefill tok/s at --prompt-len tokens, batch-1
  decode tok/s over --new-tokens after a 32-token prompt, median of --runs interleaved runs,
  --threads threads; leanlm fp32 measured in the same runs;
- file size and export time.

    LEANLM_DATA=../shared/data python benchmarks/bench_export.py          # writes results/export.json
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (LeanlmEngine, LlamaCppEngine, add_result_args, interleaved_speed, machine, print_table,
                    write_result)  # fmt: skip

from leanlm import load
from leanlm.decode.generate import Sampling, encode_prompt, generate_tokens
from leanlm.evaluate.data import wikitext2_test
from leanlm.evaluate.perplexity import make_windows, perplexity
from leanlm.evaluate.speed import fixed_prompt, weight_bytes
from leanlm.export import export_gguf

PROMPTS = ["What is a GPU?", "Name three planets.", "Write a haiku about the sea.",
           "Explain photosynthesis in one sentence.", "What is 12 times 7?"]  # fmt: skip


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        if len(out) == n:
            break
        llm.eval([tok])
    return out


def llama_ppl(llm, windows: list[torch.Tensor]) -> dict:
    nll, count = 0.0, 0
    for w in windows:
        ids = w[0].tolist()
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(np.array(llm.scores[: len(ids) - 1], dtype=np.float32))
        nll += torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    return {"ppl": math.exp(nll / count), "tokens": count, "windows": len(windows)}


DEFAULT_TYPES = "f32,f16,q8_0,q4_0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--greedy-tokens", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--pq-ratio", type=float, default=0.125,
                    help="FFN neurons removed in the pruned+quantized row (0 = skip that row)")
    ap.add_argument("--out-dir", default=None, help="keep the GGUF files here (default: a temporary folder)")
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("bench_export.py loads every exported GGUF in llama.cpp: pip install llama-cpp-python "
                         "(or run benchmarks/setup_peers.sh)") from None

    model, tok = load(args.model)
    windows = make_windows(tok, wikitext2_test(), args.seq_len, args.windows)
    ref_ppl = perplexity(model, tok, wikitext2_test(), args.seq_len, args.windows, progress=False)
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    ours = [list(generate_tokens(model, ids, args.greedy_tokens, Sampling(), set())) for ids in prompts]

    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="leanlm-export-"))
    result = {"model": args.model, "machine": machine(), "threads": args.threads,
              "leanlm_fp32": {"ppl": ref_ppl["ppl"], "tokens": ref_ppl["tokens"]},
              "settings": {k: getattr(args, k) for k in ("seq_len", "windows", "prompt_len", "new_tokens", "runs",
                                                        "greedy_tokens", "pq_ratio")},
              "types": {}}  # fmt: skip
    engines = [LeanlmEngine(model, "leanlm fp32")]

    def check(m, label: str, t: str, ours_ref: list, ours_ppl: float) -> dict:
        """Export m as type t, load it in llama.cpp: greedy parity with leanlm's m, ppl, file size."""
        path = out_dir / f"{args.model}-{label}.gguf"
        t0 = time.time()
        export_gguf(m, tok, path, t, force=True)
        export_s = time.time() - t0
        llm = Llama(model_path=str(path), n_ctx=max(args.seq_len, 1024), n_batch=512, n_threads=args.threads,
                    n_threads_batch=args.threads, logits_all=True, verbose=False)  # fmt: skip
        theirs = [llama_greedy(llm, ids, args.greedy_tokens) for ids in prompts]
        first_diff = [next((i for i, (a, b) in enumerate(zip(o, l)) if a != b), None) for o, l in zip(ours_ref, theirs)]
        ppl = llama_ppl(llm, windows)
        del llm
        r = {"gguf_type": t, "file_mb": path.stat().st_size / 2**20, "export_s": export_s,
             "greedy_equal": sum(o == l for o, l in zip(ours_ref, theirs)), "greedy_prompts": len(prompts),
             "greedy_first_diff": first_diff, "llama_cpp_ppl": ppl["ppl"], "ppl_tokens": ppl["tokens"],
             "leanlm_ppl_same_model": ours_ppl, "ppl_rel_vs_leanlm_fp32": ppl["ppl"] / ref_ppl["ppl"] - 1}  # fmt: skip
        print(label, r, flush=True)
        engines.append(LlamaCppEngine(str(path), f"llama.cpp {label}", args.threads))
        return r

    for t in filter(None, args.types.split(",")):
        result["types"][t] = check(model, t, t, ours, ref_ppl["ppl"])

    if args.pq_ratio > 0:
        # pruned + quantized: FFN neurons removed uniformly (widths stay a multiple of ggml's 32-wide
        # blocks), then int8 RTN per channel in leanlm (float32 compute, so leanlm's greedy is the
        # reference for the exported weights); exported as F32 (exactly leanlm's dequantized weights)
        # and as Q8_0 (ggml re-quantizes them per 32-block).
        import copy

        from leanlm.prune.structured import Structured, prune_structured
        from leanlm.quant import RTN, QuantLinear, quantize, read_calibration

        pq = copy.deepcopy(model)
        calib = read_calibration("wikitext2-valid", tok, 16, 512)
        prune_structured(pq, Structured("neurons", ratio=args.pq_ratio, multiple_of=32), calib, progress=False)
        quantize(pq, RTN(bits=8, group=0, dtype="float32"), progress=False)
        # leanlm's int8 decode kernel rounds activations to int8 per 32 (as llama.cpp's Q8_0 does);
        # the F32 file holds the dequantized weights, so its reference is the same model computed
        # in float (QuantLinear's dequantize-then-matmul path)
        pq_float = copy.deepcopy(pq)
        for m in pq_float.modules():
            if isinstance(m, QuantLinear):
                m.backend = "none"
        pq_ours = [list(generate_tokens(pq, ids, args.greedy_tokens, Sampling(), set())) for ids in prompts]
        pq_ours_float = [list(generate_tokens(pq_float, ids, args.greedy_tokens, Sampling(), set())) for ids in prompts]
        pq_ppl = perplexity(pq, tok, wikitext2_test(), args.seq_len, args.windows, progress=False)["ppl"]
        result["pruned_quantized"] = {"recipe": f"FFN neurons -{args.pq_ratio:.0%} (activation importance) + int8 RTN per channel",
                                      "ffn_dim": pq.config.layers[0].ffn_dim, "weight_mb": weight_bytes(pq) / 2**20,
                                      "base_weight_mb": weight_bytes(model) / 2**20, "leanlm_ppl": pq_ppl}  # fmt: skip
        engines.append(LeanlmEngine(pq, "leanlm pruned+int8"))
        result["pruned_quantized"]["leanlm_int8_kernel_vs_float_greedy_equal"] = sum(
            a == b for a, b in zip(pq_ours, pq_ours_float))
        result["types"]["pruned+int8/f32"] = check(pq, "pruned+int8-f32", "f32", pq_ours_float, pq_ppl)
        result["types"]["pruned+int8/q8_0"] = check(pq, "pruned+int8-q8_0", "q8_0", pq_ours, pq_ppl)
    save(result, args, final=False)  # parity and ppl first: the speed runs below take longest
    prompt = fixed_prompt(model.config.vocab_size, args.prompt_len)
    short = fixed_prompt(model.config.vocab_size, 32, seed=1)
    speed = interleaved_speed(engines, prompt, short, args.new_tokens, args.runs)
    result["speed"] = speed
    for t in result["types"]:
        s = speed[f"llama.cpp {t.replace('/', '-')}"]
        result["types"][t].update(prefill_tok_s=s["prefill_tok_s"], decode_tok_s=s["decode_tok_s"])
    rows = [{"type": e.name, "ppl": "-", "greedy": "-", "MB": "-", "prefill": f"{speed[e.name]['prefill_tok_s']:.0f}",
             "decode": f"{speed[e.name]['decode_tok_s']:.1f}"} for e in engines if e.name.startswith("leanlm")]  # fmt: skip
    for t, r in result["types"].items():
        rows.append({"type": f"llama.cpp {t}", "ppl": f"{r['llama_cpp_ppl']:.3f}", "greedy": f"{r['greedy_equal']}/{r['greedy_prompts']}",
                     "MB": f"{r['file_mb']:.0f}", "prefill": f"{r['prefill_tok_s']:.0f}", "decode": f"{r['decode_tok_s']:.1f}"})  # fmt: skip
    print_table(rows, ["type", "ppl", "greedy", "MB", "prefill", "decode"])
    save(result, args, final=True)


def save(result: dict, args, final: bool) -> None:
    """results/export.json when every default type and the pruned+quantized row ran; else the archive."""
    partial = args.types != DEFAULT_TYPES or args.pq_ratio <= 0
    write_result("export", result, checkpoint=not final, partial=partial, archive=args.archive,
                 machine_shared=args.machine_shared)


if __name__ == "__main__":
    main()
