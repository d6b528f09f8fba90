"""leanlm's bitmask storage layout for pruned weights: one bit per weight (kept or not) plus the kept
values in order, stored as three tensors per matrix (`<name>.sparse_bitmask`, `.sparse_values`,
`.sparse_shape`). The loader (model/load.py) densifies such checkpoints with this module alone;
prune/sparse_storage.py writes them and runs sparse weights in memory (no import circle between
the runtime and the pruning methods).
"""

from __future__ import annotations

import torch

from ..errors import LeanlmError

SUFFIX_BITS, SUFFIX_VALUES, SUFFIX_SHAPE = ".sparse_bitmask", ".sparse_values", ".sparse_shape"
_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 [ceil(n / 8)], bit k of byte i = element 8i + k (little-endian bits)."""
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS).sum(1, dtype=torch.uint8)


def unpack_bitmask(bits: torch.Tensor, n: int) -> torch.Tensor:
    return ((bits[:, None] >> _SHIFTS) & 1).flatten()[:n].bool()


def compress(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bitmask, kept values) of a dense tensor; zeros are the pruned weights."""
    mask = w != 0
    return pack_bitmask(mask), w.flatten()[mask.flatten()]


def decompress(bits: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    n = int(torch.tensor(shape).prod()) if shape else 1
    mask = unpack_bitmask(bits, n)
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out.view(shape)


def bitmask_bytes(numel: int, nnz: int, elem: int) -> int:
    return (numel + 7) // 8 + nnz * elem


def compress_state_dict(hf_sd: dict[str, torch.Tensor], min_saving: float = 0.02) -> dict[str, torch.Tensor]:
    """Replace each 2-D weight whose bitmask form is at least `min_saving` smaller by its bitmask form."""
    out = {}
    for name, t in hf_sd.items():
        if t.dim() == 2 and name.endswith(".weight") and "embed_tokens" not in name and "lm_head" not in name:
            nnz = int((t != 0).sum())
            dense = t.numel() * t.element_size()
            if bitmask_bytes(t.numel(), nnz, t.element_size()) <= dense * (1 - min_saving):
                bits, values = compress(t)
                out[name + SUFFIX_BITS] = bits
                out[name + SUFFIX_VALUES] = values
                out[name + SUFFIX_SHAPE] = torch.tensor(list(t.shape), dtype=torch.int64)
                continue
        out[name] = t
    return out


def densify_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of compress_state_dict (used by leanlm's loader on compressed checkpoints)."""
    out = {}
    for name, t in sd.items():
        if name.endswith(SUFFIX_BITS):
            base = name[: -len(SUFFIX_BITS)]
            try:
                out[base] = decompress(t, sd[base + SUFFIX_VALUES], sd[base + SUFFIX_SHAPE].tolist())
            except (KeyError, RuntimeError) as e:
                raise LeanlmError(f"compressed weight {base} is damaged ({e}); re-save the pruned model") from e
        elif not name.endswith((SUFFIX_VALUES, SUFFIX_SHAPE)):
            out[name] = t
    return out
