"""Export to a transformers-loadable directory (safetensors + config.json + tokenizer)."""

from __future__ import annotations

from pathlib import Path

from ..model.load import save


def export_hf(model, tokenizer, out: str | Path, force: bool = False, dtype=None) -> Path:
    """Same as leanlm.save: written atomically, never over an existing path without force."""
    return save(model, tokenizer, out, force=force, dtype=dtype)
