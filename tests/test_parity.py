"""leanlm's runtime must reproduce transformers' logits (fp32, max abs diff <= 1e-4)."""

import pytest
import torch
from conftest import ARCHS, make_tiny_hf

from leanlm.model import load_model

TOL = 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_matches_transformers(arch, tiny_dirs):
    hf = make_tiny_hf(arch)
    model = load_model(tiny_dirs[arch])
    tokens = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = hf(tokens).logits
        ours = model(tokens)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("fused", [False, True], ids=["python", "fused"])
@pytest.mark.parametrize("arch", ARCHS)
def test_decode_after_prefill_matches_transformers(arch, fused, tiny_dirs):
    """Prefill 12 tokens into the cache, then decode one token at a time past the sliding
    windows (6-7 tokens): each step's logits equal transformers' full-sequence logits, through
    the Python block and through the fused C++ decode step (model/fused.py)."""
    from leanlm.model import fused as fused_mod

    if fused and not fused_mod.available():
        pytest.skip("no C++ compiler for the fused decode kernels")
    hf = make_tiny_hf(arch)
    model = load_model(tiny_dirs[arch])
    model.fused_decode = fused
    tokens = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = hf(tokens).logits[0]
        model.setup_cache(1, 32)
        first = model(tokens[:, :12], start=0, last_only=True)[0, -1]
        assert (first - ref[11]).abs().max().item() <= TOL
        for pos in range(12, 20):
            step = model(tokens[:, pos : pos + 1], start=pos)[0, -1]
            assert (step - ref[pos]).abs().max().item() <= TOL, f"position {pos}"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_chunked_prefill_matches_full(arch, tiny_dirs):
    """Several tokens at once on top of a filled cache (what speculative verification does)."""
    model = load_model(tiny_dirs[arch])
    tokens = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = model(tokens)[0]
        model.setup_cache(1, 20)
        a = model(tokens[:, :9], start=0)[0]
        b = model(tokens[:, 9:], start=9)[0]
    assert torch.allclose(torch.cat([a, b]), full, atol=TOL)


def test_bf16_close_to_fp32(tiny_dirs):
    m32 = load_model(tiny_dirs["llama"])
    m16 = load_model(tiny_dirs["llama"], dtype="bfloat16")
    tokens = torch.randint(0, 97, (1, 16))
    with torch.inference_mode():
        a, b = m32(tokens), m16(tokens)
    assert b.dtype == torch.float32  # logits always come back in fp32
    assert m16.layers[0].attn.wqkv.weight.dtype == torch.bfloat16
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.05


@pytest.mark.parametrize("arch", ["llama", "llama_untied"])
def test_decode_layout_keeps_logits_and_round_trips(arch, tiny_dirs, tmp_path):
    from leanlm.model import load_model as load_m
    from leanlm.quant import RTN, quantize

    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    ref_model = load_m(tiny_dirs[arch])
    model = load_m(tiny_dirs[arch])
    assert model.set_decode_layout(True) > 0
    w = model.layers[0].attn.wqkv.weight
    assert w.stride() == (1, w.shape[0])  # column-major storage, same shape and values
    for m in (ref_model, model):
        m.setup_cache(1, 16)
    with torch.inference_mode():
        assert torch.allclose(model(ids, 0), ref_model(ids, 0), atol=1e-5)
        step = torch.tensor([[4]])
        assert torch.allclose(model(step, 6), ref_model(step, 6), atol=1e-5)
    assert model.set_decode_layout(False) > 0 and model.layers[0].attn.wqkv.weight.is_contiguous()
    model.set_decode_layout(True)
    quantize(model, RTN(bits=8, group=0, dtype="float32"), progress=False)  # puts rows back first
    assert type(model.layers[0].attn.wqkv).__name__ == "QuantLinear"
