"""lm-evaluation-harness model backend on leanlm's runtime: `--model leanlm --model_args pretrained=NAME_OR_DIR`.

lm-eval 0.4.x finds models in its registry, which it fills by importing its own `lm_eval.models`; it has no
entry-point discovery for external models. Importing this module registers "leanlm" there, so either run the
harness through this module, which registers the backend and then hands its arguments to lm-eval's own CLI:

    python -m leanlm.evaluate.lm_eval_backend --model leanlm --model_args pretrained=smollm2-135m \\
        --tasks arc_easy --limit 50

or, from Python, `import leanlm.evaluate.lm_eval_backend` before `lm_eval.simple_evaluate(model="leanlm", ...)`
(or pass `LeanlmLM(model=..., tokenizer=...)` as the model object).

Scoring follows leanlm's own tasks (evaluate/tasks.py): a context shared by several continuations runs once into
the KV cache and each continuation runs on top of it; tokens are split the harness's way (TemplateLM._encode_pair),
with BOS first for tokenizers that start every sequence with it (Gemma), as leanlm's tasks and perplexity do.
model_args: pretrained (a default name, GGUF path or directory leanlm.load reads), dtype (float32 | bfloat16 |
float16; default float32), max_length (tokens per scored window; default the model's context, capped at 4096).
The runtime is leanlm's CPU runtime: lm-eval's --device (default cuda:0) is not used, and a warning says so.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LeanlmError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the optional package
    raise LeanlmError("the lm-eval backend needs lm-evaluation-harness: pip install lm-eval (or leanlm[deploy])") from e

MAX_LENGTH = 4096  # default cap on a scored window: KV cache memory grows with it


@register_model("leanlm")
class LeanlmLM(TemplateLM):
    """lm-eval's LM interface (loglikelihood, loglikelihood_rolling, generate_until) on a leanlm model."""

    def __init__(self, pretrained: str | None = None, dtype: str = "float32", max_length: int | None = None,
                 model=None, tokenizer=None, batch_size=1, device: str = "cpu", **kwargs):  # fmt: skip
        super().__init__()
        from .perplexity import adds_bos

        if model is None:
            if not pretrained:
                raise LeanlmError("the leanlm lm-eval backend needs --model_args pretrained=NAME_OR_DIR")
            if device not in (None, "cpu"):  # lm-eval's CLI passes --device (default cuda:0) to every backend
                warnings.warn(f"the leanlm lm-eval backend runs leanlm's CPU runtime; device={device} is not used",
                              stacklevel=2)  # fmt: skip
            from ..model.load import load

            model, tokenizer = load(pretrained, dtype=dtype)
        if tokenizer is None:
            raise LeanlmError("LeanlmLM(model=...) needs its tokenizer too (tokenizer=...)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self._max_length = int(max_length or min(model.config.max_seq_len, MAX_LENGTH))
        if self._max_length < 2:
            raise LeanlmError(f"max_length must be at least 2, got {max_length}")
        self._bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []

    # ---- what TemplateLM needs --------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.model.config.eos_token_ids[0])

    @property
    def prefix_token_id(self) -> int:
        return self._bos[0] if self._bos else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Text tokens; with add_special_tokens None or True, BOS first where the tokenizer always starts with it."""
        ids = self.tokenizer(string, add_special_tokens=False).input_ids
        return (self._bos + ids) if add_special_tokens is not False else ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ---- scoring -------------------------------------------------------------------------
    @torch.inference_mode()
    def _score_group(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each continuation after one shared context (run once into the KV cache)."""
        model, dev = self.model, self.model.device
        longest = max(len(c) for c in continuations)
        if longest > self._max_length:
            raise LeanlmError(f"a continuation of {longest} tokens does not fit max_length {self._max_length}")
        context = context[-(self._max_length - longest + 1) :]  # the model sees context + continuation[:-1]
        model.setup_cache(1, len(context) + longest - 1)
        try:
            first = model(torch.tensor([context], device=dev), start=0, last_only=True)[0, -1]
            out = []
            for cont in continuations:
                logits = [first[None]]
                if len(cont) > 1:
                    logits.append(model(torch.tensor([cont[:-1]], device=dev), start=len(context))[0])
                logp = F.log_softmax(torch.cat(logits).float(), -1)
                target = torch.tensor(cont, device=logp.device)
                out.append((logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
        finally:
            model.clear_cache()
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, _) in enumerate(requests):
            groups.setdefault(tuple(context), []).append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for context, idx in tqdm(groups.items(), desc="leanlm loglikelihood", disable=disable_tqdm, leave=False):
            for i, res in zip(idx, self._score_group(list(context), [requests[i][2] for i in idx])):
                results[i] = res
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each whole text, in disjoint windows of max_length tokens (the harness's
        rolling windows: each window after the first conditions on the tokens before it)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in tqdm(requests, desc="leanlm loglikelihood_rolling", disable=disable_tqdm, leave=False):
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text, add_special_tokens=False), self.prefix_token_id, self._max_length, 1)]  # fmt: skip
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(ll for ll, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample / temperature) continuation of each context, cut at the first of
        its `until` strings, at EOS or after max_gen_toks tokens."""
        from ..decode.generate import Sampling, generate_tokens

        out = []
        for req in tqdm(requests, desc="leanlm generate_until", disable=disable_tqdm, leave=False):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-(self._max_length - max_new) :] if max_new < self._max_length else []
            if not ids:
                raise LeanlmError(f"max_gen_toks {max_new} leaves no room for the context in max_length {self._max_length}")
            eos = set(self.model.config.eos_token_ids) | {self.eot_token_id}
            new: list[int] = []
            text = ""
            for tok in generate_tokens(self.model, ids, max_new, Sampling(temperature=temperature), eos):
                if tok in eos:
                    break
                new.append(tok)
                text = self.tok_decode(new)
                if any(s and s in text for s in until):
                    break
            for s in until:  # the harness's convention: the text before the first stop string
                if s:
                    text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line, with the "leanlm" model registered (see the module docstring)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
