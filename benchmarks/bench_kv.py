"""KV-cache policies on SmolLM2-135M: perplexity on book windows, KV bytes per token, decode
speed at long context, and streaming generation in bounded memory. Writes results/kv.json when
every default part ran; a run with --skip or other policy lists is partial and goes to
results/archive/DATE/ (as do the checkpoints written after each measurement).

Policies compared at one budget (1024 kept tokens of a 4096-token window): attention sinks +
sliding window (StreamingLLM), heavy hitters (H2O), observation-window selection (SnapKV), each
on the plain store and on int8 KV, plus int8 / int4 KV alone. None of them calibrates on any
text; the perplexity text is a book (Moby-Dick), not WikiText-2.

Perplexity protocol: leanlm.attention.longctx (chunks of --chunk tokens through the policy,
every prediction scored; ppl_tail = second half of each window). KV bytes per token = bytes the
caches hold after a window / window length (full fp32 = 46,080 B/token).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_result_args, machine, write_result  # noqa: E402

DEFAULT_PPL = ("full;int8;int4;sinks:4,window:1020;sinks:4,window:1020,int8;h2o:1024;h2o:1024,int8;snapkv:1024;"
               "snapkv:1024,int8")
DEFAULT_SPEED = "full;int8;sinks:4,window:1020;sinks:4,window:1020,int8;h2o:1024;snapkv:1024"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="moby-dick")
    ap.add_argument("--seq-lens", default="4096", help="comma list of window lengths")
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--policies", default=DEFAULT_PPL, help="';'-separated --kv specs ('full' = plain cache)")
    ap.add_argument("--speed-context", type=int, default=4096)
    ap.add_argument("--speed-policies", default=DEFAULT_SPEED)
    ap.add_argument("--stream-tokens", type=int, default=20000)
    ap.add_argument("--stream-seconds", type=float, default=120, help="stop streaming after this long")
    ap.add_argument("--stream-kv", default="sinks:4,window:252")
    ap.add_argument("--skip", default="", help="comma list of ppl,speed,stream to skip")
    ap.add_argument("--speed-steps", type=int, default=16)
    ap.add_argument("--speed-rounds", type=int, default=5)
    ap.add_argument("--synthetic-fill", action="store_true", help="speed: fill caches with random K/V, no prefill")
    ap.add_argument("--out", default="kv", help="results/OUT.json")
    ap.add_argument("--threads", type=int, default=2)
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    partial = bool(args.skip) or args.policies != DEFAULT_PPL or args.speed_policies != DEFAULT_SPEED
    out = dict(partial=partial, archive=args.archive, machine_shared=args.machine_shared)

    import leanlm
    from leanlm.attention import KVPolicy
    from leanlm.attention.longctx import decode_speed, policy_perplexity
    from leanlm.decode.generate import GenerationStats, generate_tokens
    from leanlm.evaluate.data import read_text
    from leanlm.evaluate.speed import current_rss_mb, peak_rss_mb

    model, tok = leanlm.load(args.model, dtype="float32")
    skip = set(args.skip.split(","))
    res = {"model": args.model, "dtype": "float32", "machine": machine(), "text": args.text,
           "full_kv_bytes_per_token": model.config.kv_bytes_per_token(4),
           "threads": args.threads, "ppl": [], "speed": None, "stream": None}  # fmt: skip
    if "stream" not in skip:
        pol = KVPolicy.parse(args.stream_kv)
        ids = tok("It was a dark and stormy night;", add_special_tokens=False).input_ids
        st = GenerationStats()
        rss, t0, n = [], time.perf_counter(), 0
        for n, _ in enumerate(generate_tokens(model, ids, args.stream_tokens, eos_ids=set(), stats=st, kv=pol), 1):
            if n % 25 == 0:
                rss.append((n, round(current_rss_mb(), 1)))
            if time.perf_counter() - t0 > args.stream_seconds:
                break
        res["stream"] = {"kv": args.stream_kv, "tokens": n, "cache_tokens": pol.capacity(0),
                         "seconds": round(time.perf_counter() - t0, 1), "tok_s": round(n / (time.perf_counter() - t0), 1),
                         "rss_mb_by_token": rss, "peak_rss_mb": round(peak_rss_mb(), 1)}  # fmt: skip
        print(res["stream"], flush=True)
        write_result(args.out, res, checkpoint=True, **out)

    if "ppl" not in skip:
        text = read_text(args.text)
        for L in [int(x) for x in args.seq_lens.split(",")]:
            for spec in args.policies.split(";"):
                pol = KVPolicy.parse(spec) if spec != "full" else None
                r = policy_perplexity(model, tok, text, L, args.windows, pol, args.chunk)
                r["spec"] = spec
                base = next((b for b in res["ppl"] if b["spec"] == "full" and b["seq_len"] == L), None)
                if base:
                    r["ppl_vs_full"] = r["ppl"] / base["ppl"] - 1
                    r["ppl_tail_vs_full"] = r["ppl_tail"] / base["ppl_tail"] - 1
                    r["kv_reduction"] = base["kv_bytes_per_token"] / r["kv_bytes_per_token"]
                res["ppl"].append(r)
                print({k: r[k] for k in ("spec", "seq_len", "ppl", "ppl_tail", "kv_bytes_per_token", "seconds")},
                      flush=True)  # fmt: skip
                write_result(args.out, res, checkpoint=True, **out)

    if "speed" not in skip:
        pols = {s: (KVPolicy.parse(s) if s != "full" else None) for s in args.speed_policies.split(";")}
        res["speed"] = decode_speed(model, args.speed_context, pols, args.speed_steps, args.speed_rounds,
                                    synthetic=args.synthetic_fill)
        full = res["speed"]["policies"].get("full")
        for d in res["speed"]["policies"].values():
            if full:
                d["speedup_vs_full"] = d["tok_s"] / full["tok_s"]
        print(res["speed"], flush=True)
        write_result(args.out, res, checkpoint=True, **out)
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    write_result(args.out, res, **out)


if __name__ == "__main__":
    main()
