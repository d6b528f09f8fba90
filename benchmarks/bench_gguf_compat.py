"""llama.cpp runs leanlm's GGUF exports of every real model: logit agreement per model and type.

For each installed real model and each GGUF type, the model is exported with leanlm.export.export_gguf and loaded
by llama.cpp (llama-cpp-python, default F16 KV cache, --threads threads). On a few short prompts (the same token
ids go into both engines) it measures, over every prompt position:
- top-1 agreement of the next-token logits (fraction of positions with the same argmax);
- mean KL(leanlm || llama.cpp) of the next-token distributions, in nats;
- the Pearson correlation of the last position's logits and their largest absolute difference;
- greedy parity: the first --greedy-tokens new tokens equal (and the index of the first difference).
The reference is leanlm's own forward of the same model (fp32 for dense exports). "exact" rows are leanlm-quantized
models (RTN, group 32, symmetric) exported with their own codes (Q8_0 = int8, Q4_0 = int4, IQ4_NL = the IQ4_NL
table grid): there the reference is the quantized model itself. File size and export time are recorded too
(export time: shared machine, indicative only).

    python benchmarks/bench_gguf_compat.py                    # writes benchmarks/results/gguf_compat.json
    python benchmarks/bench_gguf_compat.py --models smollm2-135m --types q4_k   # a partial run: archive
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import add_result_args, machine, print_table, write_result

from leanlm import LeanlmError, load
from leanlm.decode.generate import Sampling, encode_prompt, generate_tokens
from leanlm.export import export_gguf
from leanlm.export.gguf import summarize_report

PROMPTS = ["The capital of France is Paris. The capital of Italy is", "What is a GPU?",
           "def fibonacci(n):\n    "]  # fmt: skip
ALL_TYPES = ["f16", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "iq4_nl"]
# every type on the small models; the bigger ones get the types their users pick most (numpy K-quant / IQ4_NL
# quantizers take minutes per billion weights)
DEFAULT_TYPES = {"smollm2-135m": ALL_TYPES, "gemma3-270m": ALL_TYPES, "qwen2.5-0.5b": ["f16", "q8_0", "q4_k", "q6_k"],
                 "qwen2.5-1.5b": ["q8_0", "q4_k"]}  # fmt: skip
EXACT = {"int8-g32-sym": ("q8_0", dict(bits=8)), "int4-g32-sym": ("q4_0", dict(bits=4)),
         "iq4nl-g32": ("iq4_nl", dict(bits=4, levels="iq4nl"))}  # fmt: skip


def softmax_log(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(model, tok, path: Path, prompts: list[list[int]], greedy: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)  # fmt: skip
    top1, kls, corr, max_abs, equal, first_diff = [], [], [], [], 0, []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)], dtype=np.float64)
        with torch.inference_mode():
            ours = model(torch.tensor([ids]))[0].double().numpy()
        top1 += list(ours.argmax(-1) == theirs.argmax(-1))
        lp, lq = softmax_log(ours), softmax_log(theirs)
        kls += list((np.exp(lp) * (lp - lq)).sum(-1))
        corr.append(float(np.corrcoef(ours[-1], theirs[-1])[0, 1]))
        max_abs.append(float(np.abs(ours[-1] - theirs[-1]).max()))
        mine = list(generate_tokens(model, ids, greedy, Sampling(), set()))
        llm.reset()
        llm.eval(ids)
        other = []
        for _ in range(greedy):
            other.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if len(other) < greedy:
                llm.eval([other[-1]])
        equal += mine == other
        first_diff.append(next((i for i, (a, b) in enumerate(zip(mine, other)) if a != b), None))
    del llm
    return {"top1_agreement": float(np.mean(top1)), "positions": len(top1), "mean_kl": float(np.mean(kls)),
            "max_kl": float(np.max(kls)), "last_logits_corr_min": min(corr), "last_logits_max_abs": max(max_abs),
            "greedy_equal": equal, "greedy_prompts": len(prompts), "greedy_first_diff": first_diff}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_TYPES))
    ap.add_argument("--types", default=None, help="comma-separated GGUF types for every model (default: per model, "
                    "see DEFAULT_TYPES)")  # fmt: skip
    ap.add_argument("--exact", default=",".join(EXACT), help="leanlm-quantized rows on smollm2-135m ('' = none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--greedy-tokens", type=int, default=16)
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("pip install llama-cpp-python (or run benchmarks/setup_peers.sh)") from None
    partial = args.models != ",".join(DEFAULT_TYPES) or args.types is not None or args.exact != ",".join(EXACT)
    result = {"machine": machine(), "threads": args.threads, "llama_cpp_python": llama_cpp.__version__,
              "prompts": PROMPTS, "greedy_tokens": args.greedy_tokens, "models": {}, "exact": {}}  # fmt: skip
    out_dir = Path(tempfile.mkdtemp(prefix="leanlm-gguf-compat-"))
    rows = []

    def run(model, tok, label: str, t: str, key: dict) -> None:
        path = out_dir / f"{label}-{t}.gguf"
        report: dict = {}
        t0 = time.time()
        export_gguf(model, tok, path, t, force=True, report=report)
        r = {"export_s": round(time.time() - t0, 1), "file_mb": path.stat().st_size / 2**20,
             "tensors": summarize_report(report)}  # fmt: skip
        prompts = [encode_prompt(tok, p) for p in PROMPTS]
        r.update(compare(model, tok, path, prompts, args.greedy_tokens, args.threads))
        path.unlink()
        key[t] = r
        print(label, t, r, flush=True)
        rows.append({"model": label, "type": t, "top1": f"{r['top1_agreement']:.3f}", "KL": f"{r['mean_kl']:.4f}",
                     "corr": f"{r['last_logits_corr_min']:.4f}", "greedy": f"{r['greedy_equal']}/{r['greedy_prompts']}",
                     "MB": f"{r['file_mb']:.0f}"})  # fmt: skip
        write_result("gguf_compat", result, checkpoint=True, partial=partial, archive=args.archive,
                     machine_shared=args.machine_shared)

    for name in filter(None, args.models.split(",")):
        try:
            model, tok = load(name)
        except LeanlmError as e:
            result["models"][name] = {"not_run": str(e)}
            print(name, "not run:", e)
            continue
        result["models"][name] = {"arch": model.config.model_type, "types": {}}
        types = args.types.split(",") if args.types else DEFAULT_TYPES.get(name, ["q8_0"])
        for t in types:
            run(model, tok, name, t, result["models"][name]["types"])
        del model
    if args.exact:
        from leanlm.quant import quantize
        from leanlm.quant.config import RTN

        base, tok = load("smollm2-135m")
        for label in filter(None, args.exact.split(",")):
            t, kw = EXACT[label]
            m = copy.deepcopy(base)
            quantize(m, RTN(group=32, symmetric=True, dtype="float32", **kw), progress=False)
            run(m, tok, f"smollm2-135m {label}", t, result["exact"].setdefault(label, {}))
            del m
    print_table(rows, ["model", "type", "top1", "KL", "corr", "greedy", "MB"])
    write_result("gguf_compat", result, partial=partial, archive=args.archive, machine_shared=args.machine_shared)


if __name__ == "__main__":
    main()
