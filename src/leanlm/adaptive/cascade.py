"""Cascades: a cheap model answers first; its confidence decides whether a larger model is asked.

A cascade is a ladder of models that share one tokenizer (cheapest first, e.g. int4 Qwen2.5-0.5B ->
Qwen2.5-0.5B -> Qwen2.5-1.5B) and one threshold per rung but the last. Crossing tokenizers would need the text
re-encoded and the confidences re-calibrated per model pair; leanlm restricts a cascade to models whose
tokenizers encode identically (checked on a probe text) and raises otherwise.

Confidence:
- multiple-choice tasks: the probability the rung gives its chosen answer, a softmax over the choices'
  log-likelihoods (the scores lm-eval's `acc` ranks by); escalate when it is below the rung's threshold;
- generation, DeepConf-style: token confidence c_i = -mean log-prob of the top-k candidates at step i (high when
  the distribution is peaked), group confidence = the mean of c over a sliding window of `window` tokens, and the
  answer's confidence = its lowest group confidence (or the tail's mean over the last `window` tokens); escalate
  (the next rung answers afresh) when it is below the threshold.

Cost: what the cost model prices each rung's work at (hardware profile `hw`): per forward call one weight read
(the decode step time) plus the tokens at the prefill rate, so a cascade's cost is comparable with the largest
model alone; measured seconds are reported beside it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LeanlmError

PROBE = "Cascades need one tokenizer: 0123 naïve café ☃ def f(x): return x**2\n"


@dataclass
class Rung:
    name: str
    model: object
    step_s: float = 0.0       # cost model: one forward call's weight read
    token_s: float = 0.0      # cost model: one more token in a forward call

    def price(self, calls: int, tokens: int) -> float:
        return calls * self.step_s + tokens * self.token_s


@dataclass
class Cascade:
    rungs: list[Rung]
    thresholds: list[float]
    confidence: str = "lowest_group"   # generation: lowest_group | tail
    window: int = 16
    top_k: int = 5
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.rungs) < 2:
            raise LeanlmError("a cascade needs at least two models, cheapest first (--cascade SMALL,LARGE)")
        if len(self.thresholds) != len(self.rungs) - 1:
            raise LeanlmError(f"a cascade of {len(self.rungs)} models needs {len(self.rungs) - 1} thresholds "
                              f"(one per model but the last), got {len(self.thresholds)}")  # fmt: skip
        if self.confidence not in ("lowest_group", "tail"):
            raise LeanlmError(f"cascade confidence must be lowest_group or tail, got {self.confidence!r}")


def check_shared_tokenizer(tokenizers: list, names: list[str]) -> None:
    ref = tokenizers[0](PROBE).input_ids
    for tok, name in zip(tokenizers[1:], names[1:]):
        if tok(PROBE).input_ids != ref:
            raise LeanlmError(f"{name} does not share {names[0]}'s tokenizer; a cascade needs models with one "
                              "tokenizer (e.g. sizes of one family)")  # fmt: skip


def price_rungs(rungs: list[Rung], hw_name: str = "cpu", log=print) -> None:
    """Fill each rung's step and token price from the cost model."""
    from ..apply import plan_for
    from ..hardware import estimate
    from ..hardware.calibrate import profile_or_calibrate

    hw = profile_or_calibrate(hw_name, log)
    for r in rungs:
        e = estimate(r.model.config, hw, plan_for(r.model), prompt_len=512, context=256)
        r.step_s = e["decode_step_ms"] / 1e3
        r.token_s = 1 / e["prefill_tok_s"]


# ---- multiple choice --------------------------------------------------------------------------------------
def choice_confidence(lls: list[float]) -> tuple[int, float]:
    """(chosen index, its softmax probability over the choices)."""
    p = torch.softmax(torch.tensor(lls, dtype=torch.float64), 0)
    i = int(p.argmax())
    return i, float(p[i])


def score_doc(model, tokenizer, doc) -> dict:
    """One rung's answer to one document: chosen index, confidence, and the work (calls, tokens, seconds)."""
    from ..evaluate.tasks import encode_pair, score_choices

    t0 = time.perf_counter()
    scores = score_choices(model, tokenizer, doc, model.config.max_seq_len)
    secs = time.perf_counter() - t0
    pairs = [encode_pair(tokenizer, c, k) for c, k in zip(doc.contexts, doc.continuations)]
    contexts = {tuple(c) for c, _ in pairs}
    calls = len(contexts) + sum(len(k) > 1 for _, k in pairs)
    tokens = sum(len(c) for c in contexts) + sum(max(len(k) - 1, 0) for _, k in pairs)
    pred, conf = choice_confidence([s for s, _ in scores])
    return {"pred": pred, "conf": conf, "calls": calls, "tokens": tokens, "seconds": secs}


def replay(per_rung: list[list[dict]], thresholds: list[float], rungs: list[Rung], gold: list[int]) -> dict:
    """The cascade's answers from each rung's answers to every document (a rung's answer does not depend on
    whether it was asked, so this equals running the cascade live): accuracy, share answered per rung, cost as
    priced and as measured, both also as a share of the last rung alone."""
    n = len(gold)
    correct, price, secs, answered = 0, 0.0, 0.0, [0] * len(rungs)
    for d in range(n):
        for i, rung in enumerate(rungs):
            a = per_rung[i][d]
            price += rung.price(a["calls"], a["tokens"])
            secs += a["seconds"]
            if i == len(rungs) - 1 or a["conf"] >= thresholds[i]:
                answered[i] += 1
                correct += a["pred"] == gold[d]
                break
    last = rungs[-1]
    large_price = sum(last.price(a["calls"], a["tokens"]) for a in per_rung[-1])
    large_secs = sum(a["seconds"] for a in per_rung[-1])
    return {"acc": correct / n, "answered_share": [a / n for a in answered], "cost": price,
            "cost_share_of_large": price / large_price if large_price else math.nan,
            "measured_share_of_large": secs / large_secs if large_secs else math.nan}  # fmt: skip


def evaluate_task_cascade(cascade: Cascade, tokenizer, task: str, data_dir=None, limit: int | None = None,
                          progress: bool = True) -> dict:  # fmt: skip
    """Run the cascade live on a multiple-choice task: each document goes up the ladder until a rung is sure."""
    from tqdm.auto import tqdm

    from ..evaluate.tasks import load_docs

    if task == "lambada":
        raise LeanlmError("lambada is scored by greedy match, not by choosing; cascade the choice tasks")
    docs = load_docs(task, data_dir, limit)
    per_rung: list[list[dict | None]] = [[None] * len(docs) for _ in cascade.rungs]
    answers = []
    for d, doc in enumerate(tqdm(docs, desc=f"{task} (cascade)", disable=not progress, leave=False)):
        for i, rung in enumerate(cascade.rungs):
            a = score_doc(rung.model, tokenizer, doc)
            per_rung[i][d] = a
            if i == len(cascade.rungs) - 1 or a["conf"] >= cascade.thresholds[i]:
                answers.append((i, a["pred"]))
                break
    gold = [doc.gold for doc in docs]
    acc = float(np.mean([p == g for (_, p), g in zip(answers, gold)]))
    price = sum(r.price(a["calls"], a["tokens"]) for i, r in enumerate(cascade.rungs) for a in per_rung[i] if a)
    # what the last rung alone would have cost: priced from the work it would have done (its own tokens are the
    # same as any rung's: one tokenizer)
    first = per_rung[0]
    large = cascade.rungs[-1].price(sum(a["calls"] for a in first), sum(a["tokens"] for a in first))
    return {"task": task, "n": len(docs), "acc": acc,
            "answered_share": [sum(i == k for i, _ in answers) / len(docs) for k in range(len(cascade.rungs))],
            "cost_share_of_large": price / large if large else math.nan,
            "models": [r.name for r in cascade.rungs], "thresholds": cascade.thresholds}  # fmt: skip


# ---- generation (DeepConf-style) ------------------------------------------------------------------------------
def token_confidence(logits: torch.Tensor, top_k: int) -> float:
    """-mean log-prob of the top-k candidates: large when the distribution is peaked."""
    lp = F.log_softmax(logits.float(), -1)
    return float(-lp.topk(top_k).values.mean())


def trace_confidence(confs: list[float], window: int, kind: str) -> float:
    if not confs:
        return math.inf
    if kind == "tail" or len(confs) <= window:
        return float(np.mean(confs[-window:]))
    c = np.cumsum([0.0, *confs])
    return float(((c[window:] - c[:-window]) / window).min())


@torch.inference_mode()
def generate_with_confidence(model, prompt_ids: list[int], max_new_tokens: int, top_k: int,
                             eos_ids: set[int] | None = None) -> tuple[list[int], list[float]]:  # fmt: skip
    """Greedy generation that also returns each step's token confidence."""
    from ..decode.generate import check_context

    eos_ids = set(model.config.eos_token_ids) if eos_ids is None else eos_ids
    max_new_tokens = check_context(model, len(prompt_ids), max_new_tokens)
    model.setup_cache(1, len(prompt_ids) + max_new_tokens)
    try:
        logits = model(torch.tensor([prompt_ids], device=model.device), start=0, last_only=True)[0, -1]
        out, confs, pos = [], [], len(prompt_ids)
        for _ in range(max_new_tokens):
            confs.append(token_confidence(logits, top_k))
            tok = int(logits.argmax())
            out.append(tok)
            if tok in eos_ids or len(out) == max_new_tokens:
                break
            logits = model(torch.tensor([[tok]], device=model.device), start=pos)[0, -1]
            pos += 1
        return out, confs
    finally:
        model.clear_cache()


def cascade_generate(cascade: Cascade, prompt_ids: list[int], max_new_tokens: int) -> dict:
    """Each rung answers afresh until one is confident; returns the tokens, the rung that answered, the cost."""
    price = 0.0
    for i, rung in enumerate(cascade.rungs):
        toks, confs = generate_with_confidence(rung.model, prompt_ids, max_new_tokens, cascade.top_k)
        price += rung.price(1 + len(toks), len(prompt_ids) + len(toks))
        conf = trace_confidence(confs, cascade.window, "tail" if cascade.confidence == "tail" else "lowest_group")
        if i == len(cascade.rungs) - 1 or conf >= cascade.thresholds[i]:
            return {"tokens": toks, "rung": i, "confidence": conf, "cost": price}
    raise AssertionError("unreachable: the last rung always answers")
