"""Continuous batching: sequences decoded together, one new token each per forward.

Why: a decode step streams every weight once to make one token; on a CPU that step is bound by
memory traffic, so the products of 8 sequences cost little more than those of one
(ops.small_linear / q_linear read a weight row once for up to ops.MAX_ROWS activation rows).

Each `Sequence` keeps its own KV caches (`Transformer.new_cache`) and position. Its prompt is
prefilled alone; `step` then runs one forward for all live sequences (`Transformer.decode_rows`:
linears on the stacked rows, attention per sequence over its own cache). Sequences join and leave
between steps. A sequence's tokens are exactly those `generate_tokens` yields for its prompt alone,
greedy or sampled with its own seed, because every kernel on the path is batch-invariant
(tests/test_batch_decode.py). Models whose blocks do not run as one fused call (cache policies,
adaptive computation, replaced attention) cannot be batched: `batchable` says so, and callers decode
them one at a time.
"""

from __future__ import annotations

import torch

from ..errors import LeanlmError
from ..model.runtime import Transformer
from .generate import Sampling, check_context, recorded_kv_policy, sample


def batchable(model: Transformer) -> bool:
    """Can `Sequence` / `step` decode this model (full KV cache, every block one fused call)?"""
    return recorded_kv_policy(model) is None and model.rows_supported()


class Sequence:
    """One prompt in a batch: its caches, position, next token and sampler. Creating it runs the prefill
    (alone, on its own caches) and samples the first token, as generate_tokens does."""

    def __init__(self, model: Transformer, prompt_ids: list[int], max_new_tokens: int = 128,
                 sampling: Sampling | None = None, eos_ids: set[int] | None = None):  # fmt: skip
        if not batchable(model):
            raise LeanlmError("this model cannot be decoded in a batch (a KV-cache policy, adaptive computation or a "
                              "block that does not run as one fused call); decode it with generate_tokens")  # fmt: skip
        self.budget = check_context(model, len(prompt_ids), max_new_tokens)
        self.sampling = sampling or Sampling()
        self.gen = self.sampling.generator()
        self.eos = set(model.config.eos_token_ids) if eos_ids is None else eos_ids
        self.caches = model.new_cache(len(prompt_ids) + self.budget)
        for layer, cache in zip(model.layers, self.caches):
            layer.attn.cache = cache
        try:
            with torch.inference_mode():
                logits = model(torch.tensor([prompt_ids], device=model.device), start=0, last_only=True)[0, -1]
        finally:
            model.clear_cache()
        self.token = sample(logits, self.sampling, self.gen)  # the newest token, not yet fed to the model
        self.pos = len(prompt_ids)  # where it goes
        self.count = 1  # tokens produced so far (this one included)

    @property
    def finished(self) -> bool:
        """The newest token is EOS or the last of the budget: no further step for this sequence."""
        return self.token in self.eos or self.count >= self.budget

    def release(self) -> None:
        self.caches = []


def step(model: Transformer, seqs: list[Sequence]) -> None:
    """One forward for all `seqs` (none finished): each feeds its newest token and samples the next."""
    logits = model.decode_rows([s.token for s in seqs], [s.pos for s in seqs], [s.caches for s in seqs])
    for s, row in zip(seqs, logits):
        s.token = sample(row, s.sampling, s.gen)
        s.pos += 1
        s.count += 1


def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 128,
                   sampling: Sampling | list[Sampling] | None = None, eos_ids: set[int] | None = None) -> list[list[int]]:  # fmt: skip
    """Every prompt's new tokens, all decoded together (list i equals list(generate_tokens(prompt i)))."""
    samplings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    seqs = [Sequence(model, p, max_new_tokens, s, eos_ids) for p, s in zip(prompts, samplings)]
    out = [[s.token] for s in seqs]
    live = [i for i, s in enumerate(seqs) if not s.finished]
    while live:
        step(model, [seqs[i] for i in live])
        for i in live:
            out[i].append(seqs[i].token)
        live = [i for i in live if not seqs[i].finished]
    return out


__all__ = ["Sequence", "batchable", "generate_batch", "step"]
