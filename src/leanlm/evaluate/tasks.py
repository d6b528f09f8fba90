"""Zero-shot multiple choice with lm-evaluation-harness conventions.

Each task turns a document into (context, [continuations], gold). A choice's score is the
summed log-probability of its continuation tokens given the context; `acc` takes the best
sum, `acc_norm` the best sum divided by the continuation's length in bytes. Prompts follow
the harness's task YAMLs (hellaswag preprocessing, "Question: ...\\nAnswer:" for PIQA/ARC,
partial scoring for WinoGrande, last-word prediction for LAMBADA).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LeanlmError
from .data import data_file, read_jsonl
from .perplexity import adds_bos


@dataclass
class Doc:
    contexts: list[str]  # one per choice (WinoGrande varies the context), else repeated
    continuations: list[str]
    gold: int


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _mc(context: str, choices: list[str], gold: int) -> Doc:
    return Doc([context] * len(choices), [" " + c for c in choices], gold)


def load_docs(task: str, data_dir=None, limit: int | None = None) -> list[Doc]:
    if task == "hellaswag":
        docs = []
        for d in read_jsonl(data_file("hellaswag", data_dir), limit):
            ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
            docs.append(_mc(_hellaswag_clean(d["activity_label"] + ": " + ctx), [_hellaswag_clean(e) for e in d["endings"]], int(d["label"])))
        return docs
    if task == "piqa":
        path = data_file("piqa", data_dir)
        labels = path.with_name("valid-labels.lst").read_text().split()
        return [_mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(labels[i]))
                for i, d in enumerate(read_jsonl(path, limit))]  # fmt: skip
    if task in ("arc_easy", "arc_challenge"):
        return [_mc(f"Question: {d['question']}\nAnswer:", d["choices"], d["gold"]) for d in read_jsonl(data_file(task, data_dir), limit)]
    if task == "openbookqa":
        return [_mc(d["question_stem"], d["choices"], d["gold"]) for d in read_jsonl(data_file(task, data_dir), limit)]
    if task == "boolq":
        return [_mc(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(d["answer"]))
                for d in read_jsonl(data_file(task, data_dir), limit)]  # fmt: skip
    if task == "winogrande":
        docs = []
        for d in read_jsonl(data_file(task, data_dir), limit):
            i = d["sentence"].index("_")
            rest = " " + d["sentence"][i + 1 :].strip()
            docs.append(Doc([d["sentence"][:i] + d["option1"], d["sentence"][:i] + d["option2"]], [rest, rest], int(d["answer"]) - 1))
        return docs
    if task == "lambada":
        docs = []
        for d in read_jsonl(data_file(task, data_dir), limit):
            ctx, word = d["text"].rsplit(" ", 1)
            docs.append(Doc([ctx], [" " + word], 0))
        return docs
    raise LeanlmError(f"unknown task '{task}'; available: {', '.join(TASKS)}")


TASKS = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "lambada", "openbookqa")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split: trailing context spaces move to the continuation; the
    continuation's tokens are those of (context + continuation) past the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    prefix = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    return prefix + ctx, whole[len(ctx) :]


@torch.inference_mode()
def score_choices(model, tokenizer, doc: Doc, max_len: int) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy match) of each continuation.

    A context shared by several choices is run once into the KV cache; each continuation
    then runs on top of it (re-using the cache positions), so a 4-choice HellaSwag item
    costs one context pass plus four short passes instead of four full sequences.
    """
    pairs = [encode_pair(tokenizer, c, k) for c, k in zip(doc.contexts, doc.continuations)]
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    groups: dict[tuple, list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(i)
    dev = model.device
    for ctx_key, idx in groups.items():
        longest = max(len(pairs[i][1]) for i in idx)
        ctx = list(ctx_key)[-(max_len - longest) :]  # keep the end of an over-long context
        model.setup_cache(1, len(ctx) + longest)
        first = model(torch.tensor([ctx], device=dev), start=0, last_only=True)[0, -1]
        for i in idx:
            cont = pairs[i][1]
            logits = [first[None]]
            if len(cont) > 1:
                logits.append(model(torch.tensor([cont[:-1]], device=dev), start=len(ctx))[0])
            logp = F.log_softmax(torch.cat(logits), -1)
            target = torch.tensor(cont, device=logp.device)
            out[i] = (logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all()))
    model.clear_cache()
    return out


def bootstrap_stderr(values: np.ndarray, n: int = 1000, seed: int = 1234) -> float:
    if len(values) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    return float(means.std(ddof=1))


def evaluate_task(model, tokenizer, task: str, data_dir=None, limit: int | None = None, progress=True) -> dict:
    docs = load_docs(task, data_dir, limit)
    max_len = model.config.max_seq_len
    acc, acc_norm, lls = [], [], []
    for doc in tqdm(docs, desc=task, disable=not progress, leave=False):
        scores = score_choices(model, tokenizer, doc, max_len)
        if task == "lambada":
            lls.append(scores[0][0])
            acc.append(float(scores[0][1]))
            continue
        ll = np.array([s for s, _ in scores])
        acc.append(float(ll.argmax() == doc.gold))
        nbytes = np.array([len(c.encode("utf-8")) for c in doc.continuations])
        acc_norm.append(float((ll / nbytes).argmax() == doc.gold))
    res = {"task": task, "n": len(docs), "acc": float(np.mean(acc)), "acc_stderr": bootstrap_stderr(np.array(acc))}
    if task == "lambada":
        res["ppl"] = math.exp(-float(np.mean(lls)))
    elif task != "winogrande":
        res["acc_norm"] = float(np.mean(acc_norm))
        res["acc_norm_stderr"] = bootstrap_stderr(np.array(acc_norm))
    return res
