"""Long-context attention: KV-cache policies (sinks+window, H2O, SnapKV), KV quantization, evaluation."""

from .kv_quant import KVStore, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from .policies import KVPolicy, PolicyCache, cache_bytes
from .mla import MLA, MLAAttention, kv_bytes_per_token

__all__ = ["KVPolicy", "PolicyCache", "KVStore", "cache_bytes", "quantize_int8", "dequantize_int8",
           "quantize_int4", "dequantize_int4"]
__all__ += ["MLA", "MLAAttention", "kv_bytes_per_token"]
