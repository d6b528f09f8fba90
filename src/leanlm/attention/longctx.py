"""Long-context evaluation under a KV-cache policy.

Protocol (policy-aware perplexity): the text is cut into non-overlapping windows of `seq_len`
tokens (leanlm's make_windows). Each window is fed through the cache in chunks of `chunk`
tokens at their true positions: every chunk attends causally to itself plus whatever the
policy kept from earlier chunks, then the policy stores/evicts. Every next-token prediction of
the window is scored (seq_len - 1 per window); `ppl_tail` is the perplexity of the second half
of each window only, where the policy has dropped most of the context. With the plain cache
(policy None) this is exactly full causal attention.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from ..evaluate.perplexity import make_windows
from ..model.runtime import KVCache
from .policies import KVPolicy, cache_bytes


def _cache_cls(policy: KVPolicy | None):
    return KVCache if policy is None else policy


def _chunks(L: int, chunk: int, lo: int, hi: int, score_chunk: int | None):
    """(start, end) of the chunks: `chunk` tokens, and `score_chunk` inside [lo, hi) when given."""
    if not score_chunk:
        return [(s, min(s + chunk, L)) for s in range(0, L, chunk)]
    out, s = [], 0
    while s < L:
        step = score_chunk if lo <= s < hi else chunk
        e = min(s + step, L, lo if s < lo else L)
        out.append((s, e))
        s = e
    return out


@torch.inference_mode()  # with autograd on, each chunk's graph stayed reachable from the cache: +0.8 GB a chunk
def chunked_prefill(model, ids: torch.Tensor, policy: KVPolicy | None, chunk: int = 256, max_len: int | None = None,
                    score: bool = False, score_range: tuple[int, int] | None = None,
                    score_chunk: int | None = None):  # fmt: skip
    """Feed ids [1, L] through a fresh cache in chunks; returns (summed NLL, count, tail NLL, tail count).
    `score_range` (lo, hi): score only the predictions made at positions [lo, hi) (chunks outside it skip the
    LM head over their rows: long contexts scored on a slice). `score_chunk`: feed the scored tokens in chunks
    of this many, e.g. 16 for a decode-time method (quest, topk) that selects keys only in chunks of <= 16 rows
    and attends fully in longer ones."""
    L = ids.shape[1]
    model.setup_cache(1, max_len or L, cache_cls=_cache_cls(policy))
    nll = tail = 0.0
    n = nt = 0
    half = L // 2
    lo, hi = score_range or (0, L)
    for s, e in _chunks(L, chunk, lo, hi, score_chunk):
        x = ids[:, s:e]
        if not score or s + x.shape[1] <= lo or s >= hi:
            model(x, start=s, last_only=True)
            continue
        logits = model(x, start=s)[0].float()
        tgt = ids[0, s + 1 : s + 1 + x.shape[1]]
        logits = logits[: tgt.shape[0]]
        pos = torch.arange(s, s + tgt.shape[0])  # position of the predicting token
        keep = (pos >= lo) & (pos < hi)
        logits, tgt, pos = logits[keep], tgt[keep], pos[keep]
        losses = F.cross_entropy(logits, tgt, reduction="none")
        nll += losses.sum().item()
        n += tgt.shape[0]
        tail += losses[pos >= half].sum().item()
        nt += int((pos >= half).sum())
    return nll, n, tail, nt


@torch.inference_mode()
def policy_perplexity(model, tokenizer, text: str, seq_len: int, windows: int, policy: KVPolicy | None,
                      chunk: int = 256) -> dict:  # fmt: skip
    ws = make_windows(tokenizer, text, seq_len, windows)
    nll = tail = 0.0
    n = nt = 0
    kv = 0
    t0 = time.perf_counter()
    for w in ws:
        a, b, c, d = chunked_prefill(model, w.to(model.device), policy, chunk, score=True)
        nll, n, tail, nt = nll + a, n + b, tail + c, nt + d
        kv = cache_bytes(model)
        model.clear_cache()
    return {
        "policy": policy.describe() if policy else "full",
        "ppl": math.exp(nll / n), "ppl_tail": math.exp(tail / nt), "tokens": n, "windows": len(ws),
        "seq_len": seq_len, "chunk": chunk, "kv_bytes": kv, "kv_bytes_per_token": kv / seq_len,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


@torch.inference_mode()
def decode_speed(model, context: int, policies: dict, steps: int = 16, rounds: int = 5, chunk: int = 512,
                 synthetic: bool = False) -> dict:  # fmt: skip
    """Decode tok/s after a `context`-token prompt, per policy (name -> KVPolicy | None).

    Each policy prefills the same prompt once (chunked), or with `synthetic` gets its cache
    filled with random keys/values at positions [0, context) (what it would hold after such a
    prefill; decode cost does not depend on the values); then decode rounds of `steps` tokens
    are interleaved across policies (caches swapped in and out) and the median is reported.
    """
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, context), generator=g).to(model.device)
    caches, pos, out = {}, {}, {}
    for name, pol in policies.items():
        if synthetic:
            _fill_random(model, pol, context, max_len=context + steps * (rounds + 1) + 1)
        else:
            chunked_prefill(model, ids, pol, chunk, max_len=context + steps * (rounds + 1) + 1)
        caches[name] = [l.attn.cache for l in model.layers]
        pos[name] = context
        out[name] = {"kv_bytes": cache_bytes(model), "tok_s": []}
    tok = torch.tensor([[1000]], device=model.device)
    for r in range(rounds + 1):  # round 0 is a warm-up
        for name in policies:
            for layer, c in zip(model.layers, caches[name]):
                layer.attn.cache = c
            t0 = time.perf_counter()
            for _ in range(steps):
                model(tok, start=pos[name])
                pos[name] += 1
            if r:
                out[name]["tok_s"].append(steps / (time.perf_counter() - t0))
    model.clear_cache()
    for name, d in out.items():
        d["tok_s_runs"] = d.pop("tok_s")
        d["tok_s"] = statistics.median(d["tok_s_runs"])
    return {"context": context, "steps": steps, "rounds": rounds, "synthetic_fill": synthetic, "policies": out}


def _fill_random(model, policy, context: int, max_len: int) -> None:
    model.setup_cache(1, max_len, cache_cls=_cache_cls(policy))
    g = torch.Generator().manual_seed(0)
    for layer in model.layers:
        c = layer.attn.cache
        if policy is None or not hasattr(c, "store"):  # the plain cache, or one that keeps every key (sparse.py)
            c.k[:, :, :context].copy_(torch.randn(c.k[:, :, :context].shape, generator=g))
            c.v[:, :, :context].copy_(torch.randn(c.v[:, :, :context].shape, generator=g))
            if getattr(c, "mode", None) == 0:  # Quest's page bounds
                c.update_bounds(0, context, 1)
            continue
        n = min(context, c.cap)
        shape = (1, c.n_kv_heads, n, c.head_dim)
        c.store.write(0, torch.randn(shape, generator=g), torch.randn(shape, generator=g))
        if policy.method == "window":  # sinks + the last window positions, in ring order
            s, w = policy.sinks, policy.window
            p = torch.cat([torch.arange(min(s, context)), torch.arange(max(s, context - w), context)])
            slots = torch.where(p < s, p, s + (p - s) % w)
            c.pos[:, :, slots] = p.to(torch.int32)
        else:
            c.pos[:, :, :n] = torch.arange(context - n, context, dtype=torch.int32)
        c.n = n
