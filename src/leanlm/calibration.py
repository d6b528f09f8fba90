"""Calibration: the one place where methods get data and run it through the model block by block.

Data. `calibration_tokens(tokenizer, source, n_samples, seq_len)` cuts random windows of a named text
(`wikitext2-valid`, `pride-and-prejudice`, ...) or a text file; the WikiText-2 *test* split, which
perplexity reads, is refused. `token_windows` does the cutting on a string you already hold.
`Calibration` bundles a tokenizer with those settings and hands each method the windows it asks for
(cached per shape), so a recipe that prunes, quantizes and calibrates an adaptive gate tokenizes once.

Engine. Methods (GPTQ / AWQ, Wanda / SparseGPT, structured importance, adaptive thresholds and routers)
see the model one decoder block at a time, as llm-compressor, GPTQ and SparseGPT do: the calibration
windows are embedded once, each block runs over all of them while forward hooks collect statistics,
the method edits the block, and the edited block's outputs become the next block's inputs. Only one
block's activations are held at any time (RAM bounded by batches x seq_len x hidden, not by depth).

    BlockRunner(model, tokens)          .xs (inputs of the current block), .run(i), .advance(outputs)
    run_sequential(model, tokens, per_block)   the same loop with a per-block callback
    capture_inputs / InputStats / collect      forward hooks: raw inputs, or H = X^T X / n and mean |x|
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LeanlmError

LINEARS = ("attn.wqkv", "attn.wo", "mlp.w_gate_up", "mlp.w_down")  # the four matrices of a decoder block
EVAL_SPLITS = ("wikitext2",)  # evaluation text: never calibrate on it


# ---- data ------------------------------------------------------------------------------------
def token_windows(tokenizer, text: str, n_samples: int = 16, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """[n_samples, seq_len] token ids: random windows of the string `text` (BOS first when the tokenizer adds one)."""
    from .evaluate.perplexity import adds_bos

    if n_samples < 1 or seq_len < 8:
        raise LeanlmError(f"need at least 1 calibration sample of >= 8 tokens, got {n_samples} x {seq_len}")
    text = text[: max(2_000_000, n_samples * seq_len * 12)]  # enough text for distinct windows
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    span = seq_len - len(bos)
    if len(ids) < span + 1:
        raise LeanlmError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}; "
                          "use a longer text or a smaller --seq-len")  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - span + 1, (n_samples,), generator=g).tolist()
    return torch.tensor([bos + ids[s : s + span] for s in starts])


def calibration_tokens(tokenizer, source: str = "wikitext2-valid", n_samples: int = 32, seq_len: int = 512,
                       seed: int = 0, data_dir=None) -> torch.Tensor:  # fmt: skip
    """[n_samples, seq_len] windows of a named text or a text file (never the evaluation split)."""
    from .evaluate.data import read_text

    if source in EVAL_SPLITS:
        raise LeanlmError(f"'{source}' is the evaluation split; calibrate on other text, e.g. wikitext2-valid, "
                          "pride-and-prejudice or a file of your own")  # fmt: skip
    return token_windows(tokenizer, read_text(source, data_dir), n_samples, seq_len, seed)


@dataclass
class Calibration:
    """Where calibration windows come from: a tokenizer and a text, or fixed token windows.

    `tokens(n_samples, seq_len)` returns windows of that shape (cut once, then cached); with no
    arguments the default shape (`samples` x `seq_len`). Built from fixed windows (`from_tokens`),
    every request gets those windows, whatever shape it asks for."""

    tokenizer: object = None
    text: str = "wikitext2-valid"
    samples: int = 32
    seq_len: int = 512
    seed: int = 0
    data_dir: str | None = None
    fixed: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor) -> "Calibration":
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.numel() == 0:
            raise LeanlmError("calibration tokens must be a non-empty [n_samples, seq_len] tensor of token ids")
        return cls(fixed=tokens, samples=tokens.shape[0], seq_len=tokens.shape[1])

    def tokens(self, n_samples: int | None = None, seq_len: int | None = None) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed
        if self.tokenizer is None:
            raise LeanlmError("this Calibration has neither token windows nor a tokenizer to cut them")
        key = (n_samples or self.samples, seq_len or self.seq_len)
        if key not in self._cache:
            self._cache[key] = calibration_tokens(self.tokenizer, self.text, *key, self.seed, self.data_dir)
        return self._cache[key]


# ---- module access -------------------------------------------------------------------------
def get_module(root, name: str):
    for part in name.split("."):
        root = getattr(root, part)
    return root


def set_module(root, name: str, module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(get_module(root, parent) if parent else root, leaf, module)


def block_linears(layer) -> dict[str, nn.Module]:
    """The four matrices of a decoder block (fused q/k/v and gate/up)."""
    return {n: get_module(layer, n) for n in LINEARS}


def row_parts(layer, name: str) -> list[tuple[int, int]]:
    """Row ranges of the original (unfused) matrices inside a fused one: q, k, v / gate, up."""
    if name == "attn.wqkv":
        q, k, v = layer.attn.split
        return [(0, q), (q, q + k), (q + k, q + k + v)]
    if name == "mlp.w_gate_up":
        f = layer.mlp.ffn_dim
        return [(0, f), (f, 2 * f)]
    rows = get_module(layer, name).weight.shape[0]
    return [(0, rows)]


# ---- hooks -----------------------------------------------------------------------------------
class StopForward(Exception):
    """Raised by a hook once the inputs it needs are captured: the rest of the block is skipped."""


@contextlib.contextmanager
def capture_inputs(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call fn(name, input as [tokens, features] fp32) on every forward of each module."""

    def hook(name):
        def h(_module, args):
            x = args[0]
            fn(name, x.detach().reshape(-1, x.shape[-1]).float())

        return h

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


GRAM_BLOCK = 1024  # column block of accumulate_gram: wider inputs get only their upper block triangle


def accumulate_gram(H: torch.Tensor, x: torch.Tensor) -> None:
    """H += x^T x on the blocks of its upper triangle (and the diagonal blocks whole): about half the flops of
    the full product for wide inputs (the MLP's down projection). The lower blocks are left stale until
    mirror_upper fills them."""
    K = H.shape[0]
    if K <= GRAM_BLOCK:
        H.addmm_(x.t(), x)
        return
    for a in range(0, K, GRAM_BLOCK):
        H[a : a + GRAM_BLOCK, a:].addmm_(x[:, a : a + GRAM_BLOCK].t(), x[:, a:])


def mirror_upper(H: torch.Tensor) -> None:
    """Copy accumulate_gram's upper blocks onto the lower ones (in place, a block row at a time)."""
    K = H.shape[0]
    if K <= GRAM_BLOCK:
        return
    for a in range(GRAM_BLOCK, K, GRAM_BLOCK):
        H[a : a + GRAM_BLOCK, :a] = H[:a, a : a + GRAM_BLOCK].t()


class InputStats:
    """Forward pre-hook accumulating H = sum x x^T (and sum |x|) over the rows a Linear sees."""

    def __init__(self, module, stop: bool = False):
        self.K = module.in_features
        self.H = torch.zeros(self.K, self.K)
        self.abs_sum = torch.zeros(self.K)
        self.n = 0
        self.stop = stop
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, self.K).float()
        accumulate_gram(self.H, x)
        self.abs_sum += x.abs().sum(0)
        self.n += x.shape[0]
        if self.stop:
            raise StopForward

    def remove(self):
        self.handle.remove()

    def hessian(self) -> torch.Tensor:
        """The mean x x^T. The accumulator is handed over (divided in place), not copied: a K x K matrix is
        321 MB for the 1.5B's down projection. Call once."""
        if self.H is None:
            raise RuntimeError("InputStats.hessian() was already taken")
        H, self.H = self.H, None
        mirror_upper(H)
        return H.div_(max(self.n, 1))

    def act_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)


def run_block(layer, xs: list[torch.Tensor], rope, dtype) -> None:
    """Run `layer` over every batch for its hooks' sake (outputs dropped; StopForward ends a batch)."""
    for x in xs:
        try:
            layer(x, rope, 0, dtype)
        except StopForward:
            pass


def collect(layer, names: list[str], xs, rope, dtype, stop: bool = True) -> dict[str, InputStats]:
    """Input statistics of the Linear modules `names` of `layer` over the batches `xs`.

    With stop=True the forward pass is cut right after the last of them has seen its input.
    """
    order = [n for n in LINEARS if n in names]
    hooks = {n: InputStats(get_module(layer, n), stop=stop and n == order[-1]) for n in order}
    try:
        run_block(layer, xs, rope, dtype)
    finally:
        for h in hooks.values():
            h.remove()
    return hooks


# ---- the block-sequential engine -------------------------------------------------------------
class BlockRunner:
    """Calibration activations through the model one decoder block at a time.

    `xs` holds the residual stream (fp32) entering the current block, in batches of `batch_size`."""

    def __init__(self, model, tokens: torch.Tensor, batch_size: int = 8, dtype: torch.dtype | None = None):
        if tokens is None or tokens.numel() == 0:
            raise LeanlmError("calibration needs token windows; none were given")
        self.model = model
        self.dtype = model.dtype if dtype is None else dtype  # the blocks' compute dtype
        self.T = tokens.shape[1]
        with torch.no_grad():
            self.xs = [model.embed(t.to(model.device)) for t in tokens.split(batch_size)]

    @property
    def n_tokens(self) -> int:
        return sum(x.shape[0] * x.shape[1] for x in self.xs)

    def rope(self, i: int):
        m = self.model
        return m.rope[m._rope_names[i]].get(0, self.T, self.dtype)

    @torch.no_grad()
    def run(self, i: int) -> list[torch.Tensor]:
        """Outputs of block i for every stored input batch (the inputs are left as they are)."""
        rope, layer = self.rope(i), self.model.layers[i]
        return [layer(x, rope, 0, self.dtype) for x in self.xs]

    def advance(self, outputs: list[torch.Tensor]) -> None:
        self.xs = outputs


@torch.no_grad()  # not inference_mode: AWQ edits weights that must stay usable outside it
def run_sequential(model, tokens: torch.Tensor, per_block, batch_size: int = 16, progress: bool = True,
                   desc: str = "calibrate", block_dtype: torch.dtype | None = None) -> list[torch.Tensor]:  # fmt: skip
    """Call per_block(i, layer, xs, rope, dtype) for each decoder block in order, where xs are the
    block's inputs (a list of fp32 [b, T, D] batches) computed through the already-processed
    blocks. per_block may return the block's outputs (else the block is run on xs); returns the
    final hidden states (list of batches). block_dtype: cast each block to it just before its turn and
    compute in it (a bf16 model calibrated in fp32 without an fp32 copy of the whole model)."""
    runner = BlockRunner(model, tokens, batch_size, block_dtype)
    for i, layer in enumerate(tqdm(model.layers, desc=desc, disable=not progress, leave=False)):
        if block_dtype is not None:
            layer.to(block_dtype)
        out = per_block(i, layer, runner.xs, runner.rope(i), runner.dtype)
        runner.advance(out if out is not None else runner.run(i))
    return runner.xs


__all__ = ["BlockRunner", "Calibration", "InputStats", "LINEARS", "StopForward", "block_linears", "calibration_tokens",
           "capture_inputs", "collect", "get_module", "row_parts", "run_block", "run_sequential", "set_module",
           "token_windows"]  # fmt: skip
