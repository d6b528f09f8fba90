"""The runtime, its configuration, and loading/saving."""

from .config import SUPPORTED_ARCHITECTURES, LayerSpec, ModelConfig
from .load import DEFAULT_MODELS, load, load_model, load_tokenizer, parse_dtype, resolve, save
from .runtime import KVCache, Transformer

__all__ = ["SUPPORTED_ARCHITECTURES", "DEFAULT_MODELS", "KVCache", "LayerSpec", "ModelConfig", "Transformer",
           "load", "load_model", "load_tokenizer", "parse_dtype", "resolve", "save"]
