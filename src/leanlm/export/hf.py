"""Export to a transformers-loadable directory (safetensors + config.json + tokenizer), and the check
that a model really loads in transformers (an actual load, never a guess from its shapes)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import LeanlmError
from ..model.load import save

_USE_INSTEAD = ("use --format gguf (llama.cpp; Llama-family models) or leanlm's own directory "
                "(leanlm.save, or the directory `leanlm quantize` / `leanlm prune` wrote), which leanlm.load reads")  # fmt: skip


def _not_dense_layout(model) -> str | None:
    """Why `model`'s tensors are not the dense layout transformers reads, or None when they are."""
    from ..model.runtime import Transformer

    with torch.device("meta"):  # the dense runtime of the same config: its tensor names and shapes
        dense = {k: tuple(v.shape) for k, v in Transformer(model.config).state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if ours != dense:
        odd = sorted(set(ours.items()) ^ set(dense.items()))[:3]
        return f"this model's layers were replaced by leanlm-only modules (tensors such as {odd})"
    if not model.config.is_uniform():
        return "this model has per-layer widths (non-uniform pruning), which transformers' config cannot describe"
    return None


def export_hf(model, tokenizer, out: str | Path, force: bool = False, dtype=None) -> Path:
    """Write a directory transformers loads: dense safetensors + config.json + tokenizer, atomically,
    never over an existing path without force. A quantized model is written as a compressed-tensors checkpoint
    (export_compressed_tensors; `dtype` then applies to its dense tensors). Replaced (sparse) layers and per-layer
    widths raise a LeanlmError instead of writing a directory transformers cannot read."""
    if getattr(model, "quantization", None):
        from .compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(model, tokenizer, out, force=force, dtype=dtype)
    reason = _not_dense_layout(model)
    if reason:
        raise LeanlmError(f"export --format hf: {reason}, which is not loadable by transformers yet; {_USE_INSTEAD}")
    return save(model, tokenizer, out, force=force, dtype=dtype)


class TransformersLoad(NamedTuple):
    """Whether transformers loads a model: `error` says why not; `max_logit_diff` is the largest
    difference of its logits from leanlm's, relative to leanlm's largest logit (None when not compared)."""

    loadable: bool
    error: str | None = None
    max_logit_diff: float | None = None


def check_transformers_load(directory: str | Path, model=None) -> TransformersLoad:
    """Load `directory` with transformers' AutoModelForCausalLM (trust_remote_code=False: no code from the
    folder runs). Missing, unexpected or mismatched tensors count as a failed load (transformers would
    fill them with random values). With `model` (leanlm's copy), transformers' logits on 8 tokens must
    also match leanlm's. Loads the whole model in float32: meant for small models."""
    from transformers import AutoModelForCausalLM

    try:
        hf, info = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False, dtype=torch.float32,
                                                        output_loading_info=True)  # fmt: skip
    except Exception as e:  # transformers raises many kinds (config validation, shapes, formats)
        return TransformersLoad(False, f"{type(e).__name__}: {str(e).strip()[:300]}")
    bad = {k: sorted(v)[:3] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if (v := info.get(k))}
    if bad:
        return TransformersLoad(False, "transformers loaded it with " + "; ".join(f"{k} {v}" for k, v in bad.items()))
    if model is None:
        return TransformersLoad(True)
    ids = ((torch.arange(8) * 7 + 1) % model.config.vocab_size)[None]
    with torch.inference_mode():
        theirs = hf(ids).logits[0].float()
        ours = model(ids.to(model.device))[0].float().cpu()
    diff = float((theirs - ours).abs().max() / ours.abs().max().clamp_min(1e-6))
    tol = 1e-3 if model.dtype == torch.float32 else 5e-2  # bf16/fp16 weights compute in lower precision here
    if not diff <= tol:
        return TransformersLoad(False, f"transformers' logits differ from leanlm's (relative {diff:.3g} > {tol})", diff)
    return TransformersLoad(True, None, diff)


def transformers_loadable(model) -> TransformersLoad:
    """Save `model` as leanlm.save would (to a temporary folder) and try to load that with transformers
    (check_transformers_load): the answer comes from a load, not from the model's shapes."""
    with tempfile.TemporaryDirectory(prefix="leanlm-hf-check-") as tmp:
        directory = save(model, None, Path(tmp) / "model")
        return check_transformers_load(directory, model)
