"""Calibration data and layer-sequential execution.

Pruning statistics (input norms, Hessians, neuron activations, block influence) are gathered
one decoder block at a time, as llm-compressor / SparseGPT / Wanda do: the calibration tokens
are embedded once, then each block is run over the whole calibration set, its statistics are
collected by forward hooks, it is pruned, and its (pruned) outputs become the next block's
inputs. Only one block's activations are held at any time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn



def calibration_tokens(tokenizer, text: str = "wikitext2-valid", n_samples: int = 32, seq_len: int = 512,
                       seed: int = 0, data_dir=None) -> torch.Tensor:
    """[n_samples, seq_len] token windows cut at random offsets of a named text or file.

    The default, the word-level WikiText-2 *validation* split, is never used for evaluation
    (which reads the raw *test* split). Same windows as quantization's calibration
    (quant.calibrate.read_calibration), so a recipe that prunes and quantizes sees one set.
    """
    from ..quant.calibrate import read_calibration

    return read_calibration(text, tokenizer, n_samples, seq_len, seed, data_dir)


class BlockRunner:
    """Runs calibration activations through the model one decoder block at a time.

    `xs` holds the residual stream (fp32) entering the current block, in batches.
    """

    def __init__(self, model, tokens: torch.Tensor, batch_size: int = 8):
        self.model = model
        self.T = tokens.shape[1]
        with torch.no_grad():
            self.xs = [model.embed(t.to(model.device)) for t in tokens.split(batch_size)]

    @property
    def n_tokens(self) -> int:
        return sum(x.shape[0] * x.shape[1] for x in self.xs)

    @torch.no_grad()
    def run(self, i: int) -> list[torch.Tensor]:
        """Outputs of block i for every stored input batch (the inputs are left as they are)."""
        m = self.model
        rope = m.rope[m._rope_names[i]].get(0, self.T, m.dtype)
        layer = m.layers[i]
        return [layer(x, rope, 0, m.dtype) for x in self.xs]

    def advance(self, outputs: list[torch.Tensor]) -> None:
        self.xs = outputs


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


def block_linears(layer) -> dict[str, nn.Module]:
    """The four prunable matrices of a decoder block (fused q/k/v and gate/up)."""
    return {"attn.wqkv": layer.attn.wqkv, "attn.wo": layer.attn.wo,
            "mlp.w_gate_up": layer.mlp.w_gate_up, "mlp.w_down": layer.mlp.w_down}  # fmt: skip


def row_parts(layer, name: str) -> list[tuple[int, int]]:
    """Row ranges of the original (unfused) matrices inside a fused one: q, k, v / gate, up."""
    if name == "attn.wqkv":
        q, k, v = layer.attn.split
        return [(0, q), (q, q + k), (q + k, q + k + v)]
    if name == "mlp.w_gate_up":
        f = layer.mlp.ffn_dim
        return [(0, f), (f, 2 * f)]
    rows = block_linears(layer)[name].weight.shape[0]
    return [(0, rows)]
