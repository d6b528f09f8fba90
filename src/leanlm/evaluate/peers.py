"""The engines a user would otherwise run, measured the way leanlm is, and quality against one reference.

- `LlamaCppEngine` (llama-cpp-python on a GGUF), `OpenVINOEngine` (OpenVINO GenAI on a GGUF) and `HFEngine`
  (transformers' generate()): prefill seconds and greedy decode tok/s on given token ids, as the benchmarks and
  `leanlm optimize` time them.
- `QualityRef`: a base model's log-probs on fixed windows, computed once; a leanlm model (`ref(model)`) or a GGUF
  run by llama.cpp (`gguf_scores`) is then scored against it: perplexity, KL(base || candidate), top-1 agreement.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..errors import LeanlmError


class Engine:
    """prefill(ids) -> seconds to first token; decode(ids, n) -> decode tok/s over n-1 steps."""

    name = "engine"

    def prefill(self, ids: list[int]) -> float: ...

    def decode(self, ids: list[int], n: int) -> float: ...


class GenerateEngine(Engine):
    """An engine timed through one whole generate() call: decode tok/s = the n-1 tokens after the first over
    (time of n tokens - time of 1 token)."""

    def _gen(self, ids, n) -> float: ...

    def prefill(self, ids):
        return self._gen(ids, 1)

    def decode(self, ids, n):
        total = self._gen(ids, n)
        first = self._gen(ids, 1)
        return (n - 1) / (total - first)


class HFEngine(GenerateEngine):
    """transformers' generate(), greedy, as its users run it."""

    def __init__(self, directory: str, dtype: torch.dtype, name: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=False).eval()
        self.name = name

    def _gen(self, ids, n):
        t = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0)  # fmt: skip
        return time.perf_counter() - t


class LlamaCppEngine(Engine):
    """llama.cpp through llama-cpp-python on a GGUF file (greedy, batch 1)."""

    def __init__(self, gguf: str, name: str, threads: int, n_ctx: int = 1024):
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=512, verbose=False, logits_all=False)  # fmt: skip
        self.name = name

    def prefill(self, ids):
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t

    def decode(self, ids, n):
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([tok])
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        return (n - 1) / (time.perf_counter() - t)


class OpenVINOEngine(GenerateEngine):
    """OpenVINO GenAI LLMPipeline reading the GGUF directly (greedy, batch 1).

    Prefix caching is off: the CPU pipeline's default scheduler keeps the KV blocks of earlier prompts, so a
    repeated prompt skipped its prefill (5,000-8,500 tok/s "prefill" on SmolLM2 at 512 vs ~300 for a fresh
    prompt, same run, busy machine, openvino-genai 2026.4)."""

    def __init__(self, gguf: str, name: str, threads: int):
        import openvino_genai as ov_genai

        sched = ov_genai.SchedulerConfig()
        sched.enable_prefix_caching = False
        self.pipe = ov_genai.LLMPipeline(gguf, "CPU", {"scheduler_config": sched}, INFERENCE_NUM_THREADS=threads)
        self.name = name

    def _gen(self, ids, n):
        import numpy as np
        import openvino as ov
        import openvino_genai as ov_genai

        cfg = ov_genai.GenerationConfig()
        cfg.max_new_tokens, cfg.min_new_tokens, cfg.do_sample = n, n, False
        tokens = ov_genai.TokenizedInputs(ov.Tensor(np.array([ids], dtype=np.int64)),
                                          ov.Tensor(np.ones((1, len(ids)), dtype=np.int64)))  # fmt: skip
        t = time.perf_counter()
        self.pipe.generate(tokens, cfg)
        return time.perf_counter() - t


def window_scores(lb: torch.Tensor, lc: torch.Tensor, target: torch.Tensor) -> tuple[float, float, float]:
    """One window's sums for base log-probs lb and candidate log-probs lc ([T, V]) against the next
    tokens: (KL(base || candidate), top-1 agreements, candidate NLL), as leanlm.evaluate.kl_divergence."""
    kl = F.kl_div(lc, lb, log_target=True, reduction="sum").item()
    agree = (lb.argmax(-1) == lc.argmax(-1)).sum().item()
    return kl, agree, -lc.gather(-1, target[:, None]).sum().item()


class QualityRef:
    """A base model's log-probs on fixed windows, computed once; calling it on a candidate gives ppl,
    KL(base || candidate) and top-1 agreement on the same windows (leanlm.evaluate.kl_divergence's
    arithmetic), so a benchmark compares every configuration against one reference pass."""

    def __init__(self, base, windows: list[torch.Tensor]):
        self.windows = windows
        with torch.inference_mode():
            self.base_lp = [F.log_softmax(base(w)[0, :-1].float(), -1) for w in windows]

    def base_ppl(self) -> float:
        """The base model's perplexity on these windows (from the log-probs already computed)."""
        nll = sum(-lb.gather(-1, w[0, 1:, None]).sum().item() for w, lb in zip(self.windows, self.base_lp))
        return math.exp(nll / sum(w.shape[1] - 1 for w in self.windows))

    @torch.inference_mode()
    def __call__(self, model) -> dict:
        kl = agree = nll_b = nll_c = 0.0
        count = 0
        for w, lb in zip(self.windows, self.base_lp):
            target = w[0, 1:]
            k, a, n = window_scores(lb, F.log_softmax(model(w)[0, :-1].float(), -1), target)
            kl, agree, nll_c = kl + k, agree + a, nll_c + n
            nll_b -= lb.gather(-1, target[:, None]).sum().item()
            count += target.numel()
        return {"ppl": math.exp(nll_c / count), "ppl_base": math.exp(nll_b / count), "kl": kl / count,
                "top1_agreement": agree / count, "tokens": count, "windows": len(self.windows)}  # fmt: skip


def gguf_scores(path, refs: dict, threads: int) -> dict:
    """ppl / KL / top-1 of a GGUF on the refs' windows, from llama-cpp-python's logits."""
    import llama_cpp

    seq = max(w.shape[1] for ref in refs.values() for w in ref.windows)
    llm = llama_cpp.Llama(str(path), n_ctx=seq, n_batch=seq, n_ubatch=seq, logits_all=True, n_threads=threads,
                          verbose=False)  # fmt: skip
    out = {}
    for text, ref in refs.items():
        kl = agree = nll_c = nll_b = 0.0
        count = 0
        for w, lb in zip(ref.windows, ref.base_lp):
            llm.reset()
            llm.eval(w[0].tolist())
            V = lb.shape[-1]
            logits = torch.from_numpy(llm.scores[: w.shape[1] - 1].copy()).float()
            if logits.shape[-1] != V:
                raise LeanlmError(f"{path}: vocabulary {logits.shape[-1]} != the reference's {V}")
            target = w[0, 1:]
            k, a, n = window_scores(lb, F.log_softmax(logits, -1), target)
            kl, agree, nll_c = kl + k, agree + a, nll_c + n
            nll_b -= lb.gather(-1, target[:, None]).sum().item()
            count += target.numel()
        out[text] = {"ppl": math.exp(nll_c / count), "ppl_base": math.exp(nll_b / count), "kl": kl / count,
                     "top1_agreement": agree / count, "tokens": count, "windows": len(ref.windows)}  # fmt: skip
    del llm
    return out
