"""Export to the ecosystem: GGUF files for llama.cpp, HF directories for transformers."""

from .gguf import TYPES as GGUF_TYPES
from .gguf import export_gguf
from .hf import export_hf

__all__ = ["GGUF_TYPES", "export_gguf", "export_hf"]
