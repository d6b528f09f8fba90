"""The cost model on hand-computed cases, plans, and the CLI."""

import json

import pytest
from conftest import make_tiny_hf

from leanlm import LeanlmError
from leanlm.hardware import HardwareProfile, Plan, estimate, forward_cost, load_profile
from leanlm.model.config import ModelConfig

HW = HardwareProfile("toy", mem_bw_gbs=100, peak_tflops={"fp32": 1.0, "bf16": 2.0}, mem_gb=1,
                     bw_efficiency=1.0, compute_efficiency=1.0)  # fmt: skip


def cfg():
    return ModelConfig.from_hf(make_tiny_hf("llama").config)  # D=48, 6 q / 2 kv heads of 8, ffn 80, vocab 97


def test_one_gemv_is_bandwidth_bound():
    ops = {o.name: o for o in forward_cost(cfg(), HW, Plan(), batch=1, new_tokens=1, context=10, last_only=False)}
    gu = ops["layers.0.mlp.w_gate_up"]
    params = 48 * 2 * 80
    assert gu.bytes == params * 4 and gu.flops == 2 * params
    assert gu.seconds == pytest.approx(params * 4 / 100e9)  # 4 bytes/param at 100 GB/s
    # bf16 weights halve the bytes and the time
    ops16 = {o.name: o for o in forward_cost(cfg(), HW, Plan("bf16", "bf16"), 1, 1, 10, False)}
    assert ops16["layers.0.mlp.w_gate_up"].seconds == pytest.approx(gu.seconds / 2)


def test_one_attention_step():
    ops = {o.name: o for o in forward_cost(cfg(), HW, Plan(), batch=1, new_tokens=1, context=10, last_only=False)}
    att = ops["layers.0.attn.sdpa"]
    kv = 2 * 8  # 2 kv heads x head_dim 8
    assert att.flops == 4 * 10 * 6 * 8  # QK^T and AV over 10 keys, 6 heads of 8
    assert att.bytes == 10 * 2 * kv * 4 + (48 + 2 * kv) * 4  # K and V read + this token's q/k/v
    assert att.seconds == pytest.approx(max(att.bytes / 100e9, att.flops / 1e12))
    windowed = {o.name: o for o in forward_cost(cfg(), HW, Plan(kv_window=4), 1, 1, 10, False)}
    assert windowed["layers.0.attn.sdpa"].flops == 4 * 4 * 6 * 8


def test_prefill_is_compute_bound_and_lm_head_last_only():
    ops = {o.name: o for o in forward_cost(cfg(), HW, Plan(), batch=1, new_tokens=256, context=256, last_only=True)}
    gu = ops["layers.0.mlp.w_gate_up"]
    assert gu.seconds == pytest.approx(2 * 48 * 160 * 256 / 1e12)
    assert ops["lm_head"].flops == 2 * 48 * 97  # one row


def test_estimate_composes_overheads_sparsity_and_speculation():
    hw = HardwareProfile(**{**HW.__dict__, "layer_overhead_us": 10.0, "step_overhead_us": 100.0})
    base = estimate(cfg(), hw, Plan(), context=10)
    step = sum(o.seconds for o in forward_cost(cfg(), hw, Plan(), 1, 1, 10, False))
    assert base["decode_step_ms"] == pytest.approx(step * 1e3)
    assert step > 3 * 10e-6 + 100e-6
    spec = estimate(cfg(), hw, Plan(spec_accepted=2.0, spec_draft_cost=0.5), context=10)
    assert spec["decode_tok_s"] == pytest.approx(base["decode_tok_s"] * 2 / 1.5)
    # 2:4 on a chip without sparse kernels buys nothing; with them, fewer bytes and flops
    dense = estimate(cfg(), hw, Plan(sparsity=0.5, sparsity_pattern="2:4"), context=10)
    assert dense["decode_tok_s"] == pytest.approx(base["decode_tok_s"])
    sparse_hw = HardwareProfile(**{**hw.__dict__, "nm_sparse_speedup": 2.0})
    assert estimate(cfg(), sparse_hw, Plan(sparsity=0.5, sparsity_pattern="2:4"), context=10)["decode_tok_s"] > base["decode_tok_s"]


def test_plan_and_profile_errors(tmp_path, monkeypatch):
    with pytest.raises(LeanlmError, match="unknown dtype"):
        estimate(cfg(), HW, Plan(weight_dtype="int2"))
    with pytest.raises(LeanlmError, match="must be in"):
        estimate(cfg(), HW, Plan(sparsity=1.5))
    with pytest.raises(LeanlmError, match="unknown hardware"):
        load_profile("tpu-v9")
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path))
    with pytest.raises(LeanlmError, match="leanlm hw calibrate"):
        load_profile("cpu")
    assert load_profile("h100").mem_bw_gbs == 3350


def test_cost_cli(tiny_dirs, capsys):
    from leanlm.cli import main

    assert main(["cost", str(tiny_dirs["llama"]), "--hw", "h100", "--weights", "int4", "--group", "128", "--json", "-"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["hardware"] == "h100" and r["decode_tok_s"] > 0 and r["plan"]["weight_dtype"] == "int4"


def test_calibration_pieces_measure_something():
    import torch

    from leanlm.hardware import calibrate as cal

    assert cal._gemv_bandwidth(torch.float32, total_mb=8, repeats=2) > 0.1  # GB/s
    assert cal._gemm_tflops(torch.float32, repeats=2) > 0.001
    per_layer, per_step = cal._overheads(torch.float32, steps=3)
    assert per_layer > 0 and per_step >= 0
    assert cal._quant_bandwidth(4, total_mb=2, repeats=2) > 0.1  # through leanlm's quantized layer
    assert cal._quant_gemm_tflops(8, repeats=1) > 0.001
    from leanlm.hardware import BUILTIN

    hw = BUILTIN["a100"]  # any profile: the overhead is what a measured prefill has beyond its pricing
    assert cal._prefill_token_overhead(hw, torch.float32, tokens=64) > 0


def test_quantized_prefill_uses_the_measured_weight_only_rate():
    from dataclasses import replace

    from leanlm.hardware import BUILTIN

    base = replace(BUILTIN["a100"], weight_only_tflops={})
    slow = replace(base, weight_only_tflops={"int4": 1.0}, token_overhead_us=5.0)
    plan = Plan(weight_dtype="int4", compute_dtype="bf16", group_size=128)
    a, b = estimate(cfg(), base, plan), estimate(cfg(), slow, plan)
    assert b["prefill_tok_s"] < a["prefill_tok_s"] / 2  # 1 TFLOP/s dequantize-and-multiply + per-token work
    assert abs(b["decode_step_ms"] - a["decode_step_ms"]) < 1e-9  # decode: one row, the GEMV path
