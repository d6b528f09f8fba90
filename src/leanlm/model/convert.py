"""GGUF file -> HF directory (config.json + model.safetensors + tokenizer), one tensor at a time.

transformers' GGUF loader (from_pretrained(gguf_file=...)) dequantizes every tensor to fp32 and holds
the whole model, then save_file holds it again: converting Qwen2.5-1.5B that way peaked at ~9 GB. Here
the file is memory-mapped (gguf.GGUFReader), each tensor is dequantized by gguf.quants.dequantize in row
chunks, passed through transformers' own tensor processor for the architecture (llama.cpp's q/k row
permutation for Llama, the `w + 1` norms of Gemma, ...) and name map (get_gguf_hf_weights_map on a
meta-device model), and written straight into a safetensors file whose header is known in advance. Only
one tensor is in memory at a time, so the peak is the largest tensor plus the mapped file's pages.

Cache dtype rule: a model of more than BF16_CACHE_PARAMS (1e9) parameters is cached in bfloat16 (half
the disk, and what such a model is run in anyway); smaller ones keep fp32, the same tensors bit for bit
as transformers' loader gives (checked on SmolLM2-135M and Gemma-3-270M), so results measured on them
stay valid. CONVERTER_VERSION names the output format in the cache key: bump it whenever the tensors
or files this module writes change.
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import LeanlmError
from .config import ModelConfig

CONVERTER_VERSION = 2  # 1: transformers' whole-model fp32 loader; 2: this streaming converter
BF16_CACHE_PARAMS = 1_000_000_000
CHUNK_BYTES = 64 << 20  # dequantize at most this many fp32 bytes at a time
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def cache_dtype(n_params: int) -> torch.dtype:
    """The dtype a converted model is cached in (see the module docstring)."""
    return torch.bfloat16 if n_params > BF16_CACHE_PARAMS else torch.float32


class SafetensorsWriter:
    """A safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets) is fixed
    up front, then each tensor's bytes are appended in the declared order."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict = {"__metadata__": metadata}
        offset = 0
        self._sizes = []
        for name, dtype, shape in specs:
            size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._sizes.append((name, dtype, tuple(shape), size))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._file = path.open("wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `tensor` (cast to its declared dtype, rows at a time so a cast never copies it whole)."""
        want, dtype, shape, size = self._sizes[self._next]
        if name != want or tuple(tensor.shape) != shape:
            raise AssertionError(f"safetensors stream: got {name} {tuple(tensor.shape)}, expected {want} {shape}")
        flat = tensor.reshape(-1)
        step = max(1, CHUNK_BYTES // 4)
        for start in range(0, max(flat.numel(), 1), step):
            piece = flat[start : start + step].to(dtype).contiguous()
            self._file.write(piece.view(torch.uint8).numpy().tobytes() if piece.numel() else b"")
        self._next += 1

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is None and self._next != len(self._sizes):
            raise AssertionError(f"safetensors stream: {len(self._sizes) - self._next} tensors were not written")


def _dequantize(tensor, file) -> np.ndarray:
    """One GGUF tensor as fp32. Its bytes are read from `file` rather than through the reader's memory
    map, whose pages would stay resident (counted in the process's RSS) until the end; it is dequantized
    in row chunks (gguf's dequantizers need several times the output's size in temporaries) into one
    preallocated array. Blocks never span rows, so the values are those of dequantizing it whole."""
    from gguf import GGMLQuantizationType, dequantize

    file.seek(tensor.data_offset)
    data = np.frombuffer(file.read(tensor.n_bytes), dtype=tensor.data.dtype).reshape(tensor.data.shape)
    if tensor.tensor_type == GGMLQuantizationType.F32:
        return data.copy()  # writable, as the processors and torch expect
    if data.ndim < 2:
        return dequantize(data, tensor.tensor_type)
    first = dequantize(data[:1], tensor.tensor_type)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    rows = max(1, CHUNK_BYTES // max(1, first.nbytes))
    for start in range(0, data.shape[0], rows):
        out[start : start + rows] = dequantize(data[start : start + rows], tensor.tensor_type)
    return out


@contextlib.contextmanager
def _one_reader(path: Path):
    """A GGUFReader of `path`, which transformers' config and tokenizer loaders reuse while the block runs.

    GGUFReader parses every metadata array element by element (a Qwen vocabulary and its merges: ~300k
    strings, several seconds each time), and transformers builds one per loader; sharing one parse saves
    minutes on a busy machine. A transformers that no longer asks gguf for a reader just parses again."""
    import gguf

    made = gguf.GGUFReader
    reader = made(str(path))

    def shared(p, mode="r"):
        return reader if Path(p).resolve() == path.resolve() and mode == "r" else made(p, mode)

    gguf.GGUFReader = shared
    try:
        yield reader
    finally:
        gguf.GGUFReader = made


class _TopLevelOnly:
    """A model seen by get_gguf_hf_weights_map without its submodules: their names are the top-level
    names with the prefix cut, which the recursion would map again (building gguf's name table ~400
    times, ~10 s); the architectures leanlm supports map completely at the top level."""

    def __init__(self, model):
        self.config = model.config
        self._state_dict = model.state_dict()

    def state_dict(self):
        return self._state_dict

    def named_children(self):
        return []


def _gguf_alone(stack: contextlib.ExitStack, path: Path) -> Path:
    """A temporary folder holding only a link to GGUF `path`: transformers' gguf_file= loaders then read the
    file alone, never a config.json / tokenizer_config.json beside it (which may name code to run)."""
    import tempfile

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="leanlm-gguf-")))
    (folder / path.name).symlink_to(path.resolve())
    return folder


def _unreadable(path: Path, e: Exception) -> LeanlmError:
    return LeanlmError(f"cannot read GGUF {path} ({type(e).__name__}: {e}); the file may be truncated or corrupt")


def convert(path: Path, out: Path) -> dict:
    """Write the HF directory of GGUF `path` (weights, config.json, tokenizer) into the existing empty
    directory `out`; returns what leanlm_source.json records about the conversion."""
    from transformers import AutoTokenizer

    t0 = time.time()
    with contextlib.ExitStack() as stack:
        try:
            reader = stack.enter_context(_one_reader(path))
            tok = AutoTokenizer.from_pretrained(_gguf_alone(stack, path), gguf_file=path.name, trust_remote_code=False)
        except LeanlmError:
            raise
        except Exception as e:  # the GGUF reader raises many kinds of errors on damaged files
            raise _unreadable(path, e) from e
        info = convert_weights(path, out, reader)
    tok.save_pretrained(out)
    return {"gguf": str(path), "seconds": time.time() - t0, **info}


def convert_weights(path: Path, out: Path, reader=None) -> dict:
    """Write the weights (model.safetensors) and config.json of GGUF `path` into directory `out`, streamed
    tensor by tensor; `reader`: the file's GGUFReader where the caller has one. Returns the converter
    version, the cached dtype and the parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    with contextlib.ExitStack() as stack:
        try:
            reader = reader or stack.enter_context(_one_reader(path))
            gguf_meta = load_gguf_checkpoint(str(path), return_tensors=False)  # metadata only: config + tokenizer
            hf_cfg = AutoConfig.from_pretrained(_gguf_alone(stack, path), gguf_file=path.name, trust_remote_code=False)
        except LeanlmError:
            raise
        except Exception as e:
            raise _unreadable(path, e) from e
        cfg = ModelConfig.from_hf(hf_cfg)  # fail early on unsupported architectures
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32, trust_remote_code=False)
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        if cfg.tie_embeddings:
            expected.pop("lm_head.weight", None)
        n_params = sum(int(np.prod(s)) for s in expected.values())
        dtype = cache_dtype(n_params)

        architecture = str(reader.fields["general.architecture"].contents())
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=gguf_meta["config"])
        name_map = get_gguf_hf_weights_map(_TopLevelOnly(skeleton), processor)
        tensors = [(name_map[t.name], t) for t in reader.tensors if name_map.get(t.name) in expected]
        missing = sorted(set(expected) - {name for name, _ in tensors})
        if missing:
            raise LeanlmError(f"GGUF {path} lacks tensors its config needs: {missing[:5]}; the file may be incomplete")

        specs = [(name, dtype, expected[name]) for name, _ in tensors]
        source = stack.enter_context(path.open("rb"))
        with SafetensorsWriter(out / "model.safetensors", specs, {"format": "pt", "producer": "leanlm"}) as writer:
            for name, t in tensors:
                weights = processor.process(weights=_dequantize(t, source), name=t.name).weights
                writer.write(name, torch.from_numpy(np.ascontiguousarray(weights)).reshape(expected[name]))
                del weights  # before the next tensor is dequantized: two embedding-sized arrays are 2 GB on a 1.5B

    hf_dict = hf_cfg.to_dict()
    hf_dict.pop("quantization_config", None)  # the weights are dequantized now
    hf_dict["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_dict, indent=2))
    return {"converter": CONVERTER_VERSION, "dtype": hf_dict["dtype"], "parameters": n_params}
