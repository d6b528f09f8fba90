"""leanlm's compiled kernels as Python functions: thin wrappers over src/leanlm/csrc (built by native.py).

Kernels (all CPU, fp32 accumulation, batch-invariant: a row's result does not depend on how many
rows share the call, so a k-token verification forward equals k one-token steps bit for bit):

- `small_linear`  x [1..16, K] . W^T for a row-major fp32/bf16 W (csrc/gemv_small.cpp)
- `q_linear`      x [1..16, K] . W^T for leanlm.quant's packed int4/int8 W (csrc/qlinear.cpp)
- `q_linear_codebook` x [1..16, K] . W^T for a 4-bit table-coded W (csrc/qlinear_codebook.cpp);
                  `q_linear_codebook3` the same for a 3-bit one (csrc/qlinear_codebook3.cpp)
- `q_linear_wide` x [1..16, K] . W^T for a 5-bit or 6-bit signed integer grid (csrc/qlinear_wide.cpp)
- `q_gemm`        x [M, K] . W^T for the same packed W, many rows (prefill) on AVX512-VNNI (csrc/gemm_int8.cpp;
                  not batch-invariant with q_linear, which keeps every product of up to 16 rows)
- `sparse_linear` (x * (|x| > t)) . W^T for a transposed W (csrc/sparse.cpp), leanlm.adaptive's activation sparsity
- `attend`        RoPE + KV-cache write + attention for 1..16 new positions (csrc/attention.cpp);
                  `attend_rows` the same for up to 16 sequences, each with its own cache and position
- `attend_kvquant` attention for 1..16 new positions read straight from an int8/int4 KV store
                  (leanlm.attention.kv_quant.KVStore), no dequantized copy (csrc/attention_kvquant.cpp)
- `sparse_attention` query-aware sparse attention (Quest pages or top-k keys) of rotated queries over a full
                  cache (csrc/attention_topk.cpp); `sparse_attend` the same after `attend`'s RoPE + KV write,
                  updating the page bounds; `decode_layer_sparse` the whole block with it (leanlm.attention.sparse)
- `rms_norm`, `residual_norm`, `glu`, `decode_layer`: a decoder block's glue, and the whole block in
  one call (csrc/fused_block.cpp); `decode_rows` the whole block for a batch of sequences at their own
  positions (continuous batching: the weights are read once for all of them)

`available()` says whether they built; without them (LEANLM_NATIVE=0, no AVX2, no compiler) the
runtime takes torch's ops, and `small_linear` returns None.

The fused-step protocol. model/fused.py runs a whole decoder block as one `decode_layer` call when
each of its four linears can say how the kernel should run it. A linear module does so by
implementing

    fused_linear_args(self, dtype: torch.dtype, rows: int) -> FusedLinear | None
    fused_state: tuple[str, ...]   # non-tensor attributes the answer depends on (class attribute)

`fused_linear_args` returns the kernel's arguments for inputs of up to `rows` rows in compute
dtype `dtype`, or None when this module must run its own forward (then the block runs the same
C++ glue between module calls). Each kind keeps the module's numerics. The fused step caches the
answer per layer and asks again when a module, parameter or buffer is replaced, when one of the
`fused_state` attributes is reassigned, when a hook is added or when a weight's layout changes.
Implemented by model.runtime.Linear (DENSE), quant.packed.QuantLinear (QUANT), quant.codebook.CodebookLinear
(CODEBOOK), quant.nm.NMInt8Linear (NM) and adaptive.sparsity.SparseInputLinear (SPARSE_INPUT). Caches follow a like
protocol, `fused_kv(dtype) -> (k, v) | None` (model.runtime.KVCache; a cache policy answers None), a quantized
cache `fused_store(dtype, start, rows, window) -> list | None` (decode_layer_kvquant's store arguments;
attention.policies.PolicyCache), and a cache with query-aware sparse attention
`fused_sparse(dtype) -> (k, v, kmin, kmax, mode, budget, page, sinks) | None` (attention.sparse.SparseCache),
which the step runs with `decode_layer_sparse`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from . import native

MAX_ROWS = 16  # rows per call the small-row kernels take (decode and speculative verification of <= 15 drafts)


class LinearKind(enum.IntEnum):
    """How decode_layer runs a linear (the codes of csrc/fused_block.cpp's LinearKind)."""

    DENSE = 0  # fp32/bf16 weight [N, K], row-major: small_linear
    QUANT = 1  # packed int4/int8 weight, bf16 scales (and zeros) [N, G]: q_linear
    SPARSE_INPUT = 2  # transposed weight [K, N]; inputs with |x| <= threshold dropped: sparse_linear (int8 codes:
    #                   fp32 per-output scales [N] and optional zeros [N])
    CODEBOOK = 3  # table indices, bf16 scales [N, G], the int8 table as `zeros`; bits 4: the int4 tiles and
    #               16 levels (q_linear_codebook); bits 3: the 3-bit tiles and 8 levels (q_linear_codebook3);
    #               bits 5 / 6: leanlm.quant.wide's tiles of signed integer codes (q_linear_wide; the table unread)
    NM = 4  # 2:4 sparse int8 (leanlm.quant.nm's tiles: kept values + position codes), bf16 scales [N, G]: q_linear_nm


_EMPTY = torch.empty(0)


@dataclass(frozen=True)
class FusedLinear:
    """One linear as the fused decode step hands it to the kernel (see the module docstring)."""

    kind: LinearKind
    weight: torch.Tensor  # DENSE: [N, K]; QUANT: packed codes; SPARSE_INPUT: W^T [K, N]
    bias: torch.Tensor | None = None
    scales: torch.Tensor | None = None  # QUANT; SPARSE_INPUT with int8 codes (fp32 [N])
    zeros: torch.Tensor | None = None  # QUANT, asymmetric only; CODEBOOK: the int8 table [2**bits]
    bits: int = 0  # QUANT: 4 or 8; CODEBOOK: 3, 4, 5 or 6
    group: int = 0  # QUANT: columns per scale group of the stored width
    threshold: float = 0.0  # SPARSE_INPUT

    def tensors(self) -> list[torch.Tensor]:
        """[weight, bias, scales, zeros], empty tensors where absent (decode_layer's `lins`)."""
        e = _EMPTY
        return [self.weight, e if self.bias is None else self.bias, e if self.scales is None else self.scales,
                e if self.zeros is None else self.zeros]  # fmt: skip

    def meta(self) -> list[int]:
        """[kind, bits, group] (decode_layer's `meta`)."""
        return [int(self.kind), self.bits, self.group]


def _lib():
    return native.extension()


def available() -> bool:
    """True when the compiled kernels are there (else callers use torch's ops)."""
    return _lib() is not None


def isa() -> str | None:
    """The ISA level the kernels were built for (native.LEVELS), None without them."""
    lib = _lib()
    return None if lib is None else lib.isa()


def _require():
    lib = _lib()
    if lib is None:
        from .errors import LeanlmError

        raise LeanlmError(f"leanlm's native kernels are unavailable ({native.status()['why']}); "
                          "check ops.available() first, or unset LEANLM_NATIVE=0 / install a C++ compiler")  # fmt: skip
    return lib


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [..., K] @ weight.T (+ bias), rounded to x's dtype, through the small-row kernel when it
    applies: at most MAX_ROWS rows, fp32/bf16 x, a row-major fp32/bf16 weight on CPU, no autograd.
    None otherwise (the caller uses F.linear)."""
    if x.device.type != "cpu" or x.dim() < 2 or weight.dim() != 2 or not weight.is_contiguous():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):  # the kernel has no backward
        return None
    rows = x.numel() // x.shape[-1]
    if not 1 <= rows <= MAX_ROWS or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if x.dtype not in (torch.float32, torch.bfloat16) or x.shape[-1] != weight.shape[1]:
        return None
    lib = _lib()
    if lib is None:
        return None
    y = lib.small_linear(x.reshape(rows, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def q_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
             group: int) -> torch.Tensor:  # fmt: skip
    """x [1..16, K] times a packed int4/int8 weight (leanlm.quant.packed's native layout) -> fp32 [M, N].
    scales/zeros: bf16 [N, G]; group: columns per group of the stored width (a multiple of 32)."""
    return _require().q_linear(x, qweight, scales, _EMPTY if zeros is None else zeros, bits, group)


def q_linear_nm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """x [1..16, K] times a 2:4 sparse int8 weight (leanlm.quant.nm's tiles: per 16 rows and 8 columns, the 4 kept
    values of each row and their position codes) -> fp32 [M, N]; equals q_linear on the same codes with the pruned
    ones stored, bit for bit. scales: bf16 [N, G]; group: columns per group of the stored width (a multiple of 32)."""
    return _require().q_linear_nm(x, qweight, scales, group)


def set_q_linear_nm_vnni(allowed: bool) -> bool:
    """Allow (True) or refuse q_linear_nm's AVX512-VNNI copy (the AVX2 one gives the same numbers); the old setting."""
    return _require().set_q_linear_nm_vnni(allowed)


def q_linear_codebook(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, table: torch.Tensor,
                      group: int) -> torch.Tensor:  # fmt: skip
    """x [1..16, K] times a 4-bit table-coded weight (leanlm.quant.codebook; indices into `table`, int8 [16], in
    q_linear's int4 tiles of 16 rows, leanlm.quant.packed.tile_codes; csrc/qlinear_codebook.cpp) -> fp32 [M, N].
    scales: bf16 [N, G]; group: columns per group of the stored width."""
    return _require().q_linear_codebook(x, qweight, scales, table, group)


def q_linear_codebook3(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, table: torch.Tensor,
                       group: int) -> torch.Tensor:  # fmt: skip
    """x [1..16, K] times a 3-bit table-coded weight (leanlm.quant.codebook.tile_codes3's tiles of 16 rows: per row
    and 32 columns 12 bytes, the low 2 bits of the indices into `table`, int8 [8], and their high bits;
    csrc/qlinear_codebook3.cpp) -> fp32 [M, N], with q_linear_codebook's numerics. scales: bf16 [N, G]; group: columns
    per group of the stored width."""
    return _require().q_linear_codebook3(x, qweight, scales, table, group)


def q_linear_wide(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
                  group: int) -> torch.Tensor:  # fmt: skip
    """x [1..16, K] times a 5-bit or 6-bit signed integer weight, W[n, k] = (c - 2**(bits-1)) * scales[n, g]
    (leanlm.quant.wide.tile_codes_wide's tiles of 16 rows: per 32 columns 320 / 384 bytes; csrc/qlinear_wide.cpp)
    -> fp32 [M, N], with q_linear's numerics (activations rounded to int8 per block of 32). scales: bf16 [N, G];
    group: columns per group of the stored width (a multiple of 32)."""
    return _require().q_linear_wide(x, qweight, scales, bits, group)


def set_q_linear_wide_vnni(allowed: bool) -> bool:
    """Allow (True) or refuse q_linear_wide's AVX512-VNNI copy (the AVX2 one gives the same numbers); the old
    setting."""
    return _require().set_q_linear_wide_vnni(allowed)


def codebook_search_scales(x: torch.Tensor, importance: torch.Tensor | None, levels: torch.Tensor,
                           tries: int) -> torch.Tensor:  # fmt: skip
    """Each group's least-error scale on a table grid (leanlm.quant.codebook.search_scales, in one pass per
    group): x fp32 [R, g] (groups), importance fp32 [G, g] (group r % G's input weights) or None, levels fp32 [L]
    (2 <= L <= 64 sorted integers) -> fp32 [R]."""
    imp = torch.empty(0) if importance is None else importance.float().contiguous()
    return _require().codebook_search_scales(x.float().contiguous(), imp, levels.float(), tries)


def q_gemm_usable() -> bool:
    """Can q_gemm run here (the kernels built, and the CPU has AVX512F/BW/VL + VNNI)?"""
    if "q_gemm" not in _gemm_state:
        lib = _lib()
        _gemm_state["q_gemm"] = lib is not None and bool(lib.q_gemm_supported())
    return _gemm_state["q_gemm"]


_gemm_state: dict = {}


def q_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
           group: int, bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """x [M, K] (fp32 or bf16) times a packed int4/int8 weight (q_linear's layout), + an fp32 bias -> [M, N] in x's
    dtype (fp32 sums, rounded once), for any number of rows, on int8 dot products (AVX512-VNNI; q_gemm_usable)
    with x quantized per block of 32 as q_linear does (csrc/gemm_int8.cpp). Not batch-invariant with q_linear:
    products of <= MAX_ROWS rows keep q_linear."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    return _require().q_gemm(x, qweight, scales, _EMPTY if zeros is None else zeros,
                             _EMPTY if bias is None else bias, bits, group)  # fmt: skip


def prefill_attention_usable() -> bool:
    """Can prefill_attention run here (the kernels built, and the CPU has AVX512F/BW/VL/DQ)?"""
    if "attn" not in _gemm_state:
        lib = _lib()
        _gemm_state["attn"] = lib is not None and bool(lib.prefill_attention_supported())
    return _gemm_state["attn"]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int,
                      window: int) -> torch.Tensor:  # fmt: skip
    """Causal attention of q [B, nh, T, hd] (positions start..start+T-1) over k / v [B, nkv, S, hd] (fp32 or bf16,
    GQA by nh / nkv; windowed when window > 0) -> [B, T, nh * hd] in q's dtype (csrc/attention_prefill.cpp)."""
    return _require().prefill_attention(q, k, v, scale, start, window)


def glu_rows(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """act(gate) * up of a contiguous fp32/bf16 gate_up [B, 2F] (F % 16 == 0), many rows, AVX-512
    (prefill_attention_usable; csrc/prefill_glue.cpp)."""
    return _require().glu_rows(gate_up, gelu)


def norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool, bf16: bool) -> torch.Tensor:
    """RMSNorm of contiguous fp32 rows x [B, D] (D % 16 == 0), many rows, AVX-512, written in bf16 or fp32
    (prefill_attention_usable; csrc/prefill_glue.cpp)."""
    return _require().norm_rows(x, weight, eps, plus_one, bf16)


def sparse_usable(wt: torch.Tensor) -> bool:
    """Can sparse_linear run on this transposed weight [K, N] (fp32, bf16, or int8 codes)?"""
    return (wt.device.type == "cpu" and wt.dtype in (torch.float32, torch.bfloat16, torch.int8) and wt.dim() == 2
            and wt.shape[1] % 8 == 0 and wt.is_contiguous() and available())  # fmt: skip


def sparse_linear(x: torch.Tensor, wt: torch.Tensor, threshold: float, scales: torch.Tensor | None = None,
                  zeros: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:  # fmt: skip
    """(x * (|x| > threshold)) @ wt for x [M, K] (or [K]) and wt = W^T [K, N] (sparse_usable):
    (fp32 [M, N], the number of active inputs summed over the rows). An int8 wt holds codes of a per-output-channel
    grid: the product is then scaled by `scales` (fp32 [N]) and, asymmetric, gets zeros [N] * (sum of the active x):
    y = s * (x_active @ q) + z * sum(x_active), accumulated in fp32."""
    e = _EMPTY
    return _require().sparse_linear(x, wt, threshold, e if scales is None else scales, e if zeros is None else zeros)


def set_sparse_avx512(allowed: bool) -> bool:
    """Allow (True) or refuse the int8 sparse_linear's AVX-512 copy (the AVX2 one gives the same numbers); the old
    setting."""
    return _require().set_sparse_avx512(allowed)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool, bf16: bool) -> torch.Tensor:
    """RMSNorm of contiguous fp32 rows x [B, D] (Gemma's (1 + w) when plus_one), written in bf16 or fp32."""
    return _require().rms_norm(x, weight, eps, plus_one, bf16)


def residual_norm(x: torch.Tensor, h: torch.Tensor, post: torch.Tensor | None, next_weight: torch.Tensor | None,
                  eps: float, plus_one: bool) -> torch.Tensor:  # fmt: skip
    """x (fp32 [B, D]) += post_norm(h) (or h) in place; returns the next RMSNorm of x (next_weight),
    in h's dtype, or an empty tensor when next_weight is None."""
    return _require().residual_norm(x, h, post, next_weight, eps, plus_one)


def attend(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, cache_k: torch.Tensor,
           cache_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int, n_heads: int, n_kv_heads: int,
           window: int, eps: float, plus_one: bool, scale: float) -> torch.Tensor:  # fmt: skip
    """New positions pos..pos+T-1 of qkv [B, T, (nh + 2 nkv) * hd]: (QK-norm +) RoPE (cos / signed sin
    [T, hd]), K/V written to the caches [B, nkv, L, hd], causal attention (windowed when window > 0)
    over the cache -> [B * T, nh * hd] in the cache dtype."""
    return _require().attend(qkv, q_norm, k_norm, cache_k, cache_v, cos, sin, pos, n_heads, n_kv_heads, window,
                             eps, plus_one, scale)  # fmt: skip


def attend_rows(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                cache_k: list[torch.Tensor], cache_v: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                positions: list[int], n_heads: int, n_kv_heads: int, window: int, eps: float, plus_one: bool,
                scale: float) -> torch.Tensor:  # fmt: skip
    """`attend` for B sequences, each with its own caches (cache_k[b], cache_v[b]: [1, nkv, L_b, hd]): the T new
    positions of qkv [B, T, row] start at positions[b] for sequence b; cos / signed sin [B*T, hd]. Each
    sequence's result equals `attend` of that sequence alone, bit for bit."""
    return _require().attend_rows(qkv, q_norm, k_norm, cache_k, cache_v, cos, sin, positions, n_heads, n_kv_heads,
                                  window, eps, plus_one, scale)  # fmt: skip


def attend_kvquant(q: torch.Tensor, store, pos: torch.Tensor, n: int, start: int, scale: float, window: int = 0,
                   k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None, sinks: int = 0,
                   ring: int = -1) -> torch.Tensor:  # fmt: skip
    """Attention of q [B, H, T, D] (fp32/bf16, positions start..start+T-1; GQA by H / Hkv) over the slots [0, n) of an
    int8/int4 `store` (a leanlm.attention.kv_quant.KVStore, read as stored; an unquantized one in q's dtype too) and
    the not yet stored k_new / v_new [B, Hkv, Tn, D] in q's dtype at positions start..start+Tn-1 -> [B, H, T, D] in
    q's dtype.
    pos int32 [B, 1 or Hkv, S]: each slot's original position (-1 = empty). A key at position p is visible to the
    query at qpos when 0 <= p <= qpos, p > qpos - window (window > 0), and p < sinks or p >= start - ring
    (ring >= 0: a sinks + window policy). fp32 accumulation (csrc/attention_kvquant.cpp)."""
    kv = store
    bufs, bits, group = kv.kernel_buffers()
    e = _EMPTY if k_new is None else k_new
    return _require().attend_kvquant(q, *bufs[:3], *bufs[3:], pos, n, e, _EMPTY if v_new is None else v_new, start,
                                     bits, group, window, sinks, ring, scale)  # fmt: skip
def sparse_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, kmin: torch.Tensor,
                     kmax: torch.Tensor, pos: int, window: int, scale: float, mode: int, budget: int, page: int,
                     sinks: int) -> torch.Tensor:  # fmt: skip
    """Rotated queries q [B, nh, T, hd] at positions pos.. over the caches [B, nkv, L, hd] (already holding their
    keys; causal, windowed when window > 0), each query over the keys it selects per kv group -> [B * T, nh * hd].
    mode 0 (Quest): the `budget` pages of `page` keys with the highest bound sum_d max(q_d kmin_d, q_d kmax_d)
    (kmin / kmax: fp32 [B, nkv, pages, hd]), always with the first `sinks` pages and the newest one; mode 1
    (top-k): the `budget` keys with the best logit (kmin / kmax unused: empty tensors)."""
    return _require().sparse_attention(q, cache_k, cache_v, kmin, kmax, pos, window, scale, mode, budget, page, sinks)


def sparse_attend(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, cache_k: torch.Tensor,
                  cache_v: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  pos: int, n_heads: int, n_kv_heads: int, window: int, eps: float, plus_one: bool, scale: float,
                  mode: int, budget: int, page: int, sinks: int) -> torch.Tensor:  # fmt: skip
    """`attend`'s RoPE and K/V write, the page bounds of the written positions recomputed (Quest), then
    `sparse_attention` -> [B * T, nh * hd]."""
    return _require().sparse_attend(qkv, q_norm, k_norm, cache_k, cache_v, kmin, kmax, cos, sin, pos, n_heads,
                                    n_kv_heads, window, eps, plus_one, scale, mode, budget, page, sinks)  # fmt: skip


def decode_layer_sparse(x: torch.Tensor, attn_norm: torch.Tensor, lins: list[torch.Tensor], meta: list[int],
                        thresholds: list[float], q_norm, k_norm, attn_post, mlp_norm: torch.Tensor, mlp_post,
                        cache_k: torch.Tensor, cache_v: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, pos: int, batch: int, n_heads: int, n_kv_heads: int,
                        window: int, eps: float, plus_one: bool, scale: float, gelu: bool, mode: int, budget: int,
                        page: int, sinks: int) -> torch.Tensor:  # fmt: skip
    """`decode_layer` with `sparse_attend` as its attention (the cache's bounds and selection after `gelu`)."""
    return _require().decode_layer_sparse(x, attn_norm, lins, meta, thresholds, q_norm, k_norm, attn_post, mlp_norm,
                                          mlp_post, cache_k, cache_v, kmin, kmax, cos, sin, pos, batch, n_heads,
                                          n_kv_heads, window, eps, plus_one, scale, gelu, mode, budget, page, sinks)


def glu(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """act(gate) * up of a fused gate/up output [B, 2F] -> [B, F]: SiLU, or GELU-tanh (Gemma)."""
    return _require().glu(gate_up, gelu)


def decode_layer(x: torch.Tensor, attn_norm: torch.Tensor, lins: list[torch.Tensor], meta: list[int],
                 thresholds: list[float], q_norm, k_norm, attn_post, mlp_norm: torch.Tensor, mlp_post,
                 cache_k: torch.Tensor, cache_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int, batch: int,
                 n_heads: int, n_kv_heads: int, window: int, eps: float, plus_one: bool, scale: float,
                 gelu: bool) -> torch.Tensor:  # fmt: skip
    """A whole decoder block for the rows x [B*T, D] (fp32 residual, updated in place and returned).
    lins / meta / thresholds: the block's four linears (wqkv, wo, w_gate_up, w_down) as `block_args`
    lays out their FusedLinear; the norms' weights (None where the block has no such norm); the
    rest as `attend` takes it, and gelu for GELU-tanh (else SiLU)."""
    return _require().decode_layer(x, attn_norm, lins, meta, thresholds, q_norm, k_norm, attn_post, mlp_norm,
                                   mlp_post, cache_k, cache_v, cos, sin, pos, batch, n_heads, n_kv_heads, window, eps,
                                   plus_one, scale, gelu)  # fmt: skip


def decode_layer_kvquant(x: torch.Tensor, attn_norm: torch.Tensor, lins: list[torch.Tensor], meta: list[int],
                         thresholds: list[float], q_norm, k_norm, attn_post, mlp_norm: torch.Tensor, mlp_post,
                         store: list[torch.Tensor], pos: torch.Tensor, slots: list[int], n: int, store_first: bool,
                         sinks: int, ring: int, bits: int, group: int, cos: torch.Tensor, sin: torch.Tensor, start: int,
                         batch: int, n_heads: int, n_kv_heads: int, window: int, eps: float, plus_one: bool,
                         scale: float, gelu: bool) -> torch.Tensor:  # fmt: skip
    """`decode_layer` with its attention over an int8/int4 KV store (store = [kq, ks, kz, vq, vs, vz] of a
    leanlm.attention.kv_quant.KVStore, kz / vz empty for int8): the new keys / values are quantized into `slots`
    (one per new position, -1 = not kept; their positions written to pos) before the attention over the slots
    [0, n) when store_first, else after it (the new rows then attend in the compute dtype); masks as
    attend_kvquant. The PolicyCache answers these arguments (fused_store)."""
    return _require().decode_layer_kvquant(x, attn_norm, lins, meta, thresholds, q_norm, k_norm, attn_post, mlp_norm,
                                           mlp_post, store, pos, slots, n, store_first, sinks, ring, bits, group, cos,
                                           sin, start, batch, n_heads, n_kv_heads, window, eps, plus_one, scale,
                                           gelu)  # fmt: skip


def decode_rows(x: torch.Tensor, attn_norm: torch.Tensor, lins: list[torch.Tensor], meta: list[int],
                thresholds: list[float], q_norm, k_norm, attn_post, mlp_norm: torch.Tensor, mlp_post,
                cache_k: list[torch.Tensor], cache_v: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                positions: list[int], n_heads: int, n_kv_heads: int, window: int, eps: float, plus_one: bool,
                scale: float, gelu: bool) -> torch.Tensor:  # fmt: skip
    """`decode_layer` for B <= MAX_ROWS sequences, one new token each: x [B, D] (row b: sequence b at
    positions[b], its caches cache_k[b] / cache_v[b]), cos / sin [B, hd]; the rest as decode_layer takes it."""
    return _require().decode_rows(x, attn_norm, lins, meta, thresholds, q_norm, k_norm, attn_post, mlp_norm, mlp_post,
                                  cache_k, cache_v, cos, sin, positions, n_heads, n_kv_heads, window, eps, plus_one,
                                  scale, gelu)  # fmt: skip


def block_args(linears: list[FusedLinear]) -> tuple[list[torch.Tensor], list[int], list[float]]:
    """decode_layer's (lins, meta, thresholds) for a block's four linears."""
    lins, meta, thr = [], [], []
    for fl in linears:
        lins += fl.tensors()
        meta += fl.meta()
        thr.append(float(fl.threshold))
    return lins, meta, thr
