"""Saving and loading quantized models: leanlm's own documented layout.

A quantized directory holds

    config.json        the Hugging Face config plus "leanlm_applied" (model.applied, see leanlm/apply.py)
                       and a "leanlm_quant" entry:
                         {"format": 1, "config": {method, bits, group, ...}, "dtype": "bfloat16",
                          "bits_per_weight": ..., "layers": {NAME: {"bits", "group", "symmetric",
                          "in_features", "out_features"} | {"shared_with": NAME}}}
    model.safetensors  leanlm parameter names (e.g. "layers.3.mlp.w_down.qweight", "norm.weight"):
                         NAME.qweight  int8 [N, Kp] (code - 128) for 8 bits;
                                       uint8 [N, Kp/2] for 4 bits, two codes per byte, low nibble =
                                       even column (portable: not the CPU-specific kernel layout)
                         NAME.scales   bfloat16 [N, G]
                         NAME.zeros    bfloat16 [N, G] (asymmetric only)
                         NAME.bias     float32 [N] (when the Linear has one)
                         NAME.table    int8 [2**bits] (table grids, layer meta "levels": w_hat = scale * table[code];
                                       see codebook.py); their codes: bits 4 packed as for 4 bits, bits 3 uint8
                                       [N, Kp*3/8]: per 32 columns 12 bytes, the low 2 bits (byte i, bits 2s..2s+1 =
                                       column 8s + i) then the high bits (bit j of a little-endian uint32 =
                                       column j), codebook.pack_blocks3's layout
                       every other tensor (norms, kept embeddings) in the saved dtype.
    tokenizer files

with w_hat = (code - 2**(bits-1)) * scale + zero for the G = ceil(K / group) groups of each row
(Kp = G * group; the padding columns of a short last group are never used).
`leanlm.load(DIR)` recognises the "leanlm_quant" entry and rebuilds the packed modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LeanlmError
from ..io import atomic_dir
from ..model.config import ModelConfig
from ..model.runtime import Transformer
from ..calibration import get_module, set_module
from .codebook import CodebookLinear
from .packed import QuantEmbedding, QuantLinear

FORMAT = 1


def quantized_tensors(model) -> dict[str, torch.Tensor]:
    info = model.quantization
    out: dict[str, torch.Tensor] = {}
    quant_prefixes = []
    for name, meta in info["layers"].items():
        module = get_module(model, name)
        quant_prefixes.append(name + ".")
        if "shared_with" in meta:
            continue
        if isinstance(module, QuantEmbedding):
            module = module.table
        tensors, _ = module.export()
        out.update({f"{name}.{k}": v for k, v in tensors.items()})
    for name, p in model.state_dict().items():
        if any(name.startswith(pfx) for pfx in quant_prefixes):
            continue
        out[name] = p.detach()
    return {k: v.contiguous() for k, v in out.items()}


def save_quantized(model, tokenizer, out: str | Path, force: bool = False) -> Path:
    """Write a quantized model (see the module docstring for the layout)."""
    from safetensors.torch import save_file

    from ..model.load import applied_entry

    info = getattr(model, "quantization", None)
    if not info:
        raise LeanlmError("model is not quantized; use leanlm.save for full-precision models")
    sd = quantized_tensors(model)
    with atomic_dir(out, force) as tmp:
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt", "producer": "leanlm", "leanlm_quant": str(FORMAT)})
        hf_cfg = model.config.to_hf_dict()
        hf_cfg["dtype"] = info["dtype"]
        hf_cfg["leanlm_quant"] = {k: info[k] for k in ("format", "config", "dtype", "bits_per_weight", "layers")}
        hf_cfg["leanlm_quant"]["quantize_seconds"] = info.get("seconds")
        hf_cfg.update(applied_entry(model))  # model.applied: every method applied, in order
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def is_quantized_dir(directory: Path) -> bool:
    try:
        return "leanlm_quant" in json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_quantized(directory: Path, cfg: ModelConfig, dtype: torch.dtype, device="cpu") -> Transformer:
    """Rebuild a model saved by save_quantized; unquantized tensors are cast to `dtype`."""
    from safetensors import SafetensorError

    from ..model.load import open_safetensors

    directory = Path(directory)
    info = json.loads((directory / "config.json").read_text())["leanlm_quant"]
    if info.get("format") != FORMAT:
        raise LeanlmError(f"{directory}: quantized format {info.get('format')} is not supported by this leanlm "
                          f"(expects {FORMAT}); re-run leanlm quantize")  # fmt: skip
    try:
        with open_safetensors(directory / "model.safetensors") as f:  # tensors that own their memory (re-tiled
            sd = {k: f.get_tensor(k) for k in f.keys()}  # codes must not keep the file's pages resident)
    except (SafetensorError, OSError, ValueError) as e:
        raise LeanlmError(f"cannot read {directory / 'model.safetensors'} ({e}); the file may be truncated or corrupt") from e
    with torch.device("meta"):
        model = Transformer(cfg)
    layers = info["layers"]
    consumed = set()
    modules = {}
    for name, meta in layers.items():
        if "shared_with" in meta:
            continue
        prefix = name + "."
        t = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if "qweight" not in t or "scales" not in t:
            raise LeanlmError(f"{directory}: tensors of quantized layer {name} are missing; the file is incomplete")
        consumed.update(prefix + k for k in t)
        modules[name] = CodebookLinear.from_export(t, meta) if meta.get("levels", "uniform") != "uniform" \
            else QuantLinear.from_export(t, meta)  # fmt: skip
    for name, module in modules.items():
        if name == "tok_embeddings":
            module = QuantEmbedding(module, dtype)
        set_module(model, name, module)
    for name, meta in layers.items():
        if "shared_with" in meta:
            target = modules[meta["shared_with"]]
            set_module(model, name, QuantEmbedding(target, dtype) if name == "tok_embeddings" else target)
    rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items() if k not in consumed}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta and "rope" not in n]
    if unexpected or still_meta:
        raise LeanlmError(f"{directory}: checkpoint does not match its config (missing {still_meta[:5]}, "
                          f"unexpected {unexpected[:5]})")  # fmt: skip
    model.init_rope(device)
    model = model.to(device) if str(device) != "cpu" else model
    model.quantization = {**info, "seconds": info.get("quantize_seconds")}
    model.quantization.setdefault("report", {})
    return model.eval()
