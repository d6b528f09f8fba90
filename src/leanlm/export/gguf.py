"""Export a leanlm model to a GGUF file that llama.cpp loads.

Architectures (llama.cpp's names), picked from the model's config:
- "llama": Llama / Mistral (no sliding window) with uniform layers; q/k rows permuted from transformers' half-split
  RoPE layout to llama.cpp's interleaved (NORM) one: per head, rows (0..d/2, d/2..d) -> (0, d/2, 1, d/2+1, ...);
  RoPE scaling (llama3, linear) as a `rope_freqs.weight` tensor of frequency divisors;
- "qwen2" (q/k/v bias) and "qwen3" (QK-norm): uniform layers, NEOX RoPE (rows as they are);
- "gemma3": uniform layers, NEOX RoPE; norms stored as 1 + w (llama.cpp multiplies by the weight; leanlm and
  transformers by 1 + w), the sqrt(hidden) embedding scale applied by llama.cpp itself (in fp32), the sliding
  layers as a per-layer `sliding_window_pattern` with their own RoPE base, and leanlm's attention scale
  (query_pre_attn_scalar^-1/2) folded into the q-norm weights where it differs from llama.cpp's 1/sqrt(head_dim);
- "deci" (llama.cpp's per-layer-width Llama, from Nemotron-NAS): Llama-family and Qwen2 models whose layers were
  pruned to different head counts or FFN widths (head_count, head_count_kv and feed_forward_length are per-layer
  arrays; q/k/v biases kept). llama.cpp reads per-layer widths for no other of these architectures, so a
  non-uniform Qwen3 or Gemma 3 model is refused.

Weight types (`TYPES`): F32, F16, Q8_0, Q4_0, Q5_0 (gguf.quants' quantizers), Q4_K, Q5_K, Q6_K and IQ4_NL (gguf_blocks.py).
Norms, biases and 1-D tensors stay F32; a matrix whose rows are not a multiple of its type's block (32, or 256 for
K-quants) takes llama.cpp's own fallback (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 when not even 32 divides
it). With a type below 8 bits the token embedding (and the tied or untied output head) is Q6_K where its rows
allow, else Q8_0, as llama.cpp's own quantizer keeps the head at higher precision.

A leanlm-quantized model exports its own codes where the GGUF type is the same grid (`exact_blocks`): int8
symmetric with a group that is a multiple of 32 (or per channel) as Q8_0, int4 symmetric likewise as Q4_0, the
IQ4_NL table grid as IQ4_NL, the signed integer tables (levels='signed') at 4 / 5 bits as Q4_0 / Q5_0 and at 4-6
bits as Q8_0 (the same values in a wider type); the bf16 scales become fp16 ones, exact for every scale in fp16's normal range
(the report counts any that are not). Every other pairing (asymmetric grids, learned tables, a different target
type) is dequantized and rounded again to the requested type: lossy, as a second quantization is.

Tokenizer metadata: copied from the source GGUF when the model was loaded from one (exact vocab, merges,
pre-tokenizer, chat template), otherwise built from the HF tokenizer (BPE vocab + merges as "gpt2", or a plain
vocabulary as "gpt2" with no merges).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import LeanlmError
from ..io import check_writable, replace_with_umask
from . import gguf_blocks

TYPES = ("f32", "f16", "q8_0", "q4_0", "q5_0", "q4_k", "q5_k", "q6_k", "iq4_nl")
# llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q4_0, MOSTLY_Q8_0, MOSTLY_Q5_0, MOSTLY_Q4_K_S, MOSTLY_Q5_K_S, MOSTLY_Q6_K,
# MOSTLY_IQ4_NL
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q5_0": 8, "q4_k": 14, "q5_k": 16, "q6_k": 18, "iq4_nl": 25}
_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}  # llama.cpp's, for rows not a multiple of 256
_QBLOCK = 32
_NORM_ROPE = ("llama", "deci")  # llama.cpp rotates interleaved pairs in these; NEOX (half-split) in the others
# How each tensor was written (export_gguf's report): the model's own codes, rounded once by this export, or float.
EXACT, EXACT_FP16_SCALE, REQUANTIZED, QUANTIZED, FLOAT = (
    "own codes (exact)", "own codes, scales rounded bf16->fp16", "dequantized and requantized (lossy)",
    "quantized by the export", "float")  # fmt: skip


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise LeanlmError("GGUF export needs the gguf package: pip install gguf") from e
    return gguf


def gguf_arch(cfg) -> str:
    """llama.cpp's architecture for this config, or a LeanlmError saying why none fits."""
    mt, uniform = cfg.model_type, cfg.is_uniform()
    if any(l.ffn_dim == 0 or l.n_heads == 0 or l.n_kv_heads == 0 for l in cfg.layers):
        raise LeanlmError("GGUF export: a layer without attention heads or FFN width has no llama.cpp equivalent")
    if len({l.head_dim for l in cfg.layers}) > 1:
        raise LeanlmError("GGUF export: llama.cpp needs one head_dim for all layers")
    if cfg.final_logit_softcap and cfg.family != "gemma3":
        raise LeanlmError("GGUF export: logit soft-capping is supported for Gemma 3 only")
    if mt == "gemma3_text":
        if not uniform:
            raise LeanlmError("GGUF export: llama.cpp's gemma3 architecture needs uniform layers (same heads and "
                              "FFN width in every layer); prune Gemma 3 uniformly, or keep leanlm's own directory")  # fmt: skip
        return "gemma3"
    if any(l.sliding_window for l in cfg.layers):
        raise LeanlmError("GGUF export: sliding-window attention is supported for Gemma 3 only (llama.cpp's "
                          "llama architecture has none); this Mistral-style model cannot be exported")  # fmt: skip
    if mt == "qwen3":
        if not uniform:
            raise LeanlmError("GGUF export: llama.cpp's qwen3 architecture needs uniform layers and its per-layer "
                              "architecture (deci) has no QK-norm; prune Qwen3 uniformly, or keep leanlm's directory")  # fmt: skip
        return "qwen3"
    if cfg.qk_norm:
        raise LeanlmError(f"GGUF export: QK-norm is not part of llama.cpp's architecture for '{mt}'")
    if not uniform:
        return "deci"
    if mt == "qwen2":  # llama.cpp's qwen2 sizes q and the output projection as hidden x hidden
        spec = cfg.layers[0]
        return "qwen2" if spec.n_heads * spec.head_dim == cfg.hidden_size else "deci"
    return "llama"


def check_exportable(model) -> str:
    """The GGUF architecture the model exports as (LeanlmError when there is none)."""
    cfg = model.config
    arch = gguf_arch(cfg)
    for key, params in cfg.rope.items():
        rt = params["rope_type"]
        if arch in _NORM_ROPE and rt not in ("default", "llama3", "linear"):
            raise LeanlmError(f"GGUF export: rope type '{rt}' is not supported for {arch} (default, llama3, linear)")
        if arch not in _NORM_ROPE and rt not in ("default", "linear"):
            raise LeanlmError(f"GGUF export: rope type '{rt}' is not supported for {arch} (default, linear)")
        if arch == "gemma3" and params.get("layer_type") == "sliding_attention" and rt != "default":
            raise LeanlmError("GGUF export: llama.cpp's gemma3 sliding layers take no rope scaling")
    from ..model.runtime import Linear

    known = (torch.nn.Linear, Linear) + _quantized_types()
    for name, mod in model.named_modules():  # an unknown nn.Linear subclass may hold more than its weight
        if isinstance(mod, torch.nn.Linear) and type(mod) not in known:
            raise LeanlmError(
                f"GGUF export: module {name} is a {type(mod).__name__}; export a dense (dequantized) model"
            )
    return arch


def _quantized_types() -> tuple:
    from ..quant.codebook import CodebookLinear
    from ..quant.packed import QuantEmbedding, QuantLinear

    return QuantLinear, CodebookLinear, QuantEmbedding


def permute_for_llamacpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k (and their bias) from half-split RoPE order to llama.cpp's interleaved order."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def _source_gguf(model) -> Path | None:
    d = getattr(model, "directory", None)
    if not d:
        return None
    meta = Path(d) / "leanlm_source.json"
    if not meta.exists():
        return None
    p = Path(json.loads(meta.read_text()).get("gguf", ""))
    return p if p.is_file() else None


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}


def read_tokenizer_fields(src: Path) -> list[tuple]:
    """(key, value, type, array element type) of every `tokenizer.*` metadata entry of GGUF `src`, parsed straight
    from the header (GGUFReader builds numpy views element by element: ~35 s for Gemma's 262k-token vocabulary on
    a busy 2-core machine, this ~1 s). Values are lists for arrays, str for strings."""
    import mmap
    import struct

    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise LeanlmError(f"{src} is not a GGUF file (bad magic bytes)")
        pos = 24  # magic, version (u32), tensor count (u64), then the metadata count (u64)
        (n_kv,) = struct.unpack_from("<Q", buf, 16)

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
            return buf[pos - n : pos].decode("utf-8", errors="surrogateescape")

        def value(t: int, keep: bool):
            nonlocal pos
            if t == 8:
                return string()
            if t in _SCALARS:
                fmt = _SCALARS[t]
                pos += struct.calcsize(fmt)
                return struct.unpack_from(fmt, buf, pos - struct.calcsize(fmt))[0]
            raise LeanlmError(f"{src}: unknown GGUF metadata type {t}")

        out = []
        for _ in range(n_kv):
            key = string()
            (t,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            keep = key.startswith("tokenizer.")
            if t != 9:
                v = value(t, keep)
                if keep:
                    out.append((key, v, t, None))
                continue
            sub, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if sub in _NP:  # numbers: one frombuffer
                width = np.dtype(_NP[sub]).itemsize
                v = bytes(buf[pos : pos + n * width])  # a copy: no view may outlive the mapping
                pos += n * width
                v = np.frombuffer(v, dtype=_NP[sub]).astype(bool if sub == 7 else _NP[sub]).tolist()
            else:
                v = [value(sub, keep) for _ in range(n)]
            if keep:
                out.append((key, v, t, sub))
        return out


def _copy_tokenizer_fields(writer, src: Path) -> None:
    gguf = _gguf()
    for key, v, t, sub in read_tokenizer_fields(src):
        writer.add_key_value(key, v, gguf.GGUFValueType(t), None if sub is None else gguf.GGUFValueType(sub))


def _tokenizer_fields(writer, tokenizer, vocab_size: int) -> None:
    """GGUF tokenizer metadata from an HF fast tokenizer (BPE or word-level vocabularies)."""
    gguf = _gguf()
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tj.get("model", {})
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = {a["id"] for a in tj.get("added_tokens", []) if a.get("special")}
    added = {a["id"] for a in tj.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added
                         else gguf.TokenType.NORMAL)  # fmt: skip
        else:  # the embedding may be padded past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = model.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    if not merges:  # llama.cpp's BPE loader requires the key; a merge of two unknown strings never fires
        merges = ["\u0120 \u0120"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, fn in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):  # fmt: skip
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            fn(int(tid))
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]))
    if getattr(tokenizer, "chat_template", None) and isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def _rope_freqs(model) -> np.ndarray | None:
    from ..model.runtime import rope_inv_freq

    cfg = model.config
    params = next(iter(cfg.rope.values()))
    if params["rope_type"] == "default":
        return None
    hd = cfg.layers[0].head_dim
    inv, scaling = rope_inv_freq(cfg, cfg.layers[0].rope_key, hd)
    if abs(scaling - 1.0) > 1e-6:
        raise LeanlmError(f"GGUF export: rope attention scaling {scaling} is not supported")
    theta = params.get("rope_theta", 10000.0)
    base = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    return (base / inv).numpy().astype(np.float32)


def dense_weight(module) -> torch.Tensor:
    """A Linear-like module's weight as a dense [out, in] tensor: plain, packed (oneDNN), sparse
    (bitmask/CSR) and quantized modules all export, the last two expanded / dequantized."""
    fn = getattr(module, "dense_weight", None)
    return (fn() if callable(fn) else module.weight).detach()


def _plan(model, arch: str) -> list[tuple[str, object, torch.Tensor | None]]:
    """(llama.cpp name, source, rows) per tensor: source is a tensor (norms, biases: already in llama.cpp's
    convention) or a Linear-like module, of which `rows` (an index tensor; None: all) are the tensor's rows (q/k/v
    and gate/up split from leanlm's fused matrices, q/k permuted for NORM RoPE)."""
    cfg = model.config
    gemma = arch == "gemma3"

    def norm(w: torch.Tensor) -> torch.Tensor:
        w = w.detach().float()
        return w + 1.0 if cfg.norm_plus_one else w

    plan = [("token_embd.weight", model.tok_embeddings, None), ("output_norm.weight", norm(model.norm.weight), None)]
    if model.lm_head is not None and not cfg.tie_embeddings:  # a quantized tied head shares the table
        plan.append(("output.weight", model.lm_head, None))
    for i, (spec, layer) in enumerate(zip(cfg.layers, model.layers)):
        b = f"blk.{i}."
        q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        attn = layer.attn
        rows = torch.arange(q + 2 * kv)
        rq, rk, rv = rows.split((q, kv, kv))
        if arch in _NORM_ROPE:
            rq, rk = permute_for_llamacpp(rq, spec.n_heads), permute_for_llamacpp(rk, spec.n_kv_heads)
        plan.append((b + "attn_norm.weight", norm(layer.attn_norm.weight), None))
        for kind, r in (("attn_q", rq), ("attn_k", rk), ("attn_v", rv)):
            plan.append((b + kind + ".weight", attn.wqkv, r))
            bias = getattr(attn.wqkv, "bias", None)
            if bias is not None:
                plan.append((b + kind + ".bias", bias.detach().float()[r], None))
        if attn.q_norm is not None:
            qn = norm(attn.q_norm.weight)
            if gemma:  # llama.cpp scales q by 1/sqrt(head_dim); leanlm by attn.scale: fold the ratio into the norm
                qn = qn * (attn.scale * spec.head_dim**0.5)
            plan += [(b + "attn_q_norm.weight", qn, None), (b + "attn_k_norm.weight", norm(attn.k_norm.weight), None)]
        plan.append((b + "attn_output.weight", attn.wo, None))
        if layer.attn_post_norm is not None:
            plan.append((b + "post_attention_norm.weight", norm(layer.attn_post_norm.weight), None))
        plan.append((b + "ffn_norm.weight", norm(layer.mlp_norm.weight), None))
        gate, up = torch.arange(2 * spec.ffn_dim).split((spec.ffn_dim, spec.ffn_dim))
        plan += [(b + "ffn_gate.weight", layer.mlp.w_gate_up, gate), (b + "ffn_up.weight", layer.mlp.w_gate_up, up),
                 (b + "ffn_down.weight", layer.mlp.w_down, None)]  # fmt: skip
        if layer.mlp_post_norm is not None:
            plan.append((b + "post_ffw_norm.weight", norm(layer.mlp_post_norm.weight), None))
    return plan


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names, dense, as the file stores them before its weight type is
    applied (q/k permuted for NORM RoPE, Gemma norms as 1 + w); quantized Linears dequantized."""
    arch = check_exportable(model)
    out, dense = {}, {}
    for name, src, rows in _plan(model, arch):
        if isinstance(src, torch.Tensor):
            out[name] = src
            continue
        if id(src) not in dense:  # q/k/v and gate/up share one fused matrix: dequantize it once
            dense[id(src)] = dense_weight(src)
        out[name] = dense[id(src)] if rows is None else dense[id(src)][rows]
    return out


def exact_blocks(module, rows: torch.Tensor | None, wtype: str):
    """(GGUF bytes, how, wtype) of a quantized module's own codes when `wtype` is the same grid, else None.

    Q8_0 = int8 symmetric, Q4_0 = int4 symmetric (w = d (q - 8)), IQ4_NL = the IQ4_NL table grid, each with a group
    that is a multiple of 32 or one scale per row (each 32-block takes its group's scale) and in_features % 32 == 0;
    the signed integer tables: Q4_0 / Q5_0 (w = d (q - 16)) at 4 / 5 bits, and Q8_0 (q - 2**(bits-1) as int8)."""
    from ..quant.codebook import IQ4NL, CodebookLinear
    from ..quant.packed import QuantEmbedding, QuantLinear

    if isinstance(module, QuantEmbedding):
        module = module.table
    if not isinstance(module, (QuantLinear, CodebookLinear)):
        return None
    spec, N, K = module.spec, module.out_features, module.in_features
    if K % _QBLOCK or (spec.group and spec.group % _QBLOCK) or not spec.symmetric:
        return None
    if isinstance(module, CodebookLinear) and spec.levels == "signed":
        same = {4: "q4_0", 5: "q5_0"}.get(spec.bits)
        if wtype not in (same, "q8_0"):
            return None
        codes, scale = module.codes()[:, :K], module.scales.float()
        if wtype == "q8_0":
            codes = codes.to(torch.int16) - (1 << (spec.bits - 1))
    elif isinstance(module, CodebookLinear):
        if wtype != "iq4_nl" or spec.levels != "iq4nl" or module.table.tolist() != list(IQ4NL):
            return None
        codes, scale = module.codes()[:, :K], module.scales.float()
    else:
        if wtype != {8: "q8_0", 4: "q4_0"}[spec.bits]:
            return None
        codes, scale = module._codes(0, N)[:, :K], module._scale_zero(slice(0, N))[0]
    g = spec.group_size(K)
    scale = scale[:, (torch.arange(K // _QBLOCK) * _QBLOCK) // g]  # [N, K/32]: each block's group scale
    if rows is not None:
        codes, scale = codes[rows], scale[rows]
    s = scale.numpy().astype(np.float32)
    d = s.astype(np.float16)
    if not np.isfinite(d).all():
        return None
    how = EXACT if (d.astype(np.float32) == s).all() else EXACT_FP16_SCALE
    c = codes.numpy()
    pack = {"q8_0": gguf_blocks.pack_q8_0, "q5_0": gguf_blocks.pack_q5_0}.get(wtype, gguf_blocks.pack_q4_0)
    return pack(c, d), how, wtype


def _tensor_type(name: str, K: int, wtype: str) -> str:
    """The GGUF type of one matrix with K columns under the requested `wtype` (see the module docstring)."""
    if wtype in ("f32", "f16"):
        return wtype
    if name in ("token_embd.weight", "output.weight"):  # the head keeps at least 6 bits
        wtype = "q8_0" if wtype == "q4_0" else "q6_k" if wtype in ("q4_k", "q5_k", "q5_0", "iq4_nl") else wtype
    if wtype in _FALLBACK and K % gguf_blocks.QK_K:
        wtype = _FALLBACK[wtype]
    return wtype if K % _QBLOCK == 0 else "f16"


def _in_features(module) -> int:
    for attr in ("in_features", "embedding_dim"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return dense_weight(module).shape[1]


def _encode(gguf, a: np.ndarray, t: str):
    Q = gguf.GGMLQuantizationType
    if t == "f32":
        return a.astype(np.float32), Q.F32
    if t == "f16":
        return a.astype(np.float16), Q.F16
    own = {"q4_k": (gguf_blocks.quantize_q4_k, Q.Q4_K), "q5_k": (gguf_blocks.quantize_q5_k, Q.Q5_K),
           "q6_k": (gguf_blocks.quantize_q6_k, Q.Q6_K), "iq4_nl": (gguf_blocks.quantize_iq4_nl, Q.IQ4_NL)}  # fmt: skip
    if t in own:
        fn, qt = own[t]
        return fn(a), qt
    qt = Q[t.upper()]
    return gguf.quants.quantize(a, qt), qt


def _metadata(w, gguf, model, arch: str, wtype: str, name: str | None) -> None:
    cfg = model.config
    spec = cfg.layers[0]
    w.add_name(name or Path(str(getattr(model, "source", "") or "model")).name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.n_layers)
    if arch == "deci":  # per-layer widths
        w.add_feed_forward_length([l.ffn_dim for l in cfg.layers])
        w.add_head_count([l.n_heads for l in cfg.layers])
        w.add_head_count_kv([l.n_kv_heads for l in cfg.layers])
    else:
        w.add_feed_forward_length(spec.ffn_dim)
        w.add_head_count(spec.n_heads)
        w.add_head_count_kv(spec.n_kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.head_dim)
    full = next((p for p in cfg.rope.values() if p.get("layer_type") != "sliding_attention"), next(iter(cfg.rope.values())))
    w.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    if arch not in _NORM_ROPE and full["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    if arch == "gemma3":
        windows = {l.sliding_window for l in cfg.layers if l.sliding_window}
        if len(windows) > 1:
            raise LeanlmError("GGUF export: llama.cpp takes one sliding window for all sliding layers")
        if windows:
            w.add_sliding_window(int(windows.pop()))
            w.add_sliding_window_pattern([bool(l.sliding_window) for l in cfg.layers])
            local = next(p for k, p in cfg.rope.items() if p.get("layer_type") == "sliding_attention")
            w.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))
        if cfg.final_logit_softcap:
            w.add_final_logit_softcapping(float(cfg.final_logit_softcap))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(_FILE_TYPE[wtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(model, tokenizer, out: str | Path, wtype: str = "f16", force: bool = False, name: str | None = None,
                report: dict | None = None) -> Path:  # fmt: skip
    """Write `model` as a llama.cpp-loadable GGUF file (atomically; no overwrite without force). `report`, when
    given, is filled with {tensor name: (GGUF type, how it was written: EXACT, EXACT_FP16_SCALE, REQUANTIZED,
    QUANTIZED or FLOAT)}."""
    model.set_decode_layout(False)  # row-major weights: the rows this code slices and views
    gguf = _gguf()
    wtype = wtype.lower()
    if wtype not in TYPES:
        raise LeanlmError(f"unknown GGUF type '{wtype}'; use one of: {', '.join(TYPES)}")
    out = check_writable(out, force)
    arch = check_exportable(model)
    if arch == "gemma3" and model.config.embed_scale is not None:
        if abs(model.config.embed_scale - model.config.hidden_size**0.5) > 1e-3:
            raise LeanlmError("GGUF export: llama.cpp scales Gemma 3 embeddings by sqrt(hidden) only")
    src = _source_gguf(model)
    if src is None and tokenizer is None:
        raise LeanlmError("GGUF export needs a tokenizer (llama.cpp refuses files without one)")
    report = {} if report is None else report
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        _metadata(w, gguf, model, arch, wtype, name)
        if src is not None:
            _copy_tokenizer_fields(w, src)
        else:
            _tokenizer_fields(w, tokenizer, model.config.vocab_size)
        freqs = _rope_freqs(model) if arch in _NORM_ROPE else None
        if freqs is not None:
            w.add_tensor("rope_freqs.weight", freqs, raw_dtype=gguf.GGMLQuantizationType.F32)
        dense: dict = {}
        for tname, src_t, rows in _plan(model, arch):
            if isinstance(src_t, torch.Tensor):  # norms, biases
                w.add_tensor(tname, src_t.float().numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
                report[tname] = ("F32", FLOAT)
                continue
            quantized = isinstance(src_t, _quantized_types())
            t = _tensor_type(tname, _in_features(src_t), wtype)
            # a quantized matrix whose own grid is the requested type (or the type this tensor gets) keeps its
            # codes; so does an int8 head under a 4-6 bit type (Q8_0: at least the 6 bits the head keeps anyway)
            tries = [wtype, t] + (["q8_0"] if tname in ("token_embd.weight", "output.weight") else [])
            exact = next((e for e in (exact_blocks(src_t, rows, x) for x in dict.fromkeys(tries)) if e), None) \
                if quantized and t not in ("f32", "f16") else None
            if exact is not None:
                arr, how, t = exact
                qt = gguf.GGMLQuantizationType[t.upper()]
            else:
                if id(src_t) not in dense:
                    dense = {id(src_t): dense_weight(src_t).float()}  # keep one dequantized matrix at a time
                a = dense[id(src_t)] if rows is None else dense[id(src_t)][rows]
                arr, qt = _encode(gguf, a.numpy(), t)
                how = FLOAT if t in ("f32", "f16") else REQUANTIZED if quantized else QUANTIZED
            w.add_tensor(tname, arr, raw_dtype=qt)
            report[tname] = (qt.name, how)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        replace_with_umask(tmp, out)  # the user's umask, not mkstemp's 0600
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def summarize_report(report: dict) -> str:
    """One line: how many tensors of each (type, how) an export wrote."""
    counts = Counter(report.values())
    return "; ".join(f"{n} {t} {how}" for (t, how), n in sorted(counts.items()))
