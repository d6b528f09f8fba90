"""Verification without leanlm's native kernels: fp32 Linear layers whose cost grows slowly with the rows.

Speculative decoding pays only if verifying k tokens in one forward costs about one decode
step. The runtime's native small-row kernel (leanlm.ops.small_linear) does that; this module is
the fallback where it is unavailable (the CLI packs only then). On the AVX2 + MKL CPU it was
measured on, the stock fp32 `F.linear` does not: a 2-row product costs ~2x a
1-row GEMV (MKL repacks the weight on every call), and bf16 products scale linearly with the
rows (no native bf16 GEMM). oneDNN's inner product with the weight reordered once into its
blocked layout keeps small-M products near GEMV cost (measured v(k) in README.md), so an fp32
target verifies with packed weights. One-row products (plain decode steps, draft steps) keep
the stock GEMV on the dense weight, which is as fast or faster there and keeps such steps
bit-identical to the unpacked runtime; the price is a second copy of each weight
(`keep_dense=False` drops it). `pack_model` swaps the runtime's Linear modules in place and
`unpack_model` restores them. PackedLinear does not implement the fused-linear protocol
(leanlm.ops): a block holding one runs the fused step's glue around its own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def packing_supported(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN blocked fp32 weights (bf16 needs AVX512-BF16 / AVX-NE-CONVERT, absent here)."""
    if dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8), None)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8), w, None, "none", [], "")
        return bool(torch.allclose(y, torch.full((2, 8), 8.0)))
    except (RuntimeError, AttributeError):
        return False


class PackedLinear(nn.Module):
    """y = x W^T + b with W stored in oneDNN's blocked layout (fp32, CPU) for multi-row x."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, keep_dense: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float().contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        self.dense = w if keep_dense else None
        self.bias = None if bias is None else bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if x2.shape[0] == 1 and self.dense is not None:
            y = F.linear(x2, self.dense, self.bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y.view(*shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.packed.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


LINEAR_NAMES = (("attn", "wqkv"), ("attn", "wo"), ("mlp", "w_gate_up"), ("mlp", "w_down"))


def pack_model(model, keep_dense: bool = True) -> int:
    """Replace the fp32 nn.Linear modules of every layer (and an untied LM head) by PackedLinear.

    Quantized or other custom Linear replacements are left alone. Returns how many were packed.
    """
    from ..model.runtime import Linear

    if not packing_supported(model.dtype) or model.device.type != "cpu":
        return 0
    n = 0
    targets = [(getattr(layer, a), b) for layer in model.layers for a, b in LINEAR_NAMES]
    if model.lm_head is not None:
        targets.append((model, "lm_head"))
    for parent, name in targets:
        mod = getattr(parent, name)
        if type(mod) in (nn.Linear, Linear) and mod.weight.dtype == torch.float32:  # not subclasses (quantized)
            setattr(parent, name, PackedLinear(mod.weight, mod.bias, keep_dense))
            n += 1
    emb = model.tok_embeddings
    if n and model.lm_head is None and type(emb) is nn.Embedding and emb.weight.dtype == torch.float32:
        model.packed_head = PackedLinear(emb.weight)  # tied head: packed copy, the lookup keeps the table
    return n


def unpack_model(model) -> int:
    """Undo `pack_model`: PackedLinear modules become the runtime's Linear again (same weights)."""
    from ..model.runtime import Linear

    n = 0
    targets = [(getattr(layer, a), b) for layer in model.layers for a, b in LINEAR_NAMES] + [(model, "lm_head")]
    for parent, name in targets:
        mod = getattr(parent, name, None)
        if isinstance(mod, PackedLinear):
            lin = Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            lin.weight = nn.Parameter(mod.dense_weight(), requires_grad=False)
            if mod.bias is not None:
                lin.bias = nn.Parameter(mod.bias, requires_grad=False)
            setattr(parent, name, lin)
            n += 1
    if hasattr(model, "packed_head"):
        del model.packed_head
    return n


def output_head(model):
    """A function h [.., D] (final hidden, before the norm) -> fp32 logits, as model.logits,
    running a tied LM head through the packed copy made by pack_model."""
    head = getattr(model, "packed_head", None)
    if head is None:
        return model.logits
    cap = model.config.final_logit_softcap

    def logits(h: torch.Tensor) -> torch.Tensor:
        out = head(model.norm(h, model.dtype)).float()
        return torch.tanh(out / cap) * cap if cap else out

    return logits


__all__ = ["PackedLinear", "pack_model", "unpack_model", "packing_supported", "output_head"]
