"""GPTQ's true-sequential block walk, on top of the shared calibration engine (leanlm/calibration.py).

`sequential_block` calibrates a block's Linears one after another, each on inputs that already
went through the quantized Linears before it. Everything else (calibration windows, the
block-sequential driver, Hessian hooks) lives in leanlm.calibration and is re-exported here for
code that imported it from leanlm.quant.calibrate.
"""

from __future__ import annotations

import torch

from ..calibration import (  # noqa: F401  (re-exported)
    LINEARS,
    InputStats,
    StopForward,
    calibration_tokens,
    collect,
    get_module,
    run_block,
    run_sequential,
    set_module,
    token_windows,
)


DOWN_INPUTS_HELD = 256 << 20  # bytes of down-projection inputs kept between its statistics and the block outputs


def read_calibration(spec: str, tokenizer, n_samples: int, seq_len: int, seed: int = 0, data_dir=None) -> torch.Tensor:
    """calibration_tokens with the source first (the argument order `leanlm quantize` always used)."""
    return calibration_tokens(tokenizer, spec, n_samples, seq_len, seed, data_dir)


def mirror_matches(layer, x, rope, dtype) -> bool:
    """Does the step-by-step block (_steps) agree with layer.forward (first sample, 32 tokens)?"""
    xs = x[:1, :32]
    r = (rope[0][:32], rope[1][:32])
    try:
        return bool(torch.allclose(_steps(layer, [xs], r, dtype, [], None)[0], layer(xs, r, 0, dtype), rtol=1e-4, atol=1e-5))
    except (AttributeError, KeyError, RuntimeError, ValueError):
        return False


def sequential_block(layer, xs: list[torch.Tensor], rope, dtype, names: list[str], quantize_one) -> list[torch.Tensor] | None:
    """True-sequential calibration in one pass over the block: each Linear in `names` is
    calibrated on inputs computed through the already-quantized Linears before it, then
    quantize_one(name, InputStats) replaces it. Returns the block outputs, or None when the
    runtime's block no longer matches the step-by-step version (the caller then falls back)."""
    if not mirror_matches(layer, xs[0], rope, dtype):
        return None
    return _steps(layer, xs, rope, dtype, names, quantize_one)


def _steps(layer, xs, rope, dtype, names, quantize_one) -> list[torch.Tensor]:
    """runtime.Block.forward (and MLP.forward) written out stage by stage over all batches, so that
    a Linear can be quantized once every batch has been seen and before its outputs are used."""
    a = [layer.attn_norm(x, dtype) for x in xs]
    _calibrate(layer, "attn.wqkv", a, names, quantize_one)
    o = []
    for t in a:
        captured = {}

        def grab(module, args, captured=captured):
            captured["o"] = args[0]
            raise StopForward

        handle = layer.attn.wo.register_forward_pre_hook(grab)
        try:
            layer.attn(t, rope, 0)
        except StopForward:
            pass
        finally:
            handle.remove()
        o.append(captured["o"])
    del a
    _calibrate(layer, "attn.wo", o, names, quantize_one)
    hs = []
    for x, t in zip(xs, o):
        h = layer.attn.wo(t)
        if layer.attn_post_norm is not None:
            h = layer.attn_post_norm(h)
        hs.append(x + h)
    del o
    m = [layer.mlp_norm(h, dtype) for h in hs]
    _calibrate(layer, "mlp.w_gate_up", m, names, quantize_one)

    def down_input(t):
        gate, up = layer.mlp.w_gate_up(t).chunk(2, dim=-1)
        return layer.mlp.act(gate) * up

    # The down projection's inputs are the widest activations (the 1.5B: 16 x 512 x 8960 fp32 = 294 MB). Up to
    # DOWN_INPUTS_HELD bytes they are computed once and kept for the block's outputs; above, its statistics are
    # taken batch by batch and each input is computed again, so they are never all held at once.
    width = get_module(layer, "mlp.w_down").in_features
    held = sum(t[..., 0].numel() for t in m) * width * 4 <= DOWN_INPUTS_HELD and "mlp.w_down" in names
    d = [down_input(t) for t in m] if held else None
    _calibrate(layer, "mlp.w_down", d if held else (down_input(t) for t in m), names, quantize_one)
    out = []
    for i, (h, t) in enumerate(zip(hs, m)):
        y = layer.mlp.w_down(d[i] if held else down_input(t))
        if layer.mlp_post_norm is not None:
            y = layer.mlp_post_norm(y)
        out.append(h + y)
    return out


def _calibrate(layer, name: str, inputs, names: list[str], quantize_one) -> None:
    """Statistics of Linear `name` over `inputs` (a list, or a generator consumed once), then quantize_one."""
    if name not in names:
        return
    module = get_module(layer, name)
    stats = InputStats(module)
    stats.remove()  # fed directly, not through a hook
    for t in inputs:
        stats(module, (t,))
    quantize_one(name, stats)
