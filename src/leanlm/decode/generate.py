"""The decode loop: prefill once, then one token per step against the pre-allocated KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import LeanlmError
from ..model.runtime import Transformer


@dataclass
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise LeanlmError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise LeanlmError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LeanlmError(f"top_k must be >= 0, got {self.top_k}")

    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        g = torch.Generator()
        g.manual_seed(self.seed)
        return g


def filtered_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Next-token distribution [.., V] after temperature, top-k and top-p."""
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (always keeps the first)
        drop = sorted_p.cumsum(-1) - sorted_p >= s.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None = None) -> int:
    """One token id from logits [V]."""
    if s.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(filtered_probs(logits, s), 1, generator=gen))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def decode_tok_s(self) -> float:
        # the first new token comes from prefill; decode steps make the rest
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0


def check_context(model: Transformer, n_prompt: int, max_new_tokens: int) -> int:
    limit = model.config.max_seq_len
    if n_prompt == 0:
        raise LeanlmError("the prompt is empty")
    if n_prompt >= limit:
        raise LeanlmError(
            f"prompt has {n_prompt} tokens but the model's context window is {limit}; shorten the prompt"
        )
    return min(max_new_tokens, limit - n_prompt)


def recorded_kv_policy(model: Transformer):
    """The KV policy in model.applied (None when there is none or it is the full cache)."""
    from ..attention.policies import model_policy

    kv = model_policy(model)
    if kv is not None and getattr(model, "adaptive_gate", None) is not None:
        raise LeanlmError(f"this model carries a KV policy ({kv.describe()}) and an adaptive gate, which needs a full "
                          "cache (skipped layers write every position); load it without the adaptive state, or pass "
                          "kv=KVPolicy.parse('full') to decode with a full cache")  # fmt: skip
    return kv


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int = 128,
    sampling: Sampling | None = None,
    eos_ids: set[int] | None = None,
    stats: GenerationStats | None = None,
    kv=None,
    adapt_threads: bool | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time (greedy or sampled), stopping at EOS or the budget.

    `kv`: a KV-cache policy (leanlm.attention.KVPolicy); a bounded one (sinks+window, H2O,
    SnapKV) keeps constant memory and may generate past the context window. None: the policy
    recorded on the model (leanlm.apply, a recipe's `kv:` step, kept by save / load), else a full cache.
    `adapt_threads`: pick the thread count per step from measured step times (decode/threads.py; default on,
    LEANLM_ADAPT_THREADS=0 turns it off); the counts used are in stats.extra["threads"]."""
    import time

    from .threads import ThreadGovernor

    if kv is None:
        kv = recorded_kv_policy(model)
    sampling = sampling or Sampling()
    gen = sampling.generator()
    eos_ids = set(model.config.eos_token_ids) if eos_ids is None else eos_ids
    if kv is not None and kv.bounded:
        check_context(model, len(prompt_ids), 0)
    else:
        max_new_tokens = check_context(model, len(prompt_ids), max_new_tokens)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    if kv is None:
        model.setup_cache(1, len(prompt_ids) + max_new_tokens)
    else:
        model.setup_cache(1, len(prompt_ids) + max_new_tokens, cache_cls=kv)
    tokens = torch.tensor([prompt_ids], device=model.device)
    t0 = time.perf_counter()
    if kv is not None:  # chunked prefill: a bounded policy never holds more than its budget + one chunk
        for s in range(0, tokens.shape[1] - 512, 512):
            model(tokens[:, s : s + 512], start=s, last_only=True)
        s = max(0, (tokens.shape[1] - 1) // 512 * 512)
        logits = model(tokens[:, s:], start=s, last_only=True)[0, -1]
    else:
        logits = model(tokens, start=0, last_only=True)[0, -1]
    tok = sample(logits, sampling, gen)
    stats.prefill_s = time.perf_counter() - t0
    pos = len(prompt_ids)
    governor = ThreadGovernor(adapt=adapt_threads)
    t1 = time.perf_counter()
    stats.stop_reason = "length"
    try:
        for i in range(max_new_tokens):
            stats.new_tokens = i + 1
            stats.decode_s = time.perf_counter() - t1
            yield tok
            if tok in eos_ids:
                stats.stop_reason = "eos"
                break
            if i == max_new_tokens - 1:
                break
            with governor.step():
                logits = model(torch.tensor([[tok]], device=model.device), start=pos)[0, -1]
            tok = sample(logits, sampling, gen)
            pos += 1
    finally:
        governor.restore()
        stats.extra["threads"] = governor.report()
        model.clear_cache()


def apply_chat(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of `prompt` wrapped in the tokenizer's chat template (instruct models). Control-token text
    typed in the prompt or system text (e.g. '<|im_end|><|im_start|>system') is encoded as plain text, never as
    the control tokens, so a prompt cannot forge a turn; text without any is encoded as the template does."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if any(_has_control_text(tokenizer, m["content"]) for m in messages):
        return _chat_ids_literal(tokenizer, messages)
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def _has_control_text(tokenizer, text: str) -> bool:
    """Whether encoding `text` would produce a special token (its text matches one)."""
    plain = tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    return tokenizer(text, add_special_tokens=False).input_ids != plain


def _chat_ids_literal(tokenizer, messages: list[dict]) -> list[int]:
    """The template rendered around placeholders; the template's own text is encoded with its control tokens,
    each message's content with special tokens split into plain text."""
    import re
    import uuid

    marks = [f"\x00leanlm-content-{uuid.uuid4().hex}-{i}\x00" for i in range(len(messages))]
    shaped = [{**m, "content": mark} for m, mark in zip(messages, marks)]
    text = tokenizer.apply_chat_template(shaped, add_generation_prompt=True, tokenize=False)
    pieces = re.split("(" + "|".join(map(re.escape, marks)) + ")", text)
    if sorted(p for p in pieces if p in marks) != sorted(marks):
        raise LeanlmError("the chat template rewrites message content, so control-token text in the prompt cannot be "
                          "kept literal; remove it from the prompt or pass --no-chat")  # fmt: skip
    content = dict(zip(marks, (m["content"] for m in messages)))
    ids: list[int] = []
    for piece in pieces:
        if piece in content:
            ids += tokenizer(content[piece], add_special_tokens=False, split_special_tokens=True).input_ids
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False).input_ids
    return ids


def encode_prompt(tokenizer, prompt: str, chat: bool | None = None) -> list[int]:
    """Chat template when the tokenizer has one (unless chat=False); plain encoding otherwise."""
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LeanlmError("this tokenizer has no chat template; drop --chat")
        return apply_chat(tokenizer, prompt)
    return tokenizer(prompt).input_ids


def generate(
    model: Transformer,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 128,
    sampling: Sampling | None = None,
    chat: bool | None = None,
    stop: list[str] | None = None,
    stream=None,
    stats: GenerationStats | None = None,
    kv=None,
    decode_fn=None,
) -> str:
    """Generate text for `prompt`; with `stream` (a file, e.g. sys.stdout) print it as it comes.

    `decode_fn(model, ids, max_new_tokens, sampling, eos_ids, stats)` replaces generate_tokens
    (e.g. speculative decoding: functools.partial(speculative_generate_tokens, draft=..., gamma=...))."""
    ids = encode_prompt(tokenizer, prompt, chat)
    eos = set(model.config.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    new: list[int] = []
    printed = 0
    text = ""
    stats = stats if stats is not None else GenerationStats()
    tokens = (decode_fn(model, ids, max_new_tokens, sampling, eos, stats) if decode_fn is not None
              else generate_tokens(model, ids, max_new_tokens, sampling, eos, stats, kv=kv))  # fmt: skip
    for tok in tokens:
        if tok in eos:
            stats.stop_reason = "eos"
            break
        new.append(tok)
        text = tokenizer.decode(new, skip_special_tokens=True)
        hit = [text.index(s) for s in (stop or []) if s in text]
        if hit:
            text = text[: min(hit)]
            stats.stop_reason = "stop string"
        # hold back a trailing replacement char: a multi-byte character may be incomplete
        safe = len(text) - 1 if text.endswith("\ufffd") else len(text)
        if stream is not None and safe > printed:
            stream.write(text[printed:safe])
            stream.flush()
            printed = safe
        if hit:
            break
    if stream is not None and len(text) > printed:
        stream.write(text[printed:])
    if stream is not None:
        stream.write("\n")
        stream.flush()
    return text


__all__ = ["Sampling", "GenerationStats", "generate", "generate_tokens", "encode_prompt", "sample"]
