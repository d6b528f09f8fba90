"""Calibration data and the layer-sequential driver.

`calibration_tokens` cuts random windows from a text (a file or a named dataset such as
`wikitext2-valid` or `pride-and-prejudice`; never the WikiText-2 test split used for perplexity).

`run_sequential` pushes the calibration batch through the decoder one block at a time: the
block's inputs (outputs of the already-quantized earlier blocks) are the only activations held,
a callback quantizes the block, and the quantized block's outputs become the next inputs.
Hooks on a block's Linear modules accumulate H = X^T X / n (and mean |x|) batch by batch.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..errors import LeanlmError

LINEARS = ("attn.wqkv", "attn.wo", "mlp.w_gate_up", "mlp.w_down")
EVAL_SPLITS = ("wikitext2",)


def calibration_tokens(tokenizer, text: str, n_samples: int = 16, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """[n_samples, seq_len] token ids: random windows of `text` (BOS first when the tokenizer adds one)."""
    from ..evaluate.perplexity import adds_bos

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


def read_calibration(spec: str, tokenizer, n_samples: int, seq_len: int, seed: int = 0, data_dir=None) -> torch.Tensor:
    from ..evaluate.data import read_text

    if spec in EVAL_SPLITS:
        raise LeanlmError(f"'{spec}' is the evaluation split; calibrate on other text, e.g. wikitext2-valid, "
                          "pride-and-prejudice or a file of your own")  # fmt: skip
    return calibration_tokens(tokenizer, read_text(spec, data_dir), n_samples, seq_len, seed)


def get_module(root, name: str):
    for part in name.split("."):
        root = getattr(root, part)
    return root


def set_module(root, name: str, module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(get_module(root, parent) if parent else root, leaf, module)


class StopForward(Exception):
    """Raised by a hook once the inputs it needs are captured: the rest of the block is skipped."""


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
        self.H.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(0)
        self.n += x.shape[0]
        if self.stop:
            raise StopForward

    def remove(self):
        self.handle.remove()

    def hessian(self) -> torch.Tensor:
        return self.H / max(self.n, 1)

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


def mirror_matches(layer, x, rope, dtype) -> bool:
    """Does the step-by-step block (_steps) agree with layer.forward (first sample, 32 tokens)?"""
    xs = x[:1, :32]
    r = (rope[0][:32], rope[1][:32])
    try:
        return bool(torch.allclose(_steps(layer, [xs], r, dtype, [], None)[0], layer(xs, r, 0, dtype), rtol=1e-4, atol=1e-5))
    except (AttributeError, KeyError, RuntimeError, ValueError):
        return False


def sequential_block(layer, xs: list[torch.Tensor], rope, dtype, names: list[str], quantize_one) -> list[torch.Tensor] | None:
    """True-sequential calibration in one pass over the block: each Linear in `names` is
    calibrated on inputs computed through the already-quantized Linears before it, then
    quantize_one(name, InputStats) replaces it. Returns the block outputs, or None when the
    runtime's block no longer matches the step-by-step version (the caller then falls back)."""
    if not mirror_matches(layer, xs[0], rope, dtype):
        return None
    return _steps(layer, xs, rope, dtype, names, quantize_one)


def _steps(layer, xs, rope, dtype, names, quantize_one) -> list[torch.Tensor]:
    """runtime.Block.forward (and MLP.forward) written out stage by stage over all batches, so that
    a Linear can be quantized once every batch has been seen and before its outputs are used."""
    a = [layer.attn_norm(x, dtype) for x in xs]
    _calibrate(layer, "attn.wqkv", a, names, quantize_one)
    o = []
    for t in a:
        captured = {}

        def grab(module, args, captured=captured):
            captured["o"] = args[0]
            raise StopForward

        handle = layer.attn.wo.register_forward_pre_hook(grab)
        try:
            layer.attn(t, rope, 0)
        except StopForward:
            pass
        finally:
            handle.remove()
        o.append(captured["o"])
    del a
    _calibrate(layer, "attn.wo", o, names, quantize_one)
    hs = []
    for x, t in zip(xs, o):
        h = layer.attn.wo(t)
        if layer.attn_post_norm is not None:
            h = layer.attn_post_norm(h)
        hs.append(x + h)
    del o
    m = [layer.mlp_norm(h, dtype) for h in hs]
    _calibrate(layer, "mlp.w_gate_up", m, names, quantize_one)
    d = []
    for t in m:
        gate, up = layer.mlp.w_gate_up(t).chunk(2, dim=-1)
        d.append(layer.mlp.act(gate) * up)
    del m
    _calibrate(layer, "mlp.w_down", d, names, quantize_one)
    out = []
    for h, t in zip(hs, d):
        y = layer.mlp.w_down(t)
        if layer.mlp_post_norm is not None:
            y = layer.mlp_post_norm(y)
        out.append(h + y)
    return out


def _calibrate(layer, name: str, inputs: list[torch.Tensor], names: list[str], quantize_one) -> None:
    if name not in names:
        return
    module = get_module(layer, name)
    stats = InputStats(module)
    stats.remove()  # fed directly, not through a hook
    for t in inputs:
        stats(module, (t,))
    quantize_one(name, stats)


@torch.no_grad()  # not inference_mode: AWQ edits weights that must stay usable outside it
def run_sequential(model, tokens: torch.Tensor, per_block, batch_size: int = 16, progress: bool = True,
                   desc: str = "quantize") -> torch.Tensor:  # fmt: skip
    """Call per_block(i, layer, xs, rope, dtype) for each decoder block in order, where xs are the
    block's inputs (a list of fp32 [b, T, D] batches) computed through the already-processed
    blocks. per_block may return the block's outputs (else the block is run on xs); returns the
    final hidden states (list of batches)."""
    dtype = model.dtype
    T = tokens.shape[1]
    xs = [model.embed(tokens[i : i + batch_size].to(model.device)) for i in range(0, tokens.shape[0], batch_size)]
    for i, layer in enumerate(tqdm(model.layers, desc=desc, disable=not progress, leave=False)):
        rope = model.rope[model._rope_names[i]].get(0, T, dtype)
        out = per_block(i, layer, xs, rope, dtype)
        xs = out if out is not None else [layer(x, rope, 0, dtype) for x in xs]
    return xs
