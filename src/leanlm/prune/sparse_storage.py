"""Compressed storage and sparse execution for unstructured / N:M pruned weights.

A pruned matrix with zeros is exactly as large and as slow as the dense one. Two honest
ways to cash the zeros in:

- bitmask: one bit per weight (kept or not) + the kept values in order. At sparsity s an fp32
  matrix costs (1 - s) * 4 + 1/8 bytes per weight: 2.13 at 50% (-47%), 0.53 at 90%.
  Used on disk (`save_compressed`; leanlm's loader densifies it back) and optionally in
  memory (`SparseLinear(fmt="bitmask")`, which densifies on every forward: small, slow).
- csr: torch's sparse CSR tensor (int32 column indices): (1 - s) * 8 bytes per weight +
  row pointers, i.e. no smaller than dense fp32 until s > 50%. Forward is torch's sparse
  matmul (MKL on x86); whether it beats the dense GEMV is measured, not assumed
  (benchmarks/bench_prune.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeanlmError
from ..io import atomic_dir
from ..model.load import leanlm_to_hf
from ..model.sparse_format import compress, compress_state_dict, decompress
from .calibration import block_linears

FORMATS = ("csr", "bitmask")


class SparseLinear(nn.Module):
    """A Linear whose weight is held compressed: 'csr' (sparse matmul) or 'bitmask' (densified per call)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, fmt: str = "csr"):
        super().__init__()
        if fmt not in FORMATS:
            raise LeanlmError(f"unknown sparse format '{fmt}'; use one of: {', '.join(FORMATS)}")
        self.fmt = fmt
        self.out_features, self.in_features = weight.shape
        w = weight.detach()
        if fmt == "csr":
            csr = w.to_sparse_csr()
            self.register_buffer("crow", csr.crow_indices().to(torch.int32))
            self.register_buffer("col", csr.col_indices().to(torch.int32))
            self.register_buffer("values", csr.values().contiguous())
        else:
            bits, values = compress(w)
            self.register_buffer("bits", bits)
            self.register_buffer("values", values)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._csr = None

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def dense_weight(self) -> torch.Tensor:
        if self.fmt == "csr":
            return self.csr_weight().to_dense()
        return decompress(self.bits, self.values, (self.out_features, self.in_features))

    def csr_weight(self) -> torch.Tensor:
        if self._csr is None or self._csr.values().data_ptr() != self.values.data_ptr():
            self._csr = torch.sparse_csr_tensor(self.crow, self.col, self.values,
                                                (self.out_features, self.in_features), check_invariants=False)  # fmt: skip
        return self._csr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        dtype = x.dtype
        if self.fmt == "bitmask":
            w = self.dense_weight()
            if x2.shape[0] > 4 and w.dtype != torch.float32:  # same rule as runtime.Linear
                y = F.linear(x2.float(), w.float(), None if self.bias is None else self.bias.float())
                return y.to(dtype).view(*shape[:-1], -1)
            return F.linear(x2, w, self.bias).view(*shape[:-1], -1)
        w = self.csr_weight()
        xt = x2.to(self.values.dtype).T.contiguous()
        y = torch.mm(w, xt).T
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype).reshape(*shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt}, nnz={self.nnz}"


@torch.no_grad()
def sparsify_model(model, fmt: str = "csr", min_sparsity: float = 0.0) -> dict:
    """Replace each block linear whose zero fraction is >= min_sparsity by a SparseLinear, in place."""
    import warnings

    before = after = replaced = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "sparse CSR support is in beta" warning
        for layer in model.layers:
            for name, lin in block_linears(layer).items():
                if isinstance(lin, SparseLinear):
                    continue
                w = lin.weight
                bytes_dense = w.numel() * w.element_size()
                before += bytes_dense
                if (w == 0).float().mean().item() < max(min_sparsity, 1e-9):
                    after += bytes_dense
                    continue
                new = SparseLinear(w, lin.bias, fmt)
                after += sum(b.numel() * b.element_size() for b in new.buffers())
                parent, attr = name.split(".")
                setattr(getattr(layer, parent), attr, new)
                replaced += 1
    return {"format": fmt, "replaced": replaced, "linear_bytes_before": before, "linear_bytes_after": after}


# ---- on disk (layout and codec: model/sparse_format.py) -----------------------------------
def save_compressed(model, tokenizer, out: str | Path, force: bool = False) -> Path:
    """Like leanlm.save, but pruned matrices are stored as bitmask + kept values.

    The directory loads with leanlm.load (weights are densified on load; use
    sparsify_model afterwards to keep them compressed in memory). transformers cannot read
    it: for a transformers-loadable copy use leanlm.save (dense, zeros stored).
    """
    from safetensors.torch import save_file

    if any(isinstance(m, SparseLinear) for m in model.modules()):
        raise LeanlmError("save_compressed needs the dense pruned model (before sparsify_model)")
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hf_sd = compress_state_dict(leanlm_to_hf(sd, cfg))
    with atomic_dir(out, force) as tmp:
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt", "producer": "leanlm", "leanlm_sparse": "bitmask"})  # fmt: skip
        hf_cfg = cfg.to_hf_dict()
        hf_cfg["dtype"] = str(model.dtype).removeprefix("torch.")
        hf_cfg["leanlm_sparse"] = {"format": "bitmask", "note": "leanlm-only: load with leanlm.load"}
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)
