"""Long-context attention: KV-cache policies (sinks+window, H2O, SnapKV, pooled-global TGA), query-aware sparse
attention at decode (Quest pages, top-k keys), KV quantization, evaluation."""

from .kv_quant import KVStore, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from .policies import KVPolicy, PolicyCache, cache_bytes
from .sparse import SparseCache, SparsePolicy, sparse_reference
from .tga import TGACache, TGAPolicy

__all__ = ["KVPolicy", "PolicyCache", "SparsePolicy", "SparseCache", "sparse_reference", "TGAPolicy", "TGACache",
           "KVStore", "cache_bytes", "quantize_int8", "dequantize_int8",
           "quantize_int4", "dequantize_int4"]
