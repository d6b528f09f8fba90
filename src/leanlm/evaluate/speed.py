"""Speed and memory: prefill tok/s, batch-1 decode tok/s, time to first token, RSS, bytes.

Conventions (DESIGN.md): fixed token ids, a warm-up run first, then the median (with min and
max) of `runs` runs, threads stated. Decode tok/s counts decode steps only: the first new
token comes from prefill and is timed as time-to-first-token.
"""

from __future__ import annotations

import os
import resource
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..decode.generate import GenerationStats, generate_tokens


def fixed_prompt(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lo = 100 if vocab_size > 1000 else 0  # skip special tokens of real vocabularies
    return torch.randint(lo, min(vocab_size, 32000), (length,), generator=g).tolist()


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def measure_speed(model, prompt_len: int = 512, new_tokens: int = 128, runs: int = 5, warmup: int = 1,
                  decode_prompt_len: int = 32, progress: bool = True) -> dict:
    """Prefill at `prompt_len` tokens; decode `new_tokens` after a `decode_prompt_len` prompt."""
    long_prompt = fixed_prompt(model.config.vocab_size, prompt_len)
    short_prompt = fixed_prompt(model.config.vocab_size, decode_prompt_len, seed=1)
    prefill, ttft, decode = [], [], []
    for i in tqdm(range(warmup + runs), desc="speed", disable=not progress, leave=False):
        st = GenerationStats()
        for _ in generate_tokens(model, long_prompt, 1, eos_ids=set(), stats=st):
            pass
        st2 = GenerationStats()
        for _ in generate_tokens(model, short_prompt, new_tokens, eos_ids=set(), stats=st2):
            pass
        if i >= warmup:
            prefill.append(prompt_len / st.prefill_s)
            ttft.append(st.prefill_s * 1e3)
            decode.append(st2.decode_tok_s)
    return {
        "threads": torch.get_num_threads(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_tok_s": summarize(prefill),
        "ttft_ms": summarize(ttft),
        "decode_tok_s": summarize(decode),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def weight_bytes(model) -> int:
    """Bytes of parameters and persistent buffers (packed weights count at their packed size)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(b.numel() * b.element_size() for name, b in model.named_buffers()
             if not name.startswith("rope.") and ".cache." not in name)  # fmt: skip
    return n


def disk_bytes(path: str | Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def memory_report(model) -> dict:
    cfg = model.config
    elem = torch.tensor([], dtype=model.dtype).element_size()
    out = {
        "weight_mb": weight_bytes(model) / 2**20,
        "kv_bytes_per_token": cfg.kv_bytes_per_token(elem),
        "peak_rss_mb": peak_rss_mb(),
        "rss_mb": current_rss_mb(),
    }
    if getattr(model, "directory", None):
        out["disk_mb"] = disk_bytes(model.directory) / 2**20
    return out
