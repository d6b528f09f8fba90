"""Decoding: the generation loop and sampling."""

from .generate import GenerationStats, Sampling, generate, generate_tokens

__all__ = ["GenerationStats", "Sampling", "generate", "generate_tokens"]
