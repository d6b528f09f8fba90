"""Activation sparsity over int8 per-channel weights: ops.sparse_linear's int8 sweep (csrc/sparse.cpp) against the
dense product of the masked input, and SparseInputQuantLinear end to end on a tiny int8 model (module path, fused
whole-block call, multi-row scoring)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import decode_logits

from leanlm import ops
from leanlm.adaptive import ActivationSparsity, apply_activation_sparsity
from leanlm.adaptive.sparsity import SparseInputQuantLinear, int8_channel
from leanlm.errors import LeanlmError
from leanlm.model import fused, load_model
from leanlm.quant import RTN, quantize
from leanlm.quant.packed import QuantLinear
from leanlm.quant.rtn import QSpec, rtn

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C++ compiler for the native kernels")


def _codes(K, N, seed=0, symmetric=True):
    g = torch.Generator().manual_seed(seed)
    qw = rtn(torch.randn(N, K, generator=g), QSpec(8, 0, symmetric))
    ql = QuantLinear(qw)
    wt = (qw.q[:, :K].to(torch.int16) - 128).to(torch.int8).t().contiguous()  # [K, N] as stored
    s = qw.scale.float().view(-1)
    z = None if qw.zero is None else qw.zero.float().view(-1)
    return ql, wt, s, z


def _reference(x, wt, s, z, t):
    """s * (x_kept @ q) + z * sum(x_kept), in float64."""
    xm = (x * (x.abs() > t)).double()
    y = (xm @ wt.double()) * s.double()
    return y if z is None else y + xm.sum(-1, keepdim=True) * z.double()


# shapes: N under and over the AVX-512 copy's 2048 columns, N % 64 != 0 (the 8-column tail), K not a multiple of 8
@pytest.mark.parametrize("K,N", [(896, 1152), (300, 2112), (77, 40), (64, 4104)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_sweep_equals_dense_product_of_masked_input(K, N, symmetric):
    _, wt, s, z = _codes(K, N, symmetric=symmetric)
    g = torch.Generator().manual_seed(1)
    for x in (torch.randn(1, K, generator=g), torch.randn(3, K, generator=g).to(torch.bfloat16)):
        t = float(x.float().abs().median())
        y, active = ops.sparse_linear(x, wt, t, s, z)
        assert active == int((x.float().abs() > t).sum())
        ref = _reference(x.float(), wt, s, z, t)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_int8_threshold_below_zero_keeps_every_input_and_matches_quantlinear():
    """threshold -1 (sparsity 0): every input active, the dense int8 product; the QuantLinear's q_linear
    (activations rounded to int8 per 32) agrees to its own rounding."""
    K, N = 512, 256
    ql, wt, s, z = _codes(K, N)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(2))
    y, active = ops.sparse_linear(x, wt, -1.0, s, z)
    assert active == K
    torch.testing.assert_close(y.double(), _reference(x, wt, s, z, -1.0), rtol=1e-5, atol=1e-4)
    dense = ql(x).double()
    assert float((y.double() - dense).abs().max()) < 0.02 * float(dense.abs().max())
    x[0, :7] = 0.0  # threshold 0 drops exact zeros only
    assert ops.sparse_linear(x, wt, 0.0, s, z)[1] == int((x != 0).sum())


def test_int8_avx2_and_avx512_copies_agree_bit_for_bit():
    _, wt, s, z = _codes(1000, 960)  # under 2048 columns: the AVX-512 copy where the CPU has it
    x = torch.randn(2, 1000, generator=torch.Generator().manual_seed(3))
    y512 = ops.sparse_linear(x, wt, 0.4, s, z)[0]
    old = ops.set_sparse_avx512(False)
    try:
        y2 = ops.sparse_linear(x, wt, 0.4, s, z)[0]
    finally:
        ops.set_sparse_avx512(old)
    assert torch.equal(y512, y2)


def test_int8_threads_split_the_rows_and_agree_to_rounding():
    _, wt, s, z = _codes(2048, 512)
    x = torch.randn(1, 2048, generator=torch.Generator().manual_seed(4))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = ops.sparse_linear(x, wt, 0.3, s, z)[0]
        torch.set_num_threads(2)
        y2 = ops.sparse_linear(x, wt, 0.3, s, z)[0]
    finally:
        torch.set_num_threads(old)
    ref = _reference(x, wt, s, z, 0.3)
    for y in (y1, y2):  # each thread sums its share of the rows; the shares are added in thread order
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("kernel", ["native", "dense"])
def test_sparse_quant_linear_module(kernel):
    K, N = 160, 96
    ql, wt, s, z = _codes(K, N)
    ql.bias = torch.randn(N)
    lin = SparseInputQuantLinear(ql, 0.6, kernel)
    g = torch.Generator().manual_seed(5)
    for x in (torch.randn(1, 1, K, generator=g), torch.randn(2, 5, K, generator=g)):
        ref = _reference(x.reshape(-1, K), wt, s, z, 0.6).view(*x.shape[:-1], N) + ql.bias.double()
        y = lin(x).double()
        if kernel == "native":
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
        else:  # q_linear rounds the activations to int8 per block of 32
            assert float((y - ref).abs().max()) < 0.02 * float(ref.abs().max())
    x = torch.randn(1, 1, K, generator=g)
    lin(x)
    assert float(lin.last_flops) == pytest.approx(float((x.abs() > 0.6).sum()) * 2 * N)


@pytest.fixture(scope="module")
def int8_model(tiny_dirs):
    """int8 RTN per channel computing in fp32 (bf16 would round the Python and C++ paths apart, and the thresholds
    then drop a few different inputs)"""
    model = load_model(tiny_dirs["llama"])
    quantize(model, RTN(bits=8, group=0, symmetric=True, dtype="float32"), progress=False)
    return model


def _calib():
    return torch.randint(3, 97, (4, 32), generator=torch.Generator().manual_seed(1))


def test_int8_model_runs_sparse_inside_the_whole_block_call(int8_model, monkeypatch):
    """An int8 model made input-sparse: every block decodes in one C++ call (the int8 sweep inside) and equals the
    glue path that calls each module; decode steps match the multi-row (dequantized, masked) scoring path."""
    model = copy.deepcopy(int8_model)
    assert int8_channel(model.layers[0].mlp.w_down)
    rep = apply_activation_sparsity(model, ActivationSparsity(0.5, ("mlp", "attn"), kernel="native"), _calib(),
                                    progress=False)  # fmt: skip
    mods = [m for ly in model.layers for m in (ly.attn.wqkv, ly.attn.wo, ly.mlp.w_gate_up, ly.mlp.w_down)]
    assert all(isinstance(m, SparseInputQuantLinear) and m.weight.dtype == torch.int8 for m in mods)
    assert all(th["mlp.w_down"] > 0 for th in rep["thresholds"])
    calls = []
    decode_layer = ops.decode_layer
    monkeypatch.setattr(ops, "decode_layer", lambda *a: calls.append(1) or decode_layer(*a))
    tokens = torch.randint(0, 97, (1, 26), generator=torch.Generator().manual_seed(7))
    layer_plan = fused._layer_plan

    def decode(whole_block: bool):
        for layer in model.layers:
            layer.__dict__.pop("_fused_plan", None)
        if not whole_block:
            monkeypatch.setattr(fused, "_layer_plan", lambda *a, **k: None)
        out = decode_logits(model, tokens, True, prompt=18)
        monkeypatch.setattr(fused, "_layer_plan", layer_plan)
        return out

    glue = decode(False)
    assert not calls
    whole = decode(True)
    assert len(calls) == 8 * len(model.layers)
    assert torch.equal(whole, glue)
    python = decode_logits(model, tokens, False, prompt=18)  # the Python block, each module's own forward
    torch.testing.assert_close(whole, python, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        scored = model(tokens)[:, 18:]  # multi-row: the masked input times the dequantized codes, one GEMM
    torch.testing.assert_close(whole, scored, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(whole, decode_logits(int8_model, tokens, True, prompt=18), atol=1e-2)


def test_int8_sparsity_zero_is_the_int8_product(int8_model):
    """Sparsity 0 keeps every input: decode logits equal those of the same codes dequantized into float linears."""
    from leanlm.adaptive.sparsity import SparseInputLinear
    from leanlm.calibration import get_module, set_module

    model = copy.deepcopy(int8_model)
    rep = apply_activation_sparsity(model, ActivationSparsity(0.0, ("mlp", "attn"), kernel="native"), _calib(),
                                    progress=False)  # fmt: skip
    assert all(t < 0 for th in rep["thresholds"] for t in th.values())
    ref = copy.deepcopy(int8_model)
    for layer in ref.layers:
        for n in ("attn.wqkv", "attn.wo", "mlp.w_gate_up", "mlp.w_down"):
            q = get_module(layer, n)
            set_module(layer, n, SparseInputLinear(q.dequantize(), q.bias, -1.0, "dense"))  # float, nothing dropped
    tokens = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(8))
    got, want = (decode_logits(m, tokens, True, prompt=12) for m in (model, ref))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_auto_picks_a_timed_kernel_and_other_grids_are_refused(tiny_dirs, int8_model):
    model = copy.deepcopy(int8_model)
    rep = apply_activation_sparsity(model, ActivationSparsity(0.5), _calib(), progress=False)
    assert rep["kernels"]
    assert all(k.endswith("int8") and set(v["us"]) <= {"native", "dense"} for k, v in rep["kernels"].items())
    with pytest.raises(LeanlmError, match="kernel"):
        apply_activation_sparsity(copy.deepcopy(int8_model), ActivationSparsity(0.5, kernel="bag"), _calib(),
                                  progress=False)  # fmt: skip
    with pytest.raises(LeanlmError, match="wina"):
        apply_activation_sparsity(copy.deepcopy(int8_model), ActivationSparsity(0.5, criterion="wina"), _calib(),
                                  progress=False)  # fmt: skip
    m4 = load_model(tiny_dirs["llama"], dtype="bfloat16")
    quantize(m4, RTN(bits=4, group=32), progress=False)
    with pytest.raises(LeanlmError, match="int8 per-channel"):
        apply_activation_sparsity(m4, ActivationSparsity(0.5), _calib(), progress=False)
