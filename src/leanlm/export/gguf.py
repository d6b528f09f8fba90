"""Export a leanlm model to a GGUF file that llama.cpp loads (architecture "llama").

What llama.cpp expects, and how each piece is produced here:
- tensor names: token_embd, output_norm, output (untied only), blk.N.{attn_norm, attn_q,
  attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}; shapes as torch's
  [out, in] (the GGUF header lists them reversed, as ggml does);
- q/k rows permuted from transformers' half-split RoPE layout to llama.cpp's interleaved
  (NORM) layout: per head, rows (0..d/2, d/2..d) -> (0, d/2, 1, d/2+1, ...);
- RoPE scaling (llama3, linear) as a `rope_freqs.weight` tensor of frequency divisors
  (default inv_freq / scaled inv_freq), the way llama.cpp applies per-dimension factors;
- weight types: F32, F16, Q8_0, Q4_0 via gguf.quants (numpy reference quantizers, the same
  block layouts as ggml). Norms and tensors whose rows are not a multiple of the 32-wide
  block stay F32/F16; with Q4_0 the token embedding (the tied output head too) is Q8_0,
  since a 4-bit output head costs the most quality for the least size (llama.cpp's own
  quantizer also keeps the output head at higher precision);
- tokenizer metadata: copied from the source GGUF when the model was loaded from one
  (exact vocab, merges, pre-tokenizer, chat template), otherwise built from the HF
  tokenizer (BPE vocab + merges as "gpt2", or a plain vocabulary as "gpt2" with no merges).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import LeanlmError
from ..io import check_writable, replace_with_umask

TYPES = ("f32", "f16", "q8_0", "q4_0")
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q4_0, MOSTLY_Q8_0
_QBLOCK = 32


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise LeanlmError("GGUF export needs the gguf package: pip install gguf") from e
    return gguf


def check_exportable(model) -> None:
    cfg = model.config
    if cfg.family != "llama" or cfg.model_type not in ("llama", "mistral"):
        raise LeanlmError(
            f"GGUF export supports Llama-family checkpoints (llama, mistral without sliding window); got '{cfg.model_type}'"
        )
    if any(l.sliding_window for l in cfg.layers):
        raise LeanlmError("GGUF export: sliding-window attention is not supported by llama.cpp's llama architecture")
    if cfg.qk_norm or cfg.final_logit_softcap:
        raise LeanlmError("GGUF export: QK-norm / logit soft-capping are not part of the llama architecture")
    if not cfg.is_uniform():
        raise LeanlmError(
            "GGUF export needs uniform layers (same heads, head_dim and FFN width in every layer); "
            "prune uniformly, or keep leanlm's own directory (leanlm.save), which leanlm.load reads"
        )
    for key, params in cfg.rope.items():
        if params["rope_type"] not in ("default", "llama3", "linear"):
            raise LeanlmError(f"GGUF export: rope type '{params['rope_type']}' is not supported (default, llama3, linear)")
    from ..model.runtime import Linear

    for name, mod in model.named_modules():  # an unknown nn.Linear subclass may hold more than its weight
        if isinstance(mod, torch.nn.Linear) and type(mod) not in (torch.nn.Linear, Linear):
            raise LeanlmError(
                f"GGUF export: module {name} is a {type(mod).__name__}; export a dense (dequantized) model"
            )


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


def _copy_tokenizer_fields(writer, src: Path) -> None:
    gguf = _gguf()
    reader = gguf.GGUFReader(str(src))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)


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


def _encode(gguf, name: str, t: torch.Tensor, wtype: str):
    """(array, raw_dtype) for one tensor in the requested weight type."""
    a = t.detach().float().cpu().numpy()
    Q = gguf.GGMLQuantizationType
    if a.ndim == 1 or wtype == "f32":
        return a.astype(np.float32), Q.F32
    if name == "token_embd.weight" and wtype == "q4_0":
        wtype = "q8_0"
    if wtype in ("q8_0", "q4_0") and a.shape[-1] % _QBLOCK == 0:
        qt = Q.Q8_0 if wtype == "q8_0" else Q.Q4_0
        return gguf.quants.quantize(a, qt), qt
    return a.astype(np.float16), Q.F16


def dense_weight(module) -> torch.Tensor:
    """A Linear-like module's weight as a dense [out, in] tensor: plain, packed (oneDNN), sparse
    (bitmask/CSR) and quantized modules all export, the last two expanded / dequantized."""
    fn = getattr(module, "dense_weight", None)
    return (fn() if callable(fn) else module.weight).detach()


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names (dense, q/k permuted). Quantized Linears are
    dequantized here; the requested GGUF type re-quantizes them with ggml's own block formats."""
    cfg = model.config
    out = {"token_embd.weight": dense_weight(model.tok_embeddings), "output_norm.weight": model.norm.weight.detach()}
    if model.lm_head is not None and not cfg.tie_embeddings:  # a quantized tied head shares the table
        out["output.weight"] = dense_weight(model.lm_head)
    for i, (spec, layer) in enumerate(zip(cfg.layers, model.layers)):
        b = f"blk.{i}."
        q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        out[b + "attn_norm.weight"] = layer.attn_norm.weight.detach()
        out[b + "ffn_norm.weight"] = layer.mlp_norm.weight.detach()
        wqkv = layer.attn.wqkv
        for kind, t in (("weight", dense_weight(wqkv)), ("bias", getattr(wqkv, "bias", None))):
            if t is None:
                continue
            wq, wk, wv = t.detach().split((q, kv, kv), dim=0)
            out[b + f"attn_q.{kind}"] = permute_for_llamacpp(wq, spec.n_heads)
            out[b + f"attn_k.{kind}"] = permute_for_llamacpp(wk, spec.n_kv_heads)
            out[b + f"attn_v.{kind}"] = wv
        out[b + "attn_output.weight"] = dense_weight(layer.attn.wo)
        gate, up = dense_weight(layer.mlp.w_gate_up).split((spec.ffn_dim, spec.ffn_dim), dim=0)
        out[b + "ffn_gate.weight"], out[b + "ffn_up.weight"] = gate, up
        out[b + "ffn_down.weight"] = dense_weight(layer.mlp.w_down)
    return out


def export_gguf(model, tokenizer, out: str | Path, wtype: str = "f16", force: bool = False, name: str | None = None) -> Path:
    """Write `model` as a llama.cpp-loadable GGUF file (atomically; no overwrite without force)."""
    model.set_decode_layout(False)  # row-major weights: the rows this code slices and views
    gguf = _gguf()
    wtype = wtype.lower()
    if wtype not in TYPES:
        raise LeanlmError(f"unknown GGUF type '{wtype}'; use one of: {', '.join(TYPES)}")
    out = check_writable(out, force)
    check_exportable(model)
    cfg = model.config
    spec = cfg.layers[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name or Path(str(getattr(model, "source", "") or "model")).name)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(spec.ffn_dim)
        w.add_head_count(spec.n_heads)
        w.add_head_count_kv(spec.n_kv_heads)
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
        w.add_rope_dimension_count(spec.head_dim)
        rope = next(iter(cfg.rope.values()))
        w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(_FILE_TYPE[wtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        src = _source_gguf(model)
        if src is not None:
            _copy_tokenizer_fields(w, src)
        elif tokenizer is not None:
            _tokenizer_fields(w, tokenizer, cfg.vocab_size)
        else:
            raise LeanlmError("GGUF export needs a tokenizer (llama.cpp refuses files without one)")
        freqs = _rope_freqs(model)
        if freqs is not None:
            w.add_tensor("rope_freqs.weight", freqs, raw_dtype=gguf.GGMLQuantizationType.F32)
        for tname, t in gguf_tensors(model).items():
            arr, qt = _encode(gguf, tname, t, wtype)
            w.add_tensor(tname, arr, raw_dtype=qt)
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
