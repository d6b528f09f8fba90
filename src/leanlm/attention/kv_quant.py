"""KV-cache quantization: int8 (per token, per head, symmetric) and int4 (per token, per head,
groups of `group` channels, asymmetric, two codes per byte). Scales/zeros are fp16.

`KVStore` holds the slots of one layer's cache in float, int8 or int4 and dequantizes on read (`read`: the
Python path). Its buffers (codes [B, H, S, D] or [B, H, S, D/2], scales / zeros [B, H, S, groups], each slot's
rows contiguous per head) are also what ops.attend_kvquant and ops.decode_layer_kvquant read in place.
"""

from __future__ import annotations

import torch
from torch import nn

_EMPTY = torch.empty(0)  # a part the store does not have (kernel_buffers: asked for at every decode step)


def quantize_int8(x: torch.Tensor):
    """x [..., D] -> (codes int8 [..., D], scale fp16 [..., 1]); x ~= codes * scale."""
    scale = (x.float().abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-8).half()
    q = torch.round(x.float() / scale.float()).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale.float()).to(dtype)


def quantize_int4(x: torch.Tensor, group: int = 32):
    """x [..., D] -> (packed uint8 [..., D/2], scale fp16 [..., D/group], zero fp16 [..., D/group])."""
    D = x.shape[-1]
    g = x.float().reshape(*x.shape[:-1], D // group, group)
    mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((mx - mn) / 15.0).clamp_min(1e-8).half()
    zero = mn.half()
    q = torch.round((g - zero.float()) / scale.float()).clamp_(0, 15).to(torch.uint8).reshape(*x.shape[:-1], D)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, scale.squeeze(-1), zero.squeeze(-1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int = 32,
                    dtype=torch.float32) -> torch.Tensor:  # fmt: skip
    q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    D = q.shape[-1]
    g = q.to(torch.float32).reshape(*q.shape[:-1], D // group, group)
    x = g * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return x.reshape(*q.shape[:-1], D).to(dtype)


class KVStore(nn.Module):
    """Slots [B, H, S, D] of keys and values, stored in `dtype` (bits=None), int8 or int4."""

    def __init__(self, batch, heads, slots, head_dim, dtype, device=None, bits: int | None = None, group: int = 32):
        super().__init__()
        if bits not in (None, 8, 4):
            raise ValueError(f"KV bits must be 8 or 4, got {bits}")
        group = min(group, head_dim)
        if bits == 4 and head_dim % group:
            raise ValueError(f"head_dim {head_dim} is not a multiple of the int4 group {group}")
        self.bits, self.group, self.dtype = bits, group, dtype
        shape = (batch, heads, slots)
        if bits is None:
            specs = {"": ((*shape, head_dim), dtype)}
        elif bits == 8:
            specs = {"q": ((*shape, head_dim), torch.int8), "s": ((*shape, 1), torch.float16)}
        else:
            ng = head_dim // group
            specs = {"q": ((*shape, head_dim // 2), torch.uint8), "s": ((*shape, ng), torch.float16),
                     "z": ((*shape, ng), torch.float16)}  # fmt: skip
        self.names = []
        for kv in ("k", "v"):
            for suffix, (shp, dt) in specs.items():
                self.register_buffer(kv + suffix, torch.zeros(shp, dtype=dt, device=device), persistent=False)
                self.names.append(kv + suffix)

    @property
    def slots(self) -> int:
        return getattr(self, self.names[0]).shape[2]

    def kernel_buffers(self) -> tuple[list[torch.Tensor], int, int]:
        """([kq, ks, kz, vq, vs, vz], bits, group) as csrc/attention_kvquant.cpp reads this store in place: empty
        tensors where a part does not exist (zeros of int8, scales of an unquantized store); bits 16 = stored
        unquantized in self.dtype."""
        e = _EMPTY
        if self.bits is None:
            return [self.k, e, e, self.v, e, e], 16, self.group
        zk, zv = (self.kz, self.vz) if self.bits == 4 else (e, e)
        return [self.kq, self.ks, zk, self.vq, self.vs, zv], self.bits, self.group

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _encode(self, x: torch.Tensor) -> tuple:
        if self.bits is None:
            return (x.to(self.dtype),)
        return quantize_int8(x) if self.bits == 8 else quantize_int4(x, self.group)

    def _decode(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if self.bits is None:
            return parts[0]
        if self.bits == 8:
            return dequantize_int8(*parts, dtype=self.dtype)
        return dequantize_int4(*parts, group=self.group, dtype=self.dtype)

    def _bufs(self, kv: str) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self.names if n[0] == kv]

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, H, T, D] in slots [slot, slot+T)."""
        for kv, x in (("k", k), ("v", v)):
            for buf, part in zip(self._bufs(kv), self._encode(x)):
                buf[: x.shape[0]].narrow(2, slot, x.shape[2]).copy_(part)

    def write_index(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, H, T, D] in slots `index` [T] (same slots for every head)."""
        for kv, x in (("k", k), ("v", v)):
            for buf, part in zip(self._bufs(kv), self._encode(x)):
                buf[: x.shape[0]].index_copy_(2, index, part)

    def read(self, n: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, n), dequantized to the compute dtype."""
        return tuple(self._decode([b[:batch].narrow(2, 0, n) for b in self._bufs(kv)]) for kv in ("k", "v"))
