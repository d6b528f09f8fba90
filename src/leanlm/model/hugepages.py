"""Large weights in transparent huge pages (Linux).

Why: batch-1 decode streams every weight once per token. In 4 KiB pages a 300 MB matrix spans some 75,000
pages, and the TLB misses of that stream cost bandwidth; in 2 MiB pages it spans 150. Where the kernel's THP
setting is `madvise` (a common default) memory gets huge pages only when asked, and PyTorch does not ask
unless THP_MEM_ALLOC_ENABLE is set before it is imported. So `Transformer.prepare_decode` moves every large
weight into memory advised MADV_HUGEPAGE before its first touch. benchmarks/bench_hugepages.py measures the
effect (decode with and without, same run). Where THP is off (`never`), or off Linux, nothing moves.
LEANLM_HUGEPAGES=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref

import torch
from torch import nn

HUGE_PAGE = 2 << 20
MIN_TENSOR_BYTES = 256 << 10  # norms, biases and scales stay where they are
ARENA_BYTES = 256 << 20  # one region per this many bytes of weights
_MADV_HUGEPAGE = 14
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str | None:
    """The kernel's THP setting ('always', 'madvise', 'never'), or None where there is none (not Linux)."""
    try:
        with open(_THP_SETTING) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


def enabled() -> bool:
    value = os.environ.get("LEANLM_HUGEPAGES", "1").strip()
    if value not in ("0", "1"):
        from ..errors import LeanlmError

        raise LeanlmError(f"LEANLM_HUGEPAGES={value!r}: use 1 (large weights in huge pages, the default) or 0 (off)")
    return sys.platform.startswith("linux") and value == "1" and thp_mode() in ("always", "madvise")


def _madvise(addr: int, length: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), _MADV_HUGEPAGE) == 0


def hugepage_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor whose memory starts on a 2 MiB boundary and is advised
    MADV_HUGEPAGE (its pages are not touched yet, so they fault in as huge pages)."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    span = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    base = torch.empty(span + HUGE_PAGE, dtype=torch.uint8)  # large: its own mmap, untouched until written
    off = -base.data_ptr() % HUGE_PAGE
    _madvise(base.data_ptr() + off, span)
    return base[off : off + nbytes].view(dtype).view(shape)  # the view keeps `base` alive


def _layout(t: torch.Tensor) -> tuple[int, ...] | None:
    """The contiguous shape whose view gives t's strides: t's own (row-major), the transpose's
    (a column-major weight, set_decode_layout), or None for any other layout."""
    if t.is_contiguous():
        return tuple(t.shape)
    if t.dim() == 2 and t.t().is_contiguous():
        return tuple(t.t().shape)
    return None


def _placed(t: torch.Tensor) -> bool:
    ref = _ARENAS.get(t.untyped_storage().data_ptr())
    return ref is not None and ref() is t.untyped_storage()


def _movable(t: torch.Tensor) -> bool:
    """On CPU, in a layout _fill_arena copies, and not placed already."""
    return t.device.type == "cpu" and _layout(t) is not None and not _placed(t)


# storage address -> weak reference to the storage of each huge-page region made here (so placing twice is
# a no-op; a freed region's address may be reused by an ordinary tensor, which the dead reference tells)
_ARENAS: dict[int, weakref.ref] = {}


def _fill_arena(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` packed into one huge-page region (each on a 4 KiB boundary), same strides."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // 4096) * 4096
    arena = hugepage_empty((total,), torch.uint8)
    storage = arena.untyped_storage()
    _ARENAS[storage.data_ptr()] = weakref.ref(storage)
    out = []
    for t, off in zip(tensors, offsets):
        view = arena[off : off + t.numel() * t.element_size()].view(t.dtype).view(_layout(t))
        new = view if t.is_contiguous() else view.t()
        new.copy_(t)
        out.append(new)
    return out


def to_hugepages(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in huge-page memory, same values, shape and strides (row- or column-major); `t`
    itself where it is not on CPU, already placed, or in a layout this does not handle."""
    return _fill_arena([t])[0] if _movable(t) else t


@torch.no_grad()
def place_in_hugepages(model: nn.Module) -> int:
    """Move the parameters and buffers of `model` of at least MIN_TENSOR_BYTES into huge-page memory,
    packed in regions of about ARENA_BYTES in module order (a small model's per-layer matrices are smaller
    than a huge page; packed, their stream still runs over huge pages). Returns how many moved. Tensors
    shared between modules stay shared. Call it last before decoding: a region stays allocated while any
    tensor in it lives, so weights replaced afterwards would not free their memory."""
    if not enabled():
        return 0
    slots = []  # (module, kind, name, tensor) in module order, each tensor once
    seen: dict[int, int] = {}  # id(original) -> index into slots
    aliases = []  # (module, name, index) of buffers that share an earlier slot's tensor
    for mod in model.modules():
        for kind, table in (("param", mod._parameters), ("buffer", mod._buffers)):
            for name, t in table.items():
                if t is None:
                    continue
                if id(t) in seen:
                    if kind == "buffer":
                        aliases.append((mod, name, seen[id(t)]))
                    continue
                data = t.data if kind == "param" else t
                if data.numel() * data.element_size() < MIN_TENSOR_BYTES or not _movable(data):
                    continue
                seen[id(t)] = len(slots)
                slots.append((mod, kind, name, t))
    groups, size = [[]], 0
    for i, (_, kind, _, t) in enumerate(slots):
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > ARENA_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    placed: list[torch.Tensor] = [None] * len(slots)
    for group in groups:
        if not group:
            continue
        copies = _fill_arena([slots[i][3].data if slots[i][1] == "param" else slots[i][3] for i in group])
        for i, new in zip(group, copies):
            mod, kind, name, t = slots[i]
            if kind == "param":
                t.data = new  # the same Parameter object everywhere it is shared
            else:
                mod._buffers[name] = new
            placed[i] = new
    for mod, name, i in aliases:
        mod._buffers[name] = placed[i]
    return len(slots)


def huge_bytes() -> int:
    """Anonymous memory of this process now in huge pages (bytes; 0 where /proc says nothing)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
