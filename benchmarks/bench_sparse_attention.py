"""Query-aware sparse attention at decode (leanlm.attention.sparse): decode tok/s at long context, full attention
vs Quest pages vs top-k keys, with bf16 weights and int4 weights (RTN int4, group 128: the linears shrink, so
attention is a larger share of the step), and policy-aware perplexity on a Gutenberg book.

Speed: leanlm.attention.longctx.decode_speed, caches filled with random keys / values at positions [0, context)
(--synthetic-fill, default; decode cost does not depend on the values, and Quest and top-k do the same work
whatever the keys), rounds interleaved across policies, median tok/s.
Perplexity: leanlm.attention.longctx.policy_perplexity with chunks of 16 tokens (at most ops.MAX_ROWS: every
query goes through the sparse kernel and selects its own pages / keys; longer chunks attend fully); the full
baseline may take --ppl-full-chunk 256 (exact attention whatever the chunk; use fp32 weights so that the two
chunkings agree to float rounding).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_result_args, machine, write_result  # noqa: E402

DEFAULT_POLICIES = "full;quest:pages=64,page=16;topk:keys=1024"


def load(name: str, weights: str):
    import leanlm
    from leanlm.quant import RTN, quantize

    if weights in ("bf16", "fp32"):
        return leanlm.load(name, dtype="bfloat16" if weights == "bf16" else "float32")
    m32, tok = leanlm.load(name, dtype="float32")
    return quantize(m32, RTN(bits=4, group=128), progress=False), tok


def kernel_times(model, context: int, pols: dict, reps: int = 20) -> dict:
    """ms per call of one layer's decode attention (RoPE + KV write + attention, 1 new token, the model's dtype,
    the first full-attention layer's heads) at `context`: ops.attend over the plain cache vs ops.sparse_attend.
    On one thread: on a busy machine a call split over threads waits for the slowest (a neighbour's job)."""
    import statistics
    import time

    from leanlm import ops

    layer = next((l for l in model.layers if l.attn.window is None), model.layers[0])
    a, dt = layer.attn, model.dtype
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 1, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, generator=g).to(dt)
    cos, sin = torch.ones(1, a.head_dim, dtype=dt), torch.zeros(1, a.head_dim, dtype=dt)
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for s, pol in pols.items():
        if pol is None:
            cache = model.new_cache(context + 1)[0]
        else:
            cache = pol(1, a.n_kv_heads, context + 1, a.head_dim, dt)
        cache.k[:, :, :context] = torch.randn(cache.k[:, :, :context].shape, generator=g).to(dt)
        cache.v[:, :, :context] = torch.randn(cache.v[:, :, :context].shape, generator=g).to(dt)
        if pol is None:
            call = lambda: ops.attend(qkv, None, None, cache.k, cache.v, cos, sin, context, a.n_heads,  # noqa: E731
                                      a.n_kv_heads, 0, 1e-6, False, a.scale)
        else:
            if cache.mode == 0:
                cache.update_bounds(0, context, 1)
            sp = cache.fused_sparse(dt)
            call = lambda: ops.sparse_attend(qkv, None, None, sp[0], sp[1], sp[2], sp[3], cos, sin, context,  # noqa: E731
                                             a.n_heads, a.n_kv_heads, 0, 1e-6, False, a.scale, *sp[4:])
        for _ in range(3):
            call()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t0)
        out[s] = {"ms": statistics.median(ts) * 1e3, "ms_min": min(ts) * 1e3}
    torch.set_num_threads(threads)
    full = out.get("full")
    for d in out.values():
        if full:
            d["speedup_vs_full"] = full["ms"] / d["ms"]
    return {"heads": a.n_heads, "kv_heads": a.n_kv_heads, "head_dim": a.head_dim, "dtype": str(dt), "context": context,
            "threads": 1, "policies": out}


@torch.inference_mode()
def tail_perplexity(model, tokenizer, text: str, seq_len: int, tail: int, policy) -> dict:
    """Perplexity of the last `tail` tokens of the first `seq_len`-token window of `text`: the first seq_len - tail
    tokens are prefilled in one forward (full attention under every policy: Quest and top-k are decode-time), then
    the tail goes through the cache in 16-token chunks (each query selects its own pages / keys), every
    prediction of a tail token scored. Cheaper than scoring a whole window in 16-token chunks."""
    import math
    import time

    import torch.nn.functional as F

    from leanlm.evaluate.perplexity import make_windows
    from leanlm.model.runtime import KVCache

    ids = make_windows(tokenizer, text, seq_len, 1)[0].to(model.device)
    prefix = seq_len - tail
    t0 = time.perf_counter()
    model.setup_cache(1, seq_len, cache_cls=policy if policy is not None else KVCache)
    logits = [model(ids[:, :prefix], start=0, last_only=True)[0, -1:].float()]
    for s in range(prefix, seq_len - 1, 16):
        logits.append(model(ids[:, s : min(s + 16, seq_len - 1)], start=s)[0].float())
    model.clear_cache()
    nll = F.cross_entropy(torch.cat(logits), ids[0, prefix:], reduction="sum").item()
    return {"policy": policy.describe() if policy else "full", "ppl": math.exp(nll / tail), "tokens": tail,
            "seq_len": seq_len, "prefix": prefix, "chunk": 16, "seconds": time.perf_counter() - t0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-0.5b,smollm2-135m")
    ap.add_argument("--weights", default="bf16,int4", help="comma list of bf16, int4, fp32")
    ap.add_argument("--policies", default=DEFAULT_POLICIES, help="';'-separated --kv specs ('full' = plain cache)")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill", action="store_true", help="speed: prefill a random prompt instead of random K/V")
    ap.add_argument("--ppl-len", type=int, default=0, help="also policy-aware perplexity over one window of this length")
    ap.add_argument("--ppl-windows", type=int, default=1)
    ap.add_argument("--ppl-tail", type=int, default=0,
                    help="score only the last N tokens of one window, after a one-forward prefill (tail_perplexity)")
    ap.add_argument("--ppl-full-chunk", type=int, default=16,
                    help="chunk of the full-attention baseline (exact whatever the chunk; 256 is faster)")
    ap.add_argument("--text", default="pride-and-prejudice")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--kernel", action="store_true", help="also time one layer's attention kernel alone")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="sparse_attention")
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from leanlm.attention import KVPolicy
    from leanlm.attention.longctx import decode_speed, policy_perplexity
    from leanlm.evaluate.data import read_text

    specs = args.policies.split(";")
    pols = {s: (KVPolicy.parse(s) if s != "full" else None) for s in specs}
    res = {"machine": machine(), "threads": args.threads, "context": args.context, "settings": vars(args), "runs": []}
    out = dict(partial=True, archive=args.archive, machine_shared=args.machine_shared)  # exploratory: archive only
    for name in args.models.split(","):
        for weights in args.weights.split(","):
            model, tok = load(name, weights)
            model.prepare_decode()
            row = {"model": name, "weights": weights}
            if args.kernel:
                row["kernel"] = kernel_times(model, args.context, pols)
                print(name, weights, "kernel ms", {k: round(v["ms"], 3) for k, v in row["kernel"]["policies"].items()},
                      flush=True)  # fmt: skip
            if not args.skip_speed:
                sp = decode_speed(model, args.context, pols, args.steps, args.rounds, synthetic=not args.prefill)
                full = sp["policies"].get("full")
                for d in sp["policies"].values():
                    d.pop("kv_bytes", None)
                    if full:
                        d["speedup_vs_full"] = d["tok_s"] / full["tok_s"]
                row["speed"] = sp
                print(name, weights, {k: round(v["tok_s"], 2) for k, v in sp["policies"].items()}, flush=True)
            if args.ppl_len:
                text = read_text(args.text)
                row["ppl"] = {}
                for s, pol in pols.items():
                    if args.ppl_tail:
                        r = tail_perplexity(model, tok, text, args.ppl_len, args.ppl_tail, pol)
                    else:
                        chunk = args.ppl_full_chunk if pol is None else 16
                        r = policy_perplexity(model, tok, text, args.ppl_len, args.ppl_windows, pol, chunk=chunk)
                    row["ppl"][s] = r
                    print(name, weights, s, round(r["ppl"], 4), round(r["seconds"], 1), flush=True)
                    write_result(args.out, {**res, "runs": res["runs"] + [row]}, checkpoint=True, **out)
                base = row["ppl"].get("full")
                for r in row["ppl"].values():
                    if base:
                        r["ppl_vs_full"] = r["ppl"] / base["ppl"] - 1
                print(name, weights, {s: round(r["ppl"], 4) for s, r in row["ppl"].items()}, flush=True)
            res["runs"].append(row)
            write_result(args.out, res, checkpoint=True, **out)
            del model
    write_result(args.out, res, **out)


if __name__ == "__main__":
    main()
