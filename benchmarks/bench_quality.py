"""Quality at equal bits per weight: leanlm's int8 / int4 / 4-bit table grids beside llama.cpp's own quants.

One model (Qwen2.5-0.5B by default), fixed windows of two texts, the float32 leanlm model as the reference:
WikiText-2 test (10 x 512 tokens) and a Gutenberg book (its middle third: past the header), ppl and
KL(fp32 || candidate), top-1 agreement. Rows:

- leanlm: int8 RTN per channel, int8 RTN g32 / g64 (the Q8_0-like tier: head and embeddings g32 / g64 too),
  int4 g128 GPTQ (act-order, clipped static grids: examples/recipes/gptq-int4.yaml), and the 4-bit table grids
  (quant/codebook.py): IQ4_NL's table and a learned table per tensor, g64 (4.25 bits like int4 g128 asym) and g32,
  with RTN and GPTQ. GPTQ calibrates on WikiText-2 *validation* windows (never the eval split nor the book).
  leanlm models are scored through the decode kernels' numerics: uniform grids through q_gemm / q_linear (activations
  int8 per 32) where the CPU has VNNI, table grids through their kernel 16 rows per call (CodebookLinear.kernel_all_rows).
- llama.cpp: Q8_0, Q4_0, Q4_K_M, IQ4_NL made by llama.cpp's own convert_hf_to_gguf.py (F16) + llama-quantize from
  the same HF directory (benchmarks/llamacpp_tools.py; no importance matrix), scored on the same token windows through
  llama-cpp-python's logits (logits_all).

bpw: storage bits per weight of the whole model (every tensor: decoder Linears with their scales / zeros, the LM head,
embeddings counted once when tied, norms) over its parameter count; llama.cpp's from the GGUF's tensor bytes.
`source_grid`: the GGUF type family the leanlm checkpoint was converted from (the Q5_0 source of Qwen2.5-Coder-0.5B);
a llama.cpp row whose types include it partly reproduces the source's rounding (ISSUE 23's trap) and is marked.

Decode speed: tok/s at batch 1 (32 new tokens after a 32-token prompt), the models of each pair interleaved in this
process (int8 g32 vs int8 per channel; the table grids vs int4 g128), median of --speed-runs.

    LEANLM_DATA=/path/to/data python benchmarks/bench_quality.py                 # everything (about 1 h on 2 cores)
    LEANLM_DATA=... python benchmarks/bench_quality.py --only int8 --no-llamacpp  # a quick partial run

Writes benchmarks/results/quality_<model>.json (archive/ for partial runs).
"""

from __future__ import annotations

import argparse
import gc
import math
import time

import torch
from common import QualityRef, add_result_args, machine, window_scores, write_result

from leanlm.evaluate.data import read_text, wikitext2_test
from leanlm.evaluate.perplexity import make_windows
from leanlm.decode.generate import GenerationStats, generate_tokens
from leanlm.evaluate.speed import fixed_prompt, weight_bytes
from leanlm.model import load_model
from leanlm.model.load import load_tokenizer, resolve
from leanlm.quant import GPTQ, RTN, CodebookLinear, quantize, read_calibration

# row name -> its quantization config
LEANLM_ROWS = {
    "int8-pc": lambda: RTN(bits=8, group=0, symmetric=True),
    "int8-g64": lambda: RTN(bits=8, group=64, symmetric=True),
    "int8-g32": lambda: RTN(bits=8, group=32, symmetric=True),
    "int4-g128-gptq": lambda: GPTQ(bits=4, group=128, act_order=True, clip=True),
    "int4-g128-rtn": lambda: RTN(bits=4, group=128),
    "cb4-iq4nl-g64-rtn": lambda: RTN(bits=4, group=64, symmetric=True, levels="iq4nl"),
    "cb4-iq4nl-g64-gptq": lambda: GPTQ(bits=4, group=64, symmetric=True, levels="iq4nl", act_order=True),
    "cb4-learned-g64-gptq": lambda: GPTQ(bits=4, group=64, symmetric=True, levels="learned", act_order=True),
    "cb4-iq4nl-g32-gptq": lambda: GPTQ(bits=4, group=32, symmetric=True, levels="iq4nl", act_order=True),
}
GGUF_ROWS = ("q8_0", "q4_0", "q4_k_m", "iq4_nl")
SPEED_PAIRS = (("int8-g32", "int8-pc"), ("cb4-iq4nl-g64-gptq", "int4-g128-gptq"),
               ("cb4-learned-g64-gptq", "int4-g128-gptq"), ("cb4-iq4nl-g64-rtn", "int4-g128-rtn"))  # fmt: skip
# the GGUF type of each model's source checkpoint (leanlm's named models are converted from these GGUFs)
SOURCE_GRID = {"qwen2.5-0.5b": "q5_0", "smollm2-135m": "q4_1", "qwen2.5-1.5b": "q4_k"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def book_windows(tok, name: str, seq_len: int, n: int) -> list[torch.Tensor]:
    text = read_text(name)
    return make_windows(tok, text[len(text) // 3 :], seq_len, n)


def model_bpw(model, n_params: int) -> float:
    return weight_bytes(model) * 8 / n_params


def delta(r: dict) -> float:
    return 100 * (r["ppl"] / r["ppl_base"] - 1)


def decode_tok_s(model, new_tokens: int = 32) -> float:
    st = GenerationStats()
    for _ in generate_tokens(model, fixed_prompt(model.config.vocab_size, 32, seed=1), new_tokens, eos_ids=set(),
                             stats=st):  # fmt: skip
        pass
    return st.decode_tok_s


def gguf_scores(path, refs: dict, threads: int) -> dict:
    """ppl / KL / top-1 of a GGUF on the refs' windows, from llama-cpp-python's logits."""
    import llama_cpp
    import torch.nn.functional as F

    seq = max(w.shape[1] for ref in refs.values() for w in ref.windows)
    llm = llama_cpp.Llama(str(path), n_ctx=seq, n_batch=seq, n_ubatch=seq, logits_all=True, n_threads=threads,
                          verbose=False)  # fmt: skip
    out = {}
    for text, ref in refs.items():
        kl = agree = nll_c = nll_b = 0.0
        count = 0
        for w, lb in zip(ref.windows, ref.base_lp):
            llm.reset()
            llm.eval(w[0].tolist())
            V = lb.shape[-1]
            logits = torch.from_numpy(llm.scores[: w.shape[1] - 1].copy()).float()
            if logits.shape[-1] != V:
                raise RuntimeError(f"{path}: vocabulary {logits.shape[-1]} != the reference's {V}")
            target = w[0, 1:]
            k, a, n = window_scores(lb, F.log_softmax(logits, -1), target)
            kl, agree, nll_c = kl + k, agree + a, nll_c + n
            nll_b -= lb.gather(-1, target[:, None]).sum().item()
            count += target.numel()
        out[text] = {"ppl": math.exp(nll_c / count), "ppl_base": math.exp(nll_b / count), "kl": kl / count,
                     "top1_agreement": agree / count, "tokens": count, "windows": len(ref.windows)}  # fmt: skip
    del llm
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--windows", type=int, default=10, help="windows of --seq-len per text")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--book", default="pride-and-prejudice")
    ap.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows (WikiText-2 validation)")
    ap.add_argument("--only", nargs="*", help="leanlm rows whose name contains one of these (default: all)")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp rows")
    ap.add_argument("--gguf-types", nargs="*", default=list(GGUF_ROWS))
    ap.add_argument("--speed-runs", type=int, default=5, help="interleaved decode runs per model (0: no speed)")
    ap.add_argument("--threads", type=int, default=2)
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    CodebookLinear.kernel_all_rows = True  # score table grids with the decode kernel's numerics

    directory = resolve(args.model)
    base, tok = load_model(directory, "float32"), load_tokenizer(directory)
    n_params = sum(p.numel() for p in base.parameters())
    refs = {"wikitext2": QualityRef(base, make_windows(tok, wikitext2_test(), args.seq_len, args.windows)),
            "book": QualityRef(base, book_windows(tok, args.book, args.seq_len, args.windows))}  # fmt: skip
    base_bpw = model_bpw(base, n_params)
    del base
    gc.collect()
    rows = [n for n in LEANLM_ROWS if not args.only or any(o in n for o in args.only)]
    partial = bool(args.only) or args.no_llamacpp or set(args.gguf_types) != set(GGUF_ROWS)
    result = {"machine": machine(), "settings": vars(args), "model": args.model, "n_params": n_params,
              "reference": f"leanlm float32 ({base_bpw:.0f} bits/weight)", "source_grid": SOURCE_GRID.get(args.model),
              "rows": {}, "speed": {}, "summary": {}}  # fmt: skip
    calib = None
    models = {}
    for name in rows:
        cfg = LEANLM_ROWS[name]()
        if cfg.needs_calibration and calib is None:
            calib = read_calibration("wikitext2-valid", tok, args.samples, args.seq_len)
        log(f"leanlm {name}: quantizing")
        t0 = time.perf_counter()
        model = quantize(load_model(directory, "float32"), cfg, calib if cfg.needs_calibration else None,
                         progress=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        rec = {"engine": "leanlm", "config": cfg.to_dict(), "quantize_s": round(seconds, 1),
               "bpw": round(model_bpw(model, n_params), 3),
               "bpw_decoder_linears": round(model.quantization["bits_per_weight"], 3)}  # fmt: skip
        for text, ref in refs.items():
            rec[text] = ref(model)
        result["rows"][name] = rec
        log(f"  bpw {rec['bpw']:.3f}  wikitext2 ppl {delta(rec['wikitext2']):+.2f}% KL {rec['wikitext2']['kl']:.4f}"
            f"  book ppl {delta(rec['book']):+.2f}% KL {rec['book']['kl']:.4f}  ({seconds:.0f} s)")  # fmt: skip
        models[name] = model
        write_result(f"quality_{args.model}", result, partial=partial, archive=args.archive, checkpoint=True,
                     machine_shared=args.machine_shared)  # fmt: skip

    if args.speed_runs:
        for a, b in SPEED_PAIRS:
            if a not in models or b not in models:
                continue
            log(f"decode speed: {a} vs {b}, interleaved")
            times = {a: [], b: []}
            for i in range(args.speed_runs + 1):
                for n in (a, b):
                    s = decode_tok_s(models[n])
                    if i:  # the first round warms up
                        times[n].append(s)
            med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
            result["speed"][f"{a}/{b}"] = {"decode_tok_s": times, "median": med, "ratio": med[a] / med[b]}
            log(f"  {a} {med[a]:.1f} tok/s, {b} {med[b]:.1f} tok/s: ratio {med[a] / med[b]:.3f}")
    models.clear()
    gc.collect()

    if not args.no_llamacpp:
        from llamacpp_tools import build_ggufs, gguf_tensors, quantize_gguf

        paths = build_ggufs(directory, args.model, ("f16",), args.threads, log=log)
        f16 = paths["f16"]
        for t in args.gguf_types:
            path = f16.with_name(f16.name.replace("-f16.gguf", f"-{t}.gguf"))
            if not path.exists():
                log(f"llama-quantize F16 -> {t.upper()}")
                quantize_gguf(f16, path, t, args.threads)
            tensors = gguf_tensors(path)
            types = sorted({v["type"] for v in tensors.values()})
            bits = sum(v["bytes"] for v in tensors.values()) * 8
            src = result["source_grid"]
            rec = {"engine": "llama.cpp", "gguf": str(path), "types": types, "bpw": round(bits / n_params, 3),
                   "matches_source_grid": bool(src) and any(x.lower() == src for x in types)}  # fmt: skip
            log(f"llama.cpp {t}: scoring ({', '.join(types)})")
            rec.update(gguf_scores(path, refs, args.threads))
            result["rows"][f"llama.cpp-{t}"] = rec
            log(f"  bpw {rec['bpw']:.3f}  wikitext2 ppl {delta(rec['wikitext2']):+.2f}% KL {rec['wikitext2']['kl']:.4f}"
                f"  book ppl {delta(rec['book']):+.2f}% KL {rec['book']['kl']:.4f}")  # fmt: skip

    summary = result["summary"]
    for name, rec in result["rows"].items():
        for text in refs:
            summary[f"{name}/{text}/kl"] = rec[text]["kl"]
            summary[f"{name}/{text}/ppl_delta_pct"] = delta(rec[text])
        summary[f"{name}/bpw"] = rec["bpw"]
    for pair, s in result["speed"].items():
        summary[f"decode_ratio/{pair}"] = s["ratio"]
    q8 = result["rows"].get("llama.cpp-q8_0")
    for name in ("int8-g32", "int8-g64", "int8-pc"):
        if q8 and name in result["rows"]:
            for text in refs:
                summary[f"{name}/{text}/kl_ratio_vs_q8_0"] = result["rows"][name][text]["kl"] / q8[text]["kl"]
    print_table(result)
    write_result(f"quality_{args.model}", result, partial=partial, archive=args.archive,
                 machine_shared=args.machine_shared)  # fmt: skip


def print_table(result: dict) -> None:
    print(f"\n{result['model']}: ppl delta / KL vs leanlm fp32 ({result['settings']['windows']} x "
          f"{result['settings']['seq_len']} tokens per text)")  # fmt: skip
    print(f"{'row':28} {'bpw':>6} {'wikitext2 ppl / KL':>22} {'book ppl / KL':>22}  note")
    for name, rec in sorted(result["rows"].items(), key=lambda kv: kv[1]["bpw"]):
        note = "types " + ",".join(rec["types"]) if "types" in rec else ""
        if rec.get("matches_source_grid"):
            note += f"  [includes the source's own grid {result['source_grid'].upper()}]"
        cells = [f"{delta(rec[t]):+.2f}% / {rec[t]['kl']:.4f}" for t in ("wikitext2", "book")]
        print(f"{name:28} {rec['bpw']:6.3f} {cells[0]:>22} {cells[1]:>22}  {note}")


if __name__ == "__main__":
    main()
