"""Export a leanlm-quantized model as a compressed-tensors checkpoint (the layout vLLM, transformers and
llm-compressor read): "pack-quantized" W4A16 / W8A16 (and W5A16 / W6A16 from the signed integer tables), per group or per channel.

How leanlm's layout maps onto it:
- leanlm's grid is w = (q - mid) * scale + zero with codes q in [0, 2**bits), bf16 scale / zero per (row, group).
  compressed-tensors' is w = (q' - zero_point) * scale with signed codes q' in [-mid, mid), so q' = q - mid and,
  when asymmetric, zero_point = -zero / scale. A symmetric grid maps exactly, and so does the signed integer table
  (levels="signed", codebook.py: its codes minus mid are q', the code -mid included). An asymmetric one maps exactly
  only where every zero is a whole number of scale steps (zero points are integers there); leanlm's min/max
  grids have fractional zeros, and such models are refused with a LeanlmError rather than silently rounded.
- codes are packed dense into int32 along the input dimension, value i of each 32 at bits [i*bits, (i+1)*bits)
  (8 int4 or 4 int8 per word; 5 and 6 bits straddle words), stored unsigned with the +mid offset: `weight_packed` int32 [N, K*bits/32],
  `weight_scale` [N, G] (float32: the bf16 values, so that (q' - zp) * scale is exact in the scale's dtype),
  `weight_zero_point` (asymmetric only) packed the same way along the output dimension, `weight_shape` [N, K].
- a last group shorter than leanlm's group (in_features not a multiple of it) becomes groups of
  gcd(group, in_features) columns carrying repeated scales: the same weights, a group size the format accepts.
- leanlm's fused wqkv / w_gate_up are split row-wise into q/k/v and gate/up (quantization is per row).
- a quantized embedding table or LM head is written dense (its dequantized values, float32, exact) and the head
  is listed in `ignore`: vLLM quantizes neither through compressed-tensors.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from ..errors import LeanlmError
from ..io import atomic_dir

FORMAT = "pack-quantized"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
_HF_PARTS = {"attn.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn.wo": ("self_attn.o_proj",),
             "mlp.w_gate_up": ("mlp.gate_proj", "mlp.up_proj"), "mlp.w_down": ("mlp.down_proj",)}  # fmt: skip


def _words(b: torch.Tensor) -> torch.Tensor:
    """uint8 [R, C] -> int32 [R, ceil(C/4)]: each four bytes one word, the first byte lowest (zero-padded)."""
    if pad := -b.shape[1] % 4:
        b = torch.nn.functional.pad(b, (0, pad))
    if sys.byteorder == "little":
        return b.contiguous().view(torch.int32)
    w = (b.to(torch.int64).view(b.shape[0], -1, 4) << torch.tensor([0, 8, 16, 24])).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes [R, C] (in [-2**(bits-1), 2**(bits-1))) -> int32 [R, ceil(C*bits/32)]: a dense little-endian
    bit stream, value i at bits [i*bits, (i+1)*bits) (so 5- and 6-bit values straddle words), each stored with the
    +2**(bits-1) offset (compressed-tensors' layout)."""
    if not 4 <= bits <= 8:
        raise LeanlmError(f"compressed-tensors export packs 4- to 8-bit codes, got {bits}")
    u = (codes.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    if bits == 4:  # two values per byte, the first in the low nibble
        u = torch.nn.functional.pad(u, (0, u.shape[1] % 2))
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    if bits in (4, 8):
        return _words(u)
    R, C = u.shape  # 5-7 bits: per 32 values, `bits` words
    v = torch.nn.functional.pad(u.to(torch.int64), (0, -C % 32)).view(R, -1, 32)
    start = torch.arange(32) * bits
    words = torch.zeros(R, v.shape[1], bits + 1, dtype=torch.int64)
    words.index_add_(2, start // 32, v << (start % 32))  # (bits beyond 32 carry into the next word below)
    stream = words[..., :bits] & 0xFFFFFFFF
    stream[..., 1:] |= words[..., :-2] >> 32  # no two values overlap, so the carries are whole bit ranges
    w = stream.reshape(R, -1)[:, : -(-C * bits // 32)]
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _packed_weight(t: dict[str, torch.Tensor], bits: int, K: int) -> torch.Tensor:
    """compressed-tensors' weight_packed straight from QuantLinear.export()'s portable bytes: leanlm's unsigned
    code is the stored value (q' + mid = q), and its int4 bytes already hold the even column in the low nibble."""
    if bits == 8:
        return _words(t["qweight"][:, :K].view(torch.uint8) ^ 0x80)  # (code - 128) as int8 -> code
    if K % 2 == 0:
        return _words(t["qweight"][:, : K // 2])
    from ..quant.packed import unpack_int4

    return pack_int32(unpack_int4(t["qweight"])[:, :K].to(torch.int16) - 8, 4)


def _linear_parts(model, name: str) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
    """(HF module prefix, HF parts, their row counts) of leanlm Linear `name` ("layers.3.attn.wqkv")."""
    _, idx, module = name.split(".", 2)
    if module not in _HF_PARTS:
        raise LeanlmError(f"compressed-tensors export: quantized module {name} has no transformers counterpart")
    spec = model.config.layers[int(idx)]
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    rows = {"attn.wqkv": (q, kv, kv), "mlp.w_gate_up": (spec.ffn_dim, spec.ffn_dim)}.get(module, (-1,))
    return f"model.layers.{idx}.", _HF_PARTS[module], rows


def _packed_and_grid(module, name: str):
    """(weight_packed int32 [N, K*bits/32], scale float32 [N, G'], zero point int8 [N, G'] | None, group' (0 =
    channel), QSpec) of a QuantLinear or a CodebookLinear on the signed integer table (its codes minus 2**(bits-1)
    are compressed-tensors' symmetric int codes)."""
    from ..quant.codebook import CodebookLinear

    spec, K = module.spec, module.in_features
    if isinstance(module, CodebookLinear):
        packed = pack_int32(module.codes()[:, :K].to(torch.int16) - spec.mid, spec.bits)
        tensors = {"scales": module.scales}
    else:
        tensors, meta = module.export()
        packed = _packed_weight(tensors, spec.bits, K)
    scale = tensors["scales"].float()
    zp = None
    if "zeros" in tensors:
        steps = -tensors["zeros"].float() / scale
        zp = steps.round()
        if not (torch.equal(zp, steps) and zp.min() >= -spec.mid and zp.max() < spec.mid):
            raise LeanlmError(
                f"compressed-tensors export: {name} has an asymmetric grid whose zeros are not whole numbers of scale "
                "steps (compressed-tensors and vLLM store integer zero points), so it has no exact compressed-tensors "
                "form; quantize with a symmetric grid (leanlm quantize ... --sym, or symmetric=True) to export it"
            )
        zp = zp.to(torch.int8)
    group = spec.group
    if group and K % group:  # a short last group: split every group into gcd-wide ones with the same scale
        sub = math.gcd(group, K)
        reps = group // sub
        scale = scale.repeat_interleave(reps, dim=1)[:, : K // sub]
        zp = None if zp is None else zp.repeat_interleave(reps, dim=1)[:, : K // sub]
        group = sub
    return packed, scale, zp, group, spec


def _scheme_args(bits: int, group: int, symmetric: bool) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group or None,
            "strategy": "group" if group else "channel", "dynamic": False, "actorder": None,
            "block_structure": None, "observer": None, "observer_kwargs": {}}  # fmt: skip


def compressed_tensors_state(model, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """transformers-named tensors and the `quantization_config` of `model` (leanlm-quantized, uniform layers).
    `dtype`: dtype of the dense tensors (norms, biases, unquantized Linears); default the model's."""
    from ..calibration import get_module
    from ..model.load import leanlm_to_hf
    from ..quant.codebook import CodebookLinear
    from ..quant.packed import QuantEmbedding, QuantLinear

    info = getattr(model, "quantization", None)
    if not info:
        raise LeanlmError("compressed-tensors export is for quantized models; export a dense model with --format hf")
    if not model.config.is_uniform():
        raise LeanlmError("compressed-tensors export: this model has per-layer widths (non-uniform pruning), which "
                          "transformers' config cannot describe; keep leanlm's own directory (leanlm.save)")  # fmt: skip
    model.set_decode_layout(False)
    dtype = dtype or model.dtype
    quantized = {n for n, m in info["layers"].items() if "shared_with" not in m}
    shared = {n: m["shared_with"] for n, m in info["layers"].items() if "shared_with" in m}
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple, list[str]] = {}
    dense: dict[str, torch.Tensor] = {}
    for name in sorted(quantized | set(shared)):
        module = get_module(model, name)
        if isinstance(module, QuantEmbedding) or name in ("lm_head", "tok_embeddings"):
            table = module.table if isinstance(module, QuantEmbedding) else module
            dense[f"{name}.weight"] = table.dequantize(torch.float32)  # exact; vLLM quantizes neither
            continue
        if name in shared:
            raise LeanlmError(f"compressed-tensors export: {name} shares its weights with {shared[name]}, which the "
                              "format cannot express")  # fmt: skip
        signed = isinstance(module, CodebookLinear) and module.spec.levels == "signed"
        if not isinstance(module, QuantLinear) and not signed:
            what = f"on the {module.spec.levels!r} table" if isinstance(module, CodebookLinear) else type(module).__name__
            raise LeanlmError(f"compressed-tensors export: {name} is {what}, which has no compressed-tensors form (its "
                              "int grids only); quantize with a uniform symmetric grid or levels='signed'")  # fmt: skip
        packed, scale, zp, group, spec = _packed_and_grid(module, name)
        prefix, parts, rows = _linear_parts(model, name)
        rows = rows if rows != (-1,) else (packed.shape[0],)
        bias = module.bias
        for part, p, s, z, b in zip(parts, packed.split(rows), scale.split(rows), (zp.split(rows) if zp is not None
                                    else [None] * len(rows)), (bias.split(rows) if bias is not None else [None] * len(rows))):  # fmt: skip
            hf = prefix + part
            out[hf + ".weight_packed"] = p.contiguous()
            out[hf + ".weight_scale"] = s.contiguous()
            out[hf + ".weight_shape"] = torch.tensor([p.shape[0], module.in_features], dtype=torch.int64)
            if z is not None:
                out[hf + ".weight_zero_point"] = pack_int32(z.t().contiguous(), spec.bits).t().contiguous()
            if b is not None:
                out[hf + ".bias"] = b.float().contiguous()  # float32: QuantLinear adds its bias in float32
            groups.setdefault((spec.bits, group, zp is None), []).append(hf)
    quant_prefixes = tuple(n + "." for n in quantized | set(shared))
    for k, v in model.state_dict().items():
        if not k.startswith(quant_prefixes) and "rope" not in k:
            dense[k] = v.detach().to(dtype) if v.is_floating_point() else v.detach()
    if model.config.tie_embeddings:
        dense.pop("lm_head.weight", None)
    out.update(leanlm_to_hf(dense, model.config))
    quant_names = {n for names in groups.values() for n in names}
    all_linears = [f"model.layers.{i}.{p}" for i in range(model.config.n_layers) for p in PROJECTIONS] + ["lm_head"]
    config_groups = {}
    for i, ((bits, group, sym), names) in enumerate(sorted(groups.items())):
        targets = ["Linear"] if len(groups) == 1 else sorted(names)
        config_groups[f"group_{i}"] = {"targets": targets, "weights": _scheme_args(bits, group, sym),
                                       "input_activations": None, "output_activations": None, "format": FORMAT}  # fmt: skip
    qcfg = {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [n for n in all_linears if n not in quant_names],
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}, "version": _ct_version()}  # fmt: skip
    return {k: v.contiguous() for k, v in out.items()}, qcfg


def _ct_version() -> str:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # the package is only needed to read the file, not to write it
        return "0.20.1"


def export_compressed_tensors(model, tokenizer, out: str | Path, force: bool = False, dtype=None) -> Path:
    """Write `model` (leanlm-quantized) as a compressed-tensors directory (config.json with `quantization_config`,
    model.safetensors, tokenizer) that transformers and vLLM load; atomically, never over a path without force."""
    from safetensors.torch import save_file

    from ..model.load import parse_dtype

    sd, qcfg = compressed_tensors_state(model, None if dtype is None else parse_dtype(dtype))
    with atomic_dir(out, force) as tmp:
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt", "producer": "leanlm"})
        hf_cfg = model.config.to_hf_dict()
        hf_cfg.pop("leanlm_layers", None)
        hf_cfg["dtype"] = str(dtype and parse_dtype(dtype) or model.dtype).removeprefix("torch.")
        hf_cfg["quantization_config"] = qcfg
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)
