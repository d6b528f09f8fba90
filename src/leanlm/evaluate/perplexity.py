"""Perplexity and KL divergence to a reference model over the same non-overlapping windows.

Convention (DESIGN.md): the text is tokenized once and cut into non-overlapping windows of
`seq_len` tokens; each window is scored on its seq_len - 1 next-token predictions. For
tokenizers that start every sequence with BOS (Gemma), each window is BOS + seq_len - 1 text
tokens, as llama.cpp's perplexity does, since such models are lost without it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LeanlmError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # tokens [1, T] -> logits [1, T, V]


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def make_windows(tokenizer, text: str, seq_len: int, max_windows: int | None) -> list[torch.Tensor]:
    if seq_len < 2:
        raise LeanlmError(f"seq_len must be at least 2, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    step = seq_len - len(bos)
    n = len(ids) // step
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise LeanlmError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}; use a smaller --seq-len")
    return [torch.tensor([bos + ids[i * step : (i + 1) * step]]) for i in range(n)]


def as_logits_fn(model) -> LogitsFn:
    """leanlm models map tokens to logits directly; transformers models return an output object."""
    def fn(tokens):
        out = model(tokens)
        return out.logits if hasattr(out, "logits") else out

    return fn


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, seq_len: int = 512, max_windows: int | None = 40, progress=True) -> dict:
    fn = as_logits_fn(model)
    windows = make_windows(tokenizer, text, seq_len, max_windows)
    nll, count = 0.0, 0
    for w in tqdm(windows, desc="perplexity", disable=not progress, leave=False):
        logits = fn(w.to(_device(model)))[0, :-1].float()
        nll += F.cross_entropy(logits, w[0, 1:].to(logits.device), reduction="sum").item()
        count += w.shape[1] - 1
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows), "seq_len": seq_len}


@torch.inference_mode()
def kl_divergence(base, candidate, tokenizer, text: str, seq_len: int = 512, max_windows: int | None = 40, progress=True) -> dict:
    """Mean per-token KL(base || candidate), top-1 agreement, and both perplexities."""
    fb, fc = as_logits_fn(base), as_logits_fn(candidate)
    windows = make_windows(tokenizer, text, seq_len, max_windows)
    kl = agree = nll_b = nll_c = 0.0
    count = 0
    for w in tqdm(windows, desc="kl divergence", disable=not progress, leave=False):
        lb = F.log_softmax(fb(w.to(_device(base)))[0, :-1].float(), -1)
        lc = F.log_softmax(fc(w.to(_device(candidate)))[0, :-1].float().to(lb.device), -1)
        target = w[0, 1:].to(lb.device)
        kl += F.kl_div(lc, lb, log_target=True, reduction="sum").item()
        agree += (lb.argmax(-1) == lc.argmax(-1)).sum().item()
        nll_b -= lb.gather(-1, target[:, None]).sum().item()
        nll_c -= lc.gather(-1, target[:, None]).sum().item()
        count += target.numel()
    return {
        "kl": kl / count,
        "top1_agreement": agree / count,
        "ppl_base": math.exp(nll_b / count),
        "ppl": math.exp(nll_c / count),
        "tokens": count,
        "windows": len(windows),
        "seq_len": seq_len,
    }


def _device(model) -> torch.device:
    return getattr(model, "device", torch.device("cpu"))
