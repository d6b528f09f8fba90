"""Export to the ecosystem: GGUF files for llama.cpp, HF directories for transformers, compressed-tensors
checkpoints (quantized models) for vLLM and transformers."""

from .compressed_tensors import compressed_tensors_state, export_compressed_tensors
from .gguf import TYPES as GGUF_TYPES
from .gguf import export_gguf
from .hf import TransformersLoad, check_transformers_load, export_hf, transformers_loadable

__all__ = ["GGUF_TYPES", "export_gguf", "export_hf", "export_compressed_tensors", "compressed_tensors_state",
           "transformers_loadable", "check_transformers_load", "TransformersLoad"]
