"""Drafts for speculative decoding: who proposes the next few tokens for the target to verify.

A draft sees the committed sequence (prompt + accepted tokens; its last token is not yet in
the target's cache) and proposes up to `gamma` tokens, with the distributions it sampled them
from (None for point proposals such as prompt lookup). After verification the decoder calls
`rollback(valid)`: cache positions >= valid no longer match the sequence. Rolling back a cache
is only bookkeeping: the next forward writes from `valid` on, and attention reads positions
[0, start + T) only, so stale entries beyond are overwritten before anyone attends to them.

- ModelDraft: any leanlm model with the target's tokenizer (a bf16 copy, a quantized or
  pruned copy, a smaller sibling), with its own KV cache; a compressed copy fills that cache
  from the target's (sync_kv) instead of computing it.
- EarlyExitDraft: the target's own first N layers + its final norm and LM head. It shares the
  target's cache for those layers, and hands its hidden states to the verification pass, which
  then runs only layers N.. on the drafted tokens (the first N layers never run twice).
- LookupDraft: prompt lookup. The last n tokens (n = 3, 2, 1) are matched against earlier
  context; the tokens that followed the most recent match are proposed. Nearly free.
- LookupDraft(fallback=...) tries lookup first and asks a model draft when nothing (or only
  a single token) matches.
"""

from __future__ import annotations

import torch

from ..errors import LeanlmError
from .generate import Sampling, filtered_probs


def _pick(logits: torch.Tensor, sampling: Sampling, gen) -> tuple[int, torch.Tensor | None, float]:
    """(token, distribution it came from or None when greedy, draft confidence in it)."""
    if sampling.temperature == 0:
        tok = int(logits.argmax())
        return tok, None, -1.0
    q = filtered_probs(logits, sampling)
    tok = int(torch.multinomial(q, 1, generator=gen))
    return tok, q, float(q[tok])


class Draft:
    """Base class; also the 'no draft' case (plain decoding through the speculative loop)."""

    name = "none"
    threshold: float | None = None  # stop drafting when the draft's confidence drops below

    def start(self, target, prompt_ids: list[int], max_len: int) -> None:
        self.target = target

    def context(self, seq: list[int]):
        """A hashable label for the kind of proposal the next `propose(seq, ...)` will make, or
        None (one kind). speculative.AdaptiveGamma learns acceptance and cost per label."""
        return None

    def propose(self, seq: list[int], gamma: int, sampling: Sampling, gen) -> tuple[list[int], torch.Tensor | None]:
        return [], None

    def verify(self, tokens: list[int], start: int) -> torch.Tensor:
        """Target logits [T, V] for `tokens` (last committed token + drafts) at `start`."""
        return self.target.forward(tokens, start)

    def rollback(self, valid: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def _confident(self, logits: torch.Tensor, conf: float) -> bool:
        if self.threshold is None:
            return True
        if conf < 0:  # greedy: confidence is the top-1 probability
            conf = float(torch.softmax(logits.float(), -1).max())
        return conf >= self.threshold


class ModelDraft(Draft):
    """A separate (cheaper) model with the same tokenizer, with its own KV cache.

    sync_kv: for a compressed copy of the target (same layers and shapes, e.g. bf16 / int8 /
    int4 weights), fill the draft's cache from the target's instead of computing it: committed
    positions are copied (cast) from the target's cache after each verification, so the draft
    never prefills the prompt nor re-reads tokens accepted from elsewhere (prompt lookup), and
    it attends to the target's own keys/values. Any draft keeps the output exact; this one is
    cheaper and agrees with the target more often.
    """

    name = "draft"

    def __init__(self, model, threshold: float | None = None, name: str | None = None, sync_kv: bool = False):
        self.model, self.threshold, self.sync_kv = model, threshold, sync_kv
        self.name = name or f"draft-{str(model.dtype).removeprefix('torch.')}"
        self.valid = self.round_start = 0
        self.pairs: list = []

    def start(self, target, prompt_ids, max_len):
        super().start(target, prompt_ids, max_len)
        if self.model.config.vocab_size < 8 or abs(self.model.config.vocab_size - target.vocab_size) > 1024:
            raise LeanlmError(
                f"draft vocabulary ({self.model.config.vocab_size}) does not match the target's "
                f"({target.vocab_size}); the draft needs the target's tokenizer"
            )
        self.model.setup_cache(1, max_len)
        self.valid = 0
        self.pairs = self._cache_pairs() if self.sync_kv else []
        if not self.pairs and len(prompt_ids) > 1:  # the last prompt token is fed with the first proposal
            self.model(torch.tensor([prompt_ids[:-1]], device=self.model.device), start=0, last_only=True)
            self.valid = len(prompt_ids) - 1

    def _cache_pairs(self) -> list:
        """(draft cache, target cache) per layer when their shapes match, else []."""
        from ..model.runtime import KVCache

        dl, tl = self.model.layers, self.target.model.layers
        if len(dl) != len(tl):
            return []
        pairs = [(d.attn.cache, t.attn.cache) for d, t in zip(dl, tl)]
        for d, t in pairs:
            if type(d) is not KVCache or type(t) is not KVCache or d.k.shape != t.k.shape:
                return []
        return pairs

    def _sync(self, upto: int) -> None:
        """Copy target cache positions [valid, upto) (valid for the target) into the draft's."""
        if upto > self.valid:
            a = self.valid
            for d, t in self.pairs:
                d.k[:, :, a:upto] = t.k[:, :, a:upto]
                d.v[:, :, a:upto] = t.v[:, :, a:upto]
            self.valid = upto

    def _logits(self, tokens: list[int], pos: int) -> torch.Tensor:
        out = self.model(torch.tensor([tokens], device=self.model.device), start=pos, last_only=True)[0, -1]
        V = self.target.vocab_size
        if out.shape[0] != V:  # padded vocabularies of sibling models
            out = out[:V] if out.shape[0] > V else torch.cat([out, out.new_full((V - out.shape[0],), float("-inf"))])
        return out

    def propose(self, seq, gamma, sampling, gen):
        if self.pairs:
            self._sync(len(seq) - 1)  # the target's cache holds every committed token but the last
            self.round_start = len(seq) - 1
        feed, pos = seq[self.valid :], self.valid  # catch up on tokens the draft has not seen
        out, qs = [], []
        for _ in range(gamma):
            logits = self._logits(feed, pos)
            pos += len(feed)
            tok, q, conf = _pick(logits, sampling, gen)
            out.append(tok)
            qs.append(q)
            feed = [tok]
            if not self._confident(logits, conf):
                break
        self.valid = pos
        return out, (torch.stack(qs) if out and qs[0] is not None else None)

    def rollback(self, valid):
        self.valid = min(self.valid, valid)
        if self.pairs:  # take this round's accepted positions from the target too (its own keys)
            self.valid = min(self.valid, self.round_start)

    def finish(self):
        self.model.clear_cache()


class EarlyExitDraft(Draft):
    """Self-speculation: the target's first `n_layers` layers, then its final norm + LM head."""

    name = "self"

    def __init__(self, n_layers: int, threshold: float | None = None):
        self.n_layers, self.threshold = n_layers, threshold
        self.name = f"self-{n_layers}L"
        self.hidden: list[torch.Tensor] = []

    def start(self, target, prompt_ids, max_len):
        super().start(target, prompt_ids, max_len)
        if not 0 < self.n_layers < target.model.config.n_layers:
            raise LeanlmError(f"self-draft layers must be in 1..{target.model.config.n_layers - 1}, got {self.n_layers}")

    def _prefix(self, tok: int, pos: int) -> torch.Tensor:
        m = self.target.model
        return m.run_layers(m.embed(torch.tensor([[tok]], device=m.device)), pos, 0, self.n_layers)

    def propose(self, seq, gamma, sampling, gen):
        # the target's verification pass already wrote layers [0, N) for every committed
        # position except the last token: the shared cache needs no catch-up
        pos, tok = len(seq) - 1, seq[-1]
        self.hidden, out, qs = [], [], []
        for i in range(gamma):
            h = self._prefix(tok, pos + i)
            self.hidden.append(h)
            logits = self.target.head(h)[0, -1]
            tok, q, conf = _pick(logits, sampling, gen)
            out.append(tok)
            qs.append(q)
            if not self._confident(logits, conf):
                break
        return out, (torch.stack(qs) if out and qs[0] is not None else None)

    def verify(self, tokens, start):
        if not self.hidden:
            return self.target.forward(tokens, start)
        m, n = self.target.model, self.n_layers
        # layers [0, N) of every token but the last drafted one were computed while drafting
        hs = self.hidden + [self._prefix(tokens[-1], start + len(tokens) - 1)]
        self.hidden = []
        x = m.run_layers(torch.cat(hs, dim=1), start, n)
        return self.target.head(x)[0]


class LookupDraft(Draft):
    """Prompt lookup: propose what followed the most recent earlier occurrence of the last n-gram."""

    name = "lookup"
    LONGEST = 15  # tokens a match may propose (the verification forward takes 16)

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, fallback: Draft | None = None,
                 fallback_below: int = 2):  # fmt: skip
        if not 1 <= min_ngram <= max_ngram:
            raise LeanlmError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.fallback = max_ngram, min_ngram, fallback
        self.fallback_below = fallback_below  # with a fallback, matches shorter than this use it
        self.name = "lookup" if fallback is None else f"lookup+{fallback.name}"
        self.index: list[dict] = []
        self.indexed = 0
        self.used_fallback = False
        self._match = (-1, [], 0)  # (len(seq), proposal, n) of the last match
        self._last = (0, 0, False)  # last lookup proposal: (len(seq) then, tokens proposed, all accepted)

    def start(self, target, prompt_ids, max_len):
        super().start(target, prompt_ids, max_len)
        self.index = [dict() for _ in range(self.max_ngram + 1)]  # n -> {n-gram: where its continuation starts}
        self.indexed = 0
        self._match, self._last = (-1, [], 0), (0, 0, False)
        if self.fallback is not None:
            self.fallback.start(target, prompt_ids, max_len)

    def _update_index(self, seq: list[int]) -> None:
        # the sequence only grows: index each new position i as the continuation of the
        # n-grams ending at i-1 (later occurrences overwrite earlier ones: most recent wins)
        for i in range(max(self.indexed, 1), len(seq)):
            for n in range(self.min_ngram, min(self.max_ngram, i) + 1):
                self.index[n][tuple(seq[i - n : i])] = i
        self.indexed = len(seq)

    def match(self, seq: list[int], gamma: int) -> tuple[list[int], int]:
        """(proposed tokens, length of the matched n-gram); ([], 0) when nothing matches."""
        if self._match[0] != len(seq):  # (the sequence only grows: its length identifies it)
            self._update_index(seq)
            self._match = (len(seq), [], 0)
            for n in range(min(self.max_ngram, len(seq)), self.min_ngram - 1, -1):
                j = self.index[n].get(tuple(seq[-n:]))
                if j is not None:
                    self._match = (len(seq), seq[j : j + self.LONGEST], n)
                    break
        return self._match[1][:gamma], self._match[2]

    def _uses_fallback(self, out: list[int], n: int) -> bool:
        return self.fallback is not None and (not out or n < self.fallback_below)

    def context(self, seq):
        out, n = self.match(seq, self.LONGEST)
        if self._uses_fallback(out, n):
            return ("model", self.fallback.context(seq))
        # a longer match, and a copy that has been running (last proposal taken whole), are
        # accepted far more often: the length policy learns each case apart
        return ("lookup", min(n, 3), self._last[2]) if out else None

    def propose(self, seq, gamma, sampling, gen):
        self.used_fallback = False
        if gamma <= 0:
            return [], None
        out, n = self.match(seq, gamma)
        if not self._uses_fallback(out, n):
            self._last = (len(seq), len(out), False)
            return out, None  # point proposals: q is one-hot on each proposed token
        self.used_fallback = True
        return self.fallback.propose(seq, gamma, sampling, gen)

    def verify(self, tokens, start):
        if self.used_fallback:
            return self.fallback.verify(tokens, start)
        return self.target.forward(tokens, start)

    def rollback(self, valid):
        at, proposed, _ = self._last
        if not self.used_fallback and proposed and at:
            self._last = (at, proposed, valid - at >= proposed)  # valid = at + accepted (+ 1 new token)
        if self.fallback is not None:
            self.fallback.rollback(valid)

    def finish(self):
        if self.fallback is not None:
            self.fallback.finish()


__all__ = ["Draft", "ModelDraft", "EarlyExitDraft", "LookupDraft"]
