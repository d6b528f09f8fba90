// leanlm's compiled kernels: every family in one translation unit (the fused block calls the others'
// inline helpers), bound for Python. Built by leanlm/native.py; wrapped and documented by leanlm/ops.py.
#include "leanlm.h"

#include "gemv_small.cpp"
#include "qlinear.cpp"
#include "qlinear_nm.cpp"
#include "qlinear_codebook.cpp"
#include "qlinear_codebook3.cpp"
#include "qlinear_wide.cpp"
#include "codebook_search.cpp"
#include "gemm_int8.cpp"
#include "sparse.cpp"
#include "attention.cpp"
#include "attention_prefill.cpp"
#include "prefill_glue.cpp"
#include "fused_block.cpp"
#include "attention_kvquant.cpp"  // after fused_block.cpp: its decode_layer_kvquant uses block()
#include "attention_topk.cpp"

// the ISA level this build was compiled for (native.py checks it against the level it asked for)
static std::string isa() {
#if defined(__AMX_TILE__)
  return "amx";
#elif defined(__AVX512BF16__)
  return "avx512_bf16";
#elif defined(__AVX512VNNI__)
  return "avx512_vnni";
#elif defined(__AVX512F__)
  return "avx512";
#else
  return "avx2";
#endif
}

// the decode step's kernels release the GIL while they run, so a server's event loop and tokenizer threads
// keep going during a step (they take tensors and return one: no Python inside)
using nogil = py::call_guard<py::gil_scoped_release>;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa, "the ISA level the extension was compiled for");
  m.def("small_linear", &small_linear, "x [1..16, K] . w [N, K]^T (+ b), fp32 accumulation (gemv_small.cpp)", nogil());
  m.def("set_small_bf16", &set_small_bf16, "allow (True) or refuse small_linear's bf16 dot-product path; returns the old setting");
  m.def("q_linear", &q_linear, "x [1..16, K] . packed int4/int8 W^T -> fp32 [M, N] (qlinear.cpp)", nogil());
  m.def("set_q_linear_vnni", &set_q_linear_vnni, "allow (True) or refuse q_linear's VNNI path; returns the old setting");
  m.def("q_linear_nm", &q_linear_nm, "x [1..16, K] . 2:4 sparse int8 W^T -> fp32 [M, N] (qlinear_nm.cpp)", nogil());
  m.def("set_q_linear_nm_vnni", &set_q_linear_nm_vnni, "allow (True) or refuse q_linear_nm's VNNI path; returns the old setting");
  m.def("q_linear_codebook", &q_linear_codebook, "x [1..16, K] . 4-bit table-coded W^T -> fp32 [M, N] (qlinear_codebook.cpp)", nogil());
  m.def("q_linear_codebook3", &q_linear_codebook3, "x [1..16, K] . 3-bit table-coded W^T -> fp32 [M, N] (qlinear_codebook3.cpp)", nogil());
  m.def("set_q_linear_codebook_vnni", &set_q_linear_codebook_vnni, "allow (True) or refuse the VNNI path of q_linear_codebook and q_linear_codebook3");
  m.def("set_q_linear_codebook_vbmi", &set_q_linear_codebook_vbmi, "allow (True) or refuse the VNNI + VBMI copy of q_linear_codebook (the plain VNNI copy instead)");
  m.def("q_linear_wide", &q_linear_wide, "x [1..16, K] . 5-bit / 6-bit signed-integer W^T -> fp32 [M, N] (qlinear_wide.cpp)", nogil());
  m.def("set_q_linear_wide_vnni", &set_q_linear_wide_vnni, "allow (True) or refuse q_linear_wide's VNNI path; returns the old setting");
  m.def("codebook_search_scales", &codebook_search_scales, "per-group scale search of a table grid of 2..64 levels (codebook_search.cpp)", nogil());
  m.def("q_gemm", &q_gemm, "x [M, K] . packed int4/int8 W^T -> fp32 [M, N] on AVX512-VNNI (gemm_int8.cpp)");
  m.def("q_gemm_supported", &q_gemm_supported, "does this CPU run q_gemm (AVX512F/BW/VL + VNNI)?");
  m.def("sparse_linear", &sparse_linear, "(x * (|x| > t)) . wt [K, N] (fp32/bf16, or int8 * scales) -> (fp32 [M, N], active inputs) (sparse.cpp)");
  m.def("set_sparse_avx512", &set_sparse_avx512, "allow (True) or refuse the int8 sparse_linear's AVX-512 copy; returns the old setting");
  m.def("attend", &attend, "RoPE + KV write + attention over the cache for 1..16 new positions (attention.cpp)", nogil());
  m.def("attend_kvquant", &attend_kvquant, "decode attention read straight from an int8/int4 KV store (attention_kvquant.cpp)", nogil());
  m.def("prefill_attention", &prefill_attention, "causal attention for many new positions, AVX-512 (attention_prefill.cpp)");
  m.def("prefill_attention_supported", &prefill_attention_supported, "does this CPU run prefill_attention (AVX-512)?");
  m.def("glu_rows", &glu_rows, "act(gate) * up for many rows, AVX-512 (prefill_glue.cpp)");
  m.def("norm_rows", &norm_rows, "RMSNorm of many fp32 rows, AVX-512 (prefill_glue.cpp)");
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 rows, written in bf16 or fp32 (fused_block.cpp)");
  m.def("residual_norm", &residual_norm, "x += post_norm(h); then the next norm of x (fused_block.cpp)");
  m.def("glu", &glu, "act(gate) * up of a fused gate/up output (fused_block.cpp)");
  m.def("attend_rows", &attend_rows, "attend for a batch of sequences, each with its own cache and position (attention.cpp)", nogil());
  m.def("decode_layer", &decode_layer, "one decoder block in one call (fused_block.cpp)", nogil());
  m.def("decode_layer_kvquant", &decode_layer_kvquant, "decode_layer over an int8/int4 KV store (attention_kvquant.cpp)", nogil());
  m.def("sparse_attention", &sparse_attention, "query-aware sparse attention of rotated queries over the cache (attention_topk.cpp)", nogil());
  m.def("sparse_attend", &sparse_attend, "attend with query-aware sparse attention and page bounds' update (attention_topk.cpp)", nogil());
  m.def("decode_layer_sparse", &decode_layer_sparse, "decode_layer with sparse_attend as its attention (attention_topk.cpp)", nogil());
  m.def("decode_rows", &decode_rows, "one decoder block for a batch of sequences at their own positions (fused_block.cpp)", nogil());
}
