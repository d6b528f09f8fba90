"""Long-context attention by name: KV-cache policies (sinks+window, H2O, SnapKV, pooled-global TGA), query-aware
sparse attention at decode (Quest pages, top-k keys), KV quantization, the MLA-like latent conversion, evaluation.

Each method goes through the one `leanlm.apply` verb: `KVPolicy.parse("quest:pages=64")`, `"topk:keys=1024"`,
`"tga:group=16,window=512"`, `"sinks:4,window:1020,int8"`, ... (also `--kv` of generate / eval / serve and the
recipe step `kv:`), and `MLA(rank=96, rope_dims=32)` (recipe step `mla:`)."""

from .kv_quant import KVStore, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from .mla import MLA, MLAAttention, kv_bytes_per_token
from .policies import KVPolicy, PolicyCache, cache_bytes
from .sparse import SparseCache, SparsePolicy, sparse_reference
from .tga import TGACache, TGAPolicy

__all__ = ["KVPolicy", "PolicyCache", "SparsePolicy", "SparseCache", "sparse_reference", "TGAPolicy", "TGACache",
           "MLA", "MLAAttention", "kv_bytes_per_token", "KVStore", "cache_bytes", "quantize_int8", "dequantize_int8",
           "quantize_int4", "dequantize_int4"]
