"""Exact speculative decoding: a cheap draft proposes gamma tokens, the target verifies them in one pass.

One round, with `cur` the last committed token (not yet in the target's cache) at position P:
  1. the draft proposes d_1..d_g (drafts.py: a compressed copy, the target's first layers,
     prompt lookup);
  2. the target runs [cur, d_1..d_g] at positions P..P+g in one forward (a chunked prefill):
     logits at P+i predict the token after d_i;
  3. greedy: accept the longest prefix of drafts equal to the target's argmax, plus the
     target's own next token. Sampling: accept d_i with probability min(1, p(d_i)/q(d_i));
     at the first rejection sample from norm(max(0, p - q)); when all are accepted sample a
     bonus token from p at P+g. Either way each new token has exactly the target's
     (filtered) distribution, so the output is that of plain decoding. Greedy: token for
     token, because the runtime's kernels for up to MAX_ROWS tokens (model/fused.py) give each
     position the same logits bit for bit whether it is verified in a chunk or decoded alone
     (without the native kernels, equal up to floating-point ties);
  4. rollback: the target's cache is valid for [0, P + n + 1) and the next round writes from
     there; the draft is told the same (`Draft.rollback`).

`gamma` is a fixed int, "auto" (AdaptiveGamma: learns acceptance and costs online and picks the
draft length that maximizes expected tokens per second) or "heuristic" (+2 after a fully
accepted round, -1 otherwise, as transformers' assisted generation does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import LeanlmError
from ..model import fused as _fused
from ..model.runtime import Transformer
from .drafts import Draft, EarlyExitDraft, LookupDraft, ModelDraft
from .generate import GenerationStats, Sampling, check_context, filtered_probs, sample
from .kernels import PackedLinear, output_head


class Target:
    """The verified model: logits for a chunk of tokens written to its cache at `start`.

    When the model's layers were packed (kernels.pack_model), the LM head is packed too, so a
    k-token verification costs about one decode step."""

    def __init__(self, model: Transformer):
        self.model = model
        self.head = output_head(model)
        self.vocab_size = model.config.vocab_size  # not a weight's shape: a quantized table's `weight` is empty

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        x = self.model.hidden(torch.tensor([tokens], device=self.model.device), start)
        return self.head(x)[0]

    def prefill(self, tokens: list[int]) -> torch.Tensor:
        x = self.model.hidden(torch.tensor([tokens], device=self.model.device), 0)
        return self.head(x[:, -1:])[0, -1]


# ---- acceptance ---------------------------------------------------------------------------
def accept_greedy(drafts: list[int], logits: torch.Tensor) -> tuple[int, int]:
    """(number of drafts accepted, the target's next token after them)."""
    best = logits.argmax(-1).tolist()
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return n, best[n]


def accept_sampled(drafts: list[int], q: torch.Tensor | None, logits: torch.Tensor, sampling: Sampling,
                   gen: torch.Generator | None = None) -> tuple[int, int]:  # fmt: skip
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023).

    q [g, V]: the draft's distributions the drafts were sampled from; None means point
    proposals (prompt lookup), i.e. q one-hot on each draft token."""
    p = filtered_probs(logits, sampling)  # [g+1, V], the target's next-token distributions
    for i, d in enumerate(drafts):
        pd = float(p[i, d])
        qd = 1.0 if q is None else float(q[i, d])
        if float(torch.rand((), generator=gen)) * qd < pd:  # u < p/q, u ~ U[0, 1)
            continue
        if q is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_(min=0.0)
        if not float(residual.sum()) > 0.0:  # only by rounding: p == q where rejection is impossible
            residual = p[i]
        return i, int(torch.multinomial(residual, 1, generator=gen))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=gen))


# ---- draft length policies -------------------------------------------------------------------
class FixedGamma:
    def __init__(self, gamma: int):
        if gamma < 0:
            raise LeanlmError(f"gamma must be >= 0, got {gamma}")
        self.gamma, self.name = gamma, f"fixed-{gamma}"

    def next(self, context=None) -> int:
        return self.gamma

    def update(self, drafted: int, accepted: int, draft_s: float, verify_s: float, context=None) -> None:
        pass


class HeuristicGamma(FixedGamma):
    """transformers' 'heuristic' schedule: +2 after a fully accepted round, else -1 (min 1)."""

    def __init__(self, gamma: int = 4, max_gamma: int = 16):
        super().__init__(gamma)
        self.max_gamma, self.name = max_gamma, "heuristic"

    def update(self, drafted, accepted, draft_s, verify_s, context=None):
        if drafted == 0:
            return
        self.gamma = min(self.max_gamma, self.gamma + 2) if accepted == drafted else max(1, self.gamma - 1)


class _Context:
    """What AdaptiveGamma learns about one kind of proposal (decayed counts and sums)."""

    def __init__(self, depth: int):
        self.acc, self.rej = 1.0, 0.5  # pooled prior: acceptance 2/3, worth 1.5 tokens
        self.tried, self.taken = [0.0] * depth, [0.0] * depth  # per draft position
        self.fit: list[float] | None = None  # draft seconds vs drafted tokens: w, x, t, xx, xt

    def draft_cost(self) -> tuple[float, float]:
        """(seconds per round, seconds per drafted token): a ridge fit pulling the per-round part to
        0 until several lengths were seen. The per-round part matters: a compressed copy first
        copies the target's new KV entries, which a per-token rate would charge g times."""
        if self.fit is None:
            return 0.0, 0.0  # a new kind of proposal: optimistic once, then measured
        w, x, t, xx, xt = self.fit
        mu = 0.05  # (any mu > 0 gives a = 0 while every round drafted the same length)
        det = (w + mu) * xx - x * x
        a = (xx * t - x * xt) / det
        b = ((w + mu) * xt - x * t) / det
        return max(a, 0.0), max(b, 0.0)


class AdaptiveGamma:
    """Online draft length: pick g maximizing expected new tokens per second of a round,

        E[tokens](g) = 1 + a_1 + a_1 a_2 + ... + a_1 ... a_g   (a_i: P(draft i accepted | 1..i-1 were))
        time(g)      = c0 + c1 g + v(g)                        (draft cost, verification cost v)

    a_i is learned from which draft positions were accepted and which was rejected, the draft
    cost from timed draft calls (a line in g: a per-round part, e.g. a compressed copy syncing
    its KV cache, and a per-token part) and v(g) from timed verification passes, all with exponential
    forgetting so the policy follows the text (copying a passage vs free text).
    - Acceptance is learned per position because it is bursty: once a draft agrees it tends to
      keep agreeing (a_i grows with i), which a single geometric rate misses and then drafts
      too short. A position seldom tried leans (2 pseudo-counts) on the larger of the pooled
      rate and the position before it.
    - v is kept per g: it is a staircase here (the kernels take rows in fours), which a line fits
      badly. A g never timed yet is priced at the dearest shorter length timed (optimistic, so
      it gets tried), or before any, off a line fitted by least squares to all passes, with a
      ridge term pulling its slope towards `slope_prior` x its intercept.
    - a and c are learned per context when the draft names one before proposing
      (`Draft.context`): prompt lookup reports the matched n-gram length and whether its last
      proposal was taken whole (a 3-token match inside a passage being copied is accepted far
      more often than a 1-token match in free text), and lookup with a model fallback also says
      which of the two proposes (free vs a good fraction of a step per token).
    - What one generation learned seeds the next one with the same model and draft (`remember` /
      `warm_start`): costs in full (facts about the target, the draft and the machine), acceptance
      scaled by `carry` (it also depends on the text; decay forgets it within a few rounds). With
      64-token answers a fresh start spent several rounds re-learning what the last answer knew.
    When g = 0 wins (drafts useless), one round in `explore` still drafts 1 token.
    """

    def __init__(self, max_gamma: int = 8, start: int = 3, decay: float = 0.85, slope_prior: float = 0.1,
                 explore: int = 8, carry: float = 0.5):  # fmt: skip
        self.max_gamma, self.gamma, self.decay, self.slope_prior, self.explore = max_gamma, start, decay, slope_prior, explore
        self.carry = carry
        self.name = "auto"
        self.stats: dict = {}  # context -> _Context
        self.fit = [0.0] * 5  # decayed sums: w, x, t, xx, xt
        self.verify_s: dict[int, float] = {}  # drafts verified -> decayed mean seconds
        self.zero_rounds = 0

    def warm_start(self, model, draft_name: str) -> None:
        mem = model.__dict__.get("_speculative_costs", {}).get(draft_name)
        if mem:
            self.verify_s, self.fit = dict(mem["verify_s"]), list(mem["fit"])
            for context, fit in mem["draft_fit"].items():
                self._ctx(context).fit = list(fit)
            for context, (acc, rej, tried, taken) in mem.get("accept", {}).items():
                st, c = self._ctx(context), self.carry  # (the decayed prior in the carried sums is small)
                st.acc, st.rej = st.acc + c * acc, st.rej + c * rej
                st.tried = [a + c * b for a, b in zip(st.tried, tried)]
                st.taken = [a + c * b for a, b in zip(st.taken, taken)]

    def remember(self, model, draft_name: str) -> None:
        if self.verify_s:  # per draft: some drafts verify on part of the target only (early exit)
            model.__dict__.setdefault("_speculative_costs", {})[draft_name] = {  # (plain attribute, not state)
                "verify_s": dict(self.verify_s), "fit": list(self.fit),
                "draft_fit": {k: list(st.fit) for k, st in self.stats.items() if st.fit is not None},
                "accept": {k: (st.acc, st.rej, list(st.tried), list(st.taken)) for k, st in self.stats.items()}}  # fmt: skip

    def _ctx(self, context) -> _Context:
        if context not in self.stats:
            self.stats[context] = _Context(self.max_gamma)  # (the loop never drafts more)
        return self.stats[context]

    def acceptance(self, context=None) -> float:
        st = self._ctx(context)
        return st.acc / (st.acc + st.rej)

    def position_acceptance(self, context=None) -> list[float]:
        """a_i for draft positions 1..max_gamma. A position seldom tried leans on max(pooled rate,
        a_{i-1}): acceptance grows with depth when it is bursty, so a depth never drafted is priced
        at least like the one before it. (On the pooled rate alone, a copy that stays right was
        held at its first drafts' length: the int4 self-copy reached 0.88x the best fixed length.)"""
        st = self._ctx(context)
        prior = min(st.acc / (st.acc + st.rej), 0.999)
        out = []
        for i in range(self.max_gamma):
            out.append(min((st.taken[i] + 2 * prior) / (st.tried[i] + 2), 0.999))
            prior = max(prior, out[-1])
        return out

    def verify_line(self) -> tuple[float, float]:
        w, x, t, xx, xt = self.fit
        mu, s = 1.0, self.slope_prior  # ridge: mu * (t1 - s * t0)^2
        a11, a12, a22 = w + mu * s * s, x - mu * s, xx + mu
        det = a11 * a22 - a12 * a12
        t0, t1 = (a22 * t - a12 * xt) / det, (a11 * xt - a12 * t) / det
        return max(t0, 1e-6), max(t1, 0.0)

    def next(self, context=None) -> int:
        st = self._ctx(context)
        if self.fit[0] == 0.0:
            return self.gamma  # nothing timed yet
        c0, c1 = st.draft_cost()
        t0, t1 = self.verify_line()
        best, best_rate, expect, p, floor = 0, 0.0, 1.0, 1.0, 0.0
        for g, a in enumerate([None] + self.position_acceptance(context)):
            if g:
                p *= a
                expect += p
            # a length never verified yet is priced optimistically, at the dearest shorter one seen
            # (v does not decrease with g): otherwise a step up in the staircase, extrapolated, would
            # keep the policy from ever trying the cheap lengths beyond it
            v = self.verify_s.get(g)
            if v is None:
                v = floor if floor > 0 else t0 + t1 * g
            floor = max(floor, v)
            rate = expect / ((c0 + c1 * g if g else 0.0) + v)
            if rate > best_rate:
                best, best_rate = g, rate
        if best == 0:
            self.zero_rounds += 1
            if self.zero_rounds % self.explore == 0:
                best = 1
        self.gamma = best
        return best

    def update(self, drafted, accepted, draft_s, verify_s, context=None):
        d = self.decay
        if drafted:
            st = self._ctx(context)
            st.acc = d * st.acc + accepted
            st.rej = d * st.rej + (1.0 if accepted < drafted else 0.0)
            for i in range(len(st.tried)):
                st.tried[i] *= d
                st.taken[i] *= d
            for i in range(min(accepted + 1, drafted, len(st.tried))):  # 1..accepted taken, the next refused
                st.tried[i] += 1.0
                st.taken[i] += 1.0 if i < accepted else 0.0
            x = float(drafted)
            st.fit = [(0.0 if st.fit is None else d * f) + v for f, v in
                      zip(st.fit or [0.0] * 5, (1.0, x, draft_s, x * x, x * draft_s))]  # fmt: skip
        x, t = float(drafted), verify_s
        self.fit = [d * f + v for f, v in zip(self.fit, (1.0, x, t, x * x, x * t))]
        prev = self.verify_s.get(drafted)
        self.verify_s[drafted] = t if prev is None else d * prev + (1 - d) * t


def make_policy(gamma) -> FixedGamma | HeuristicGamma | AdaptiveGamma:
    if isinstance(gamma, (FixedGamma, AdaptiveGamma)):
        return gamma
    if gamma == "auto":
        return AdaptiveGamma()
    if gamma == "heuristic":
        return HeuristicGamma()
    try:
        return FixedGamma(int(gamma))
    except (TypeError, ValueError):
        raise LeanlmError(f"gamma must be a number, 'auto' or 'heuristic', got {gamma!r}") from None


# ---- statistics ----------------------------------------------------------------------------
@dataclass
class SpecStats:
    draft: str = ""
    policy: str = ""
    rounds: int = 0  # target forward passes after prefill
    drafting_rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    accept_hist: dict = field(default_factory=dict)  # accepted drafts per drafting round -> count
    gammas: dict = field(default_factory=dict)  # drafted tokens per round -> count

    def record(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.gammas[drafted] = self.gammas.get(drafted, 0) + 1
        if drafted:
            self.drafting_rounds += 1
            self.accept_hist[accepted] = self.accept_hist.get(accepted, 0) + 1

    def summary(self) -> dict:
        return {
            "draft": self.draft, "gamma": self.policy, "rounds": self.rounds, "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "mean_accepted": self.accepted / self.drafting_rounds if self.drafting_rounds else 0.0,
            "tokens_per_verify": (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0,
            "mean_drafted": self.drafted / self.rounds if self.rounds else 0.0,
            "draft_s": self.draft_s, "verify_s": self.verify_s,
        }  # fmt: skip


# ---- the decode loop -------------------------------------------------------------------------
@torch.inference_mode()
def speculative_generate_tokens(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int = 128,
    sampling: Sampling | None = None,
    eos_ids: set[int] | None = None,
    stats: GenerationStats | None = None,
    draft: Draft | None = None,
    gamma: int | str = "auto",
) -> Iterator[int]:
    """Like generate_tokens (same arguments and output distribution), with a draft proposing.

    stats.extra["speculative"] holds a SpecStats (acceptance rate, mean accepted length...)."""
    sampling = sampling or Sampling()
    gen = sampling.generator()
    eos_ids = set(model.config.eos_token_ids) if eos_ids is None else eos_ids
    max_new_tokens = check_context(model, len(prompt_ids), max_new_tokens)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    draft = draft if draft is not None else Draft()
    policy = make_policy(gamma)
    if isinstance(policy, AdaptiveGamma):
        policy.warm_start(model, draft.name)
    spec = SpecStats(draft=draft.name, policy=policy.name)
    stats.extra["speculative"] = spec
    target = Target(model)
    total = len(prompt_ids) + max_new_tokens  # the last verified position is < total
    model.setup_cache(1, total)
    clock = time.perf_counter
    try:
        t0 = clock()
        draft.start(target, list(prompt_ids), total)
        tok = sample(target.prefill(list(prompt_ids)), sampling, gen)
        stats.prefill_s = clock() - t0
        seq = list(prompt_ids) + [tok]
        stats.new_tokens, stats.decode_s, stats.stop_reason = 1, 0.0, "length"
        t1 = clock()
        yield tok
        if tok in eos_ids:
            stats.stop_reason = "eos"
            return
        while stats.new_tokens < max_new_tokens:
            pos = len(seq) - 1
            # a verification forward of <= MAX_ROWS tokens runs the decode step's kernels, which are
            # batch-invariant: its logits are bit for bit those of plain one-token decoding
            ctx = draft.context(seq)  # what kind of proposal comes next (the policy learns each apart)
            g = min(policy.next(ctx), max_new_tokens - stats.new_tokens - 1, _fused.MAX_ROWS - 1)
            ta = clock()
            drafts, q = draft.propose(seq, g, sampling, gen) if g > 0 else ([], None)
            drafts, q = drafts[: max(g, 0)], (None if q is None else q[: max(g, 0)])
            tb = clock()
            logits = draft.verify([seq[-1]] + drafts, pos)
            if sampling.temperature == 0:
                n, nxt = accept_greedy(drafts, logits)
            else:
                n, nxt = accept_sampled(drafts, q, logits, sampling, gen)
            tc = clock()
            draft.rollback(pos + n + 1)  # cache entries from here on are stale
            policy.update(len(drafts), n, tb - ta, tc - tb, ctx)
            spec.record(len(drafts), n, tb - ta, tc - tb)
            for t in drafts[:n] + [nxt]:
                seq.append(t)
                stats.new_tokens += 1
                stats.decode_s = clock() - t1
                yield t
                if t in eos_ids:
                    stats.stop_reason = "eos"
                    return
    finally:
        draft.finish()
        model.clear_cache()
        if isinstance(policy, AdaptiveGamma):
            policy.remember(model, draft.name)


# ---- building drafts -------------------------------------------------------------------------
DRAFT_KINDS = ("lookup", "self", "draft", "lookup+self", "lookup+draft")


def self_draft_model(target: Transformer, dtype="bfloat16") -> Transformer:
    """A compressed copy of the target (same weights in `dtype`) to draft with.

    Make it before kernels.pack_model(target): it copies the dense weights."""
    from ..model.load import build_model, parse_dtype

    if isinstance(target.layers[0].attn.wqkv, PackedLinear):
        raise LeanlmError("make the self-draft copy before packing the target (kernels.pack_model)")
    draft = build_model(target.config, target.state_dict(), parse_dtype(dtype), target.device)
    draft.source = f"{getattr(target, 'source', 'target')} ({str(draft.dtype).removeprefix('torch.')} copy)"
    return draft


def make_draft(kind: str, target: Transformer, draft_model: Transformer | None = None,
               layers: int | None = None, threshold: float | None = None) -> Draft:  # fmt: skip
    """'lookup'; 'self': the target's first `layers` layers (EarlyExitDraft) or, without
    `layers`, a compressed copy of it (draft_model, default a bf16 copy); 'draft': draft_model;
    'lookup+self' / 'lookup+draft': lookup first, the model draft when nothing matches."""
    if kind not in DRAFT_KINDS:
        raise LeanlmError(f"unknown draft kind '{kind}'; use one of: {', '.join(DRAFT_KINDS)}")
    base, _, fallback = kind.partition("+")
    if base == "lookup" and not fallback:
        return LookupDraft()
    model_kind = fallback or base
    if model_kind == "self" and layers:
        d: Draft = EarlyExitDraft(layers, threshold)
    elif model_kind == "self":
        copy = draft_model if draft_model is not None else self_draft_model(target)
        d = ModelDraft(copy, threshold, name=f"self-{str(copy.dtype).removeprefix('torch.')}", sync_kv=True)
    else:
        if draft_model is None:
            raise LeanlmError("--speculate draft needs a draft model (--draft MODEL)")
        d = ModelDraft(draft_model, threshold)
    return LookupDraft(fallback=d) if fallback else d


__all__ = [
    "speculative_generate_tokens", "make_draft", "make_policy", "Target", "SpecStats", "FixedGamma",
    "HeuristicGamma", "AdaptiveGamma", "accept_greedy", "accept_sampled", "DRAFT_KINDS", "self_draft_model",
]  # fmt: skip
