"""Needle-in-a-haystack recall: plant a fact in book text of a target length, ask for it, check the answer.

    case = make_case(tokenizer, book_text, context=8192, depth=0.5, seed=0)
    ids = case.ids                                   # the whole prompt, <= context tokens
    ok = recalled(tokenizer, generated_ids, case)    # the number appears exactly in the greedy answer

The needle is "The secret passphrase is NNNNNN." (a seeded random 6-digit number) inserted at a sentence
boundary near `depth` (0 = start, 1 = end) of the haystack; the question follows the text and, when the
tokenizer has a chat template, the whole prompt goes through it (leanlm.decode.generate.encode_prompt), and the
answer is primed with "The secret passphrase is" (after the assistant turn's start), so a few greedy tokens
hold the number.
The haystack is book text from `offset` tokens on (past a Gutenberg header), trimmed so the prompt fits
`context` tokens. `case.score_range` is the slice of haystack tokens after the needle (at most `score`
tokens, ending before the question) that a policy-aware perplexity can be taken on.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..errors import LeanlmError

QUESTION = "What is the secret passphrase mentioned in the text above? Answer with the number only."
PRIMER = "The secret passphrase is"


@dataclass
class NeedleCase:
    ids: list[int]
    answer: str
    depth: float
    needle_token: int               # index in ids where the needle sentence starts (approximate by a few tokens)
    context: int
    score_range: tuple[int, int]    # positions [lo, hi) of haystack text after the needle, for perplexity


def _encode(tokenizer, text: str, chat: bool) -> list[int]:
    from ..decode.generate import encode_prompt

    return encode_prompt(tokenizer, text, chat)


def make_case(tokenizer, text: str, context: int, depth: float, seed: int = 0, offset: int = 2000,
              chat: bool | None = None, score: int = 1024,
              book_ids: list[int] | None = None) -> NeedleCase:  # fmt: skip
    """A prompt of at most `context` tokens: haystack with the needle at `depth`, then the question."""
    if not 0.0 <= depth <= 1.0:
        raise LeanlmError(f"needle depth must be in [0, 1], got {depth}")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    rng = random.Random(f"{seed}:{context}:{depth}")
    answer = str(rng.randrange(100000, 1000000))
    needle = f"The secret passphrase is {answer}."
    ids = book_ids if book_ids is not None else tokenizer(text, add_special_tokens=False).input_ids
    # the answer is primed ("The secret passphrase is"), so a few greedy tokens hold the number
    primer = tokenizer(PRIMER if chat else "\n" + PRIMER, add_special_tokens=False).input_ids
    overhead = len(_encode(tokenizer, needle + "\n\n" + QUESTION, chat)) + len(primer) + 4
    n = context - overhead
    if n < 64 or offset + n > len(ids):
        raise LeanlmError(f"needle: a {context}-token prompt needs {n + offset} haystack tokens, the text has "
                          f"{len(ids)}")
    for _ in range(4):  # re-tokenizing the joined text changes the count by a few tokens: trim until it fits
        hay = ids[offset : offset + n]
        cut = _sentence_cut(tokenizer, hay, int(len(hay) * depth))
        before = tokenizer.decode(hay[:cut]).rstrip()
        after = tokenizer.decode(hay[cut:]).lstrip()
        head = (before + " " if before else "") + needle
        prompt = head + " " + after + "\n\n" + QUESTION
        full = _encode(tokenizer, prompt, chat) + primer
        if len(full) <= context:
            break
        n -= len(full) - context + 2
    else:
        raise LeanlmError(f"needle: could not fit the prompt into {context} tokens")
    # where the needle and the text after it sit in the prompt (a chat template adds a few tokens around the
    # text, so the bounds keep a margin of 16 tokens): the needle ends before len(head_ids); the book text ends
    # before the question, which the prompt without it locates
    head_end = len(_encode(tokenizer, head, chat))
    hi = len(_encode(tokenizer, head + " " + after, chat)) - 16
    lo = max(head_end + 8, hi - score)
    needle_start = max(0, head_end - len(tokenizer(needle, add_special_tokens=False).input_ids) - 16)
    return NeedleCase(full, answer, depth, needle_start, context, (lo, max(lo, hi)))


def _sentence_cut(tokenizer, hay: list[int], at: int) -> int:
    """The first token boundary at or after `at` that follows a sentence end (within 64 tokens), else `at`."""
    for i in range(at, min(len(hay), at + 64)):
        if i and re.search(r"[.!?][\"')\]]?\s*$", tokenizer.decode(hay[i - 1 : i])):
            return i
    return at


def recalled(tokenizer, generated: list[int], case: NeedleCase) -> bool:
    """True when the answer's digits appear, not as part of a longer number, in the generated text."""
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return re.search(rf"(?<!\d){case.answer}(?!\d)", text) is not None
