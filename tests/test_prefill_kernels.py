"""Prefill's kernels: the native int8 GEMM for packed low-bit weights (csrc/gemm_int8.cpp, ops.q_gemm) against
a float reference, QuantLinear's choice of path by row count (products of <= 16 rows stay on q_linear and
batch-invariant), and the bf16 GEMM switch (native.bf16_matmul)."""

import pytest
import torch

from leanlm import native, ops
from leanlm.errors import LeanlmError
from leanlm.model import runtime
from leanlm.quant import QSpec, QuantLinear
from leanlm.quant.rtn import rtn

needs_gemm = pytest.mark.skipif(not ops.q_gemm_usable(), reason="the int8 GEMM needs AVX512-VNNI and the native build")

SPECS = [QSpec(8, 0, True), QSpec(4, 128, True), QSpec(4, 128, False), QSpec(4, 0, True), QSpec(8, 64, False),
         QSpec(4, 32, False)]  # fmt: skip


def quantized_activations(x: torch.Tensor, K: int) -> torch.Tensor:
    """x as the kernels see it: per row, per block of 32, rne(x * 127 / amax) * amax / 127 (fp32 arithmetic)."""
    Kp = -(-K // 32) * 32
    xb = torch.nn.functional.pad(x, (0, Kp - K)).view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127.0)).view(x.shape[0], Kp)[:, :K]


@needs_gemm
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
@pytest.mark.parametrize("shape", [(37, 70, 200), (64, 96, 576), (5, 33, 1536)], ids=lambda s: "x".join(map(str, s)))
def test_q_gemm_matches_float_reference(spec, shape):
    """Exact integer sums + fp32 scaling: equal to the dequantized weight times the quantized activations up to
    float rounding (odd M, N and K: row, panel and block tails)."""
    M, N, K = shape
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.05
    m = QuantLinear(rtn(w, spec), None, backend="native")
    assert m.backend == "native"
    x = torch.randn(M, K)
    x[:, 3] *= 30  # an outlier channel: its blocks get coarser scales, as in real activations
    wd = m.dequantize().double()
    if m.zeros is None:
        ref = (quantized_activations(x, K).double() @ wd.t()).float()
    else:  # the zero point multiplies the unrounded activations' sum (as q_linear does)
        z = m.zeros.double().repeat_interleave(m.kgroup, 1)[:, :K]
        ref = (quantized_activations(x, K).double() @ (wd - z).t() + x.double() @ z.t()).float()
    y = ops.q_gemm(x, m.qweight, m.scales, m.zeros, spec.bits, m.kgroup)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    # the same quantization as the small-row kernel: the two agree to float rounding
    small = torch.cat([ops.q_linear(x[i : i + 16], m.qweight, m.scales, m.zeros, spec.bits, m.kgroup)
                       for i in range(0, M, 16)])  # fmt: skip
    assert (y - small).abs().max() <= 1e-5 * small.abs().max()


@needs_gemm
def test_q_gemm_rows_do_not_depend_on_the_call():
    """A row's output is the same whichever rows share the call (the float sums run in a fixed order per output)."""
    torch.manual_seed(2)
    m = QuantLinear(rtn(torch.randn(96, 576) * 0.05, QSpec(4, 128, False)), None, backend="native")
    x = torch.randn(40, 576)
    full = ops.q_gemm(x, m.qweight, m.scales, m.zeros, 4, m.kgroup)
    part = ops.q_gemm(x[13:30], m.qweight, m.scales, m.zeros, 4, m.kgroup)
    assert torch.equal(full[13:30], part)


@needs_gemm
def test_q_gemm_bf16_io_and_bias():
    """bf16 x is read as is and the output (+ fp32 bias) rounded once to bf16: equal to the fp32 call rounded."""
    torch.manual_seed(6)
    m = QuantLinear(rtn(torch.randn(70, 200) * 0.05, QSpec(8, 0, True)), torch.randn(70), backend="native")
    x = torch.randn(23, 200).to(torch.bfloat16)
    y = ops.q_gemm(x, m.qweight, m.scales, m.zeros, 8, m.kgroup, m.bias)
    y32 = ops.q_gemm(x.float(), m.qweight, m.scales, m.zeros, 8, m.kgroup, m.bias)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y32.to(torch.bfloat16))
    assert torch.equal(y32, ops.q_gemm(x.float(), m.qweight, m.scales, m.zeros, 8, m.kgroup) + m.bias)


@pytest.mark.skipif(not ops.available(), reason="no native kernels")
@pytest.mark.parametrize("spec", [QSpec(8, 0, True), QSpec(4, 128, False)], ids=lambda s: s.label())
def test_quantlinear_paths_by_rows(spec, monkeypatch):
    """<= 16 rows: q_linear, batch-invariant (k rows == k one-row calls bit for bit); more rows: q_gemm where the
    CPU has VNNI, else dequantize + fp32 GEMM; int8_gemm=False forces the latter (A/B)."""
    torch.manual_seed(3)
    w, b = torch.randn(96, 576) * 0.05, torch.randn(96)
    m = QuantLinear(rtn(w, spec), b, backend="native")
    x = torch.randn(40, 576)
    with torch.inference_mode():
        many = m(x[:16])
        for i in range(16):
            assert torch.equal(m(x[i : i + 1]), many[i : i + 1])
        assert torch.equal(many, ops.q_linear(x[:16], m.qweight, m.scales, m.zeros, spec.bits, m.kgroup) + b)
        y = m(x)
        if ops.q_gemm_usable():
            assert torch.equal(y, ops.q_gemm(x, m.qweight, m.scales, m.zeros, spec.bits, m.kgroup) + b)
        monkeypatch.setattr(QuantLinear, "int8_gemm", False)
        dense = m(x)
        assert torch.allclose(dense, x @ m.dequantize().t() + b, rtol=1e-4, atol=1e-4)
        assert (y - dense).abs().max() < 2e-2 * dense.abs().max()  # activation rounding only


def test_gemm_skipped_under_autograd():
    m = QuantLinear(rtn(torch.randn(64, 64) * 0.05, QSpec(8, 0, True)), None, backend="native")
    x = torch.randn(20, 64, requires_grad=True)
    assert not m._gemm_ok(x)
    m(x).sum().backward()  # the dequantize path has a backward
    assert x.grad is not None


def test_bf16_gemm_switch(monkeypatch):
    """bf16 multi-row products stay bf16 where native.bf16_matmul says the CPU has bf16 dot products; fp16
    and CPUs without them widen to fp32; one-row products never widen."""
    monkeypatch.setitem(native._state, "bf16", True)
    x16 = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert not runtime.upcast_for_matmul(x16)
    assert runtime.upcast_for_matmul(x16.half())
    monkeypatch.setitem(native._state, "bf16", False)
    assert runtime.upcast_for_matmul(x16) and not runtime.upcast_for_matmul(x16[:1])
    monkeypatch.delitem(native._state, "bf16")
    monkeypatch.setenv("LEANLM_BF16_GEMM", "0")
    assert native.bf16_matmul() is False
    monkeypatch.delitem(native._state, "bf16")
    monkeypatch.setenv("LEANLM_BF16_GEMM", "yes")
    with pytest.raises(LeanlmError, match="LEANLM_BF16_GEMM"):
        native.bf16_matmul()
    monkeypatch.delitem(native._state, "bf16", raising=False)
    monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2", "fma", "avx512f", "avx512_vnni"})  # VNNI, no bf16
    monkeypatch.delenv("LEANLM_BF16_GEMM")
    assert native.bf16_matmul() is False
    monkeypatch.delitem(native._state, "bf16")


def test_bf16_linear_keeps_bf16_and_matches_fp32(monkeypatch):
    torch.manual_seed(4)
    lin = runtime.Linear(96, 64, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 40, 96).to(torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    for fast in (True, False):
        monkeypatch.setitem(native._state, "bf16", fast)
        y = lin(x)
        assert y.dtype == torch.bfloat16 and (y.float() - ref).abs().max() < 2e-2 * ref.abs().max()


needs_attn = pytest.mark.skipif(not ops.prefill_attention_usable(), reason="prefill attention needs AVX-512")


@needs_attn
@pytest.mark.parametrize("case", [(1, 9, 3, 512, 512, 64, 0, 0), (2, 4, 2, 37, 37, 64, 0, 0), (1, 4, 1, 20, 50, 128, 30, 0),
                                  (1, 4, 2, 100, 100, 64, 0, 16), (1, 2, 2, 17, 40, 32, 23, 5)],
                         ids=lambda c: "B{}_h{}_kv{}_T{}_S{}_d{}_start{}_win{}".format(*c))  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_attention_matches_sdpa(case, dtype):
    """Causal (and windowed) GQA attention from position `start`, strided q as the runtime passes it."""
    B, nh, nkv, T, S, hd, start, window = case
    torch.manual_seed(5)
    q = torch.randn(B, T, nh, hd).transpose(1, 2).to(dtype)
    k, v = torch.randn(B, nkv, S, hd).to(dtype), torch.randn(B, nkv, S, hd).to(dtype)
    mask = runtime.attention_mask(start, T, S, window or None, "cpu")
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                           scale=0.125, enable_gqa=True)  # fmt: skip
    y = ops.prefill_attention(q, k, v, 0.125, start, window)
    assert y.dtype == dtype and y.shape == (B, T, nh * hd)
    tol = 2e-6 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    assert (y.float() - ref.transpose(1, 2).reshape(B, T, -1)).abs().max() < tol * 4


@needs_attn
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_runtime_attention_takes_the_kernel_for_prefill_only(monkeypatch, tmp_path, arch):
    """More than MAX_ROWS new positions: the native kernel (same logits as SDPA to fp32 rounding); a 16-row
    forward keeps SDPA (the small-row path is untouched). Gemma-3: sliding-window layers and QK-norm."""
    from conftest import tiny_hf_config
    from transformers import AutoModelForCausalLM

    from leanlm.model import load_model

    cfg = tiny_hf_config(arch)
    cfg.head_dim = 16  # the kernel takes head_dim % 16 == 0 (the tiny models' 8 stays on SDPA)
    if arch == "gemma3":
        cfg.sliding_window = 24  # shorter than the prompt, so the window masks keys
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path, dtype=torch.float32)
    assert model.layers[0].attn.head_dim == 16
    calls = []
    real = ops.prefill_attention
    monkeypatch.setattr(ops, "prefill_attention", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.inference_mode():
        fast = model(ids)
        assert calls and set(calls) == {40}
        calls.clear()
        monkeypatch.setattr(runtime.Attention, "native_prefill", False)
        ref = model(ids)
        assert not calls
        monkeypatch.setattr(runtime.Attention, "native_prefill", True)
        model(ids[:, :16])
        assert not calls
    assert (fast - ref).abs().max() < 1e-4 * ref.abs().max()


@needs_attn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gelu", [False, True], ids=["silu", "gelu_tanh"])
def test_glu_rows_matches_torch(dtype, gelu):
    torch.manual_seed(7)
    gu = (torch.randn(40, 96) * 3).to(dtype)
    g, u = gu[:, :48], gu[:, 48:]
    act = torch.nn.functional.gelu(g, approximate="tanh") if gelu else torch.nn.functional.silu(g)
    ref = act * u
    y = ops.glu_rows(gu, gelu)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and ((y.float() - ref.float()).abs() <= tol * (1 + ref.float().abs())).all()


@needs_attn
@pytest.mark.parametrize("plus_one", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_rows_matches_runtime_norm(plus_one, dtype, monkeypatch):
    """The prefill norm (> MAX_ROWS rows) against the Python path's fp32 math; <= MAX_ROWS rows keep the latter."""
    torch.manual_seed(8)
    norm = runtime.RMSNorm(64, 1e-6, plus_one)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 20, 64) * 5
    calls = []
    real = ops.norm_rows
    monkeypatch.setattr(ops, "norm_rows", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        y = norm(x, dtype)
        assert calls
        monkeypatch.setattr(runtime.Attention, "native_prefill", False)
        ref = norm(x, dtype)
        monkeypatch.setattr(runtime.Attention, "native_prefill", True)
        calls.clear()
        assert torch.equal(norm(x[:, :8], dtype), ref[:, :8]) and not calls  # 16 rows: the Python path
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert y.dtype == dtype and ((y.float() - ref.float()).abs() <= tol * (1 + ref.float().abs())).all()


def test_prefill_without_avx512_takes_the_portable_paths(monkeypatch, tmp_path):
    """An AVX2-only CPU (no VNNI / AVX-512 / bf16 dot products): a quantized model's prefill dequantizes to the
    fp32 GEMM, attention runs on SDPA, the glue on ATen, bf16 widens to fp32; the kernels are never called."""
    from conftest import tiny_hf_config
    from transformers import AutoModelForCausalLM

    from leanlm.model import load_model
    from leanlm.quant import RTN, quantize

    cfg = tiny_hf_config("qwen2")  # q/k/v bias
    cfg.head_dim = 16
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path, safe_serialization=True)
    model = quantize(load_model(tmp_path, dtype=torch.float32), RTN(bits=4, group=32), progress=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.inference_mode():
        fast = model(ids)
    monkeypatch.setattr(ops, "_gemm_state", {"q_gemm": False, "attn": False})
    monkeypatch.setitem(native._state, "bf16", False)
    for name in ("q_gemm", "prefill_attention", "glu_rows", "norm_rows"):
        monkeypatch.setattr(ops, name, lambda *a, _n=name: pytest.fail(f"{_n} called without AVX-512"))
    with torch.inference_mode():
        portable = model(ids)
    assert (portable - fast).abs().max() < 0.05 * portable.abs().max()  # activation rounding and bf16 only
