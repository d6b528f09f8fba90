"""The fused single-token decode step (model/fused.py) against the Python block it replaces."""

import pytest
import torch

from conftest import decode_logits

from leanlm import ops
from leanlm.model import fused, load_model

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C++ compiler for the fused decode kernels")




def _count_whole_block_calls(monkeypatch) -> list:
    """ops.decode_layer counted: the list grows by one per whole-block call."""
    calls, decode_layer = [], ops.decode_layer

    def counting(*args):
        calls.append(1)
        return decode_layer(*args)

    monkeypatch.setattr(ops, "decode_layer", counting)
    return calls


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bf16_fused_matches_python_path(arch, tiny_dirs):
    """bf16 rounds where the Python path rounds: logits agree to bf16 noise (and both stay near fp32)."""
    m16 = load_model(tiny_dirs[arch], dtype="bfloat16")
    m32 = load_model(tiny_dirs[arch])
    tokens = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(4))
    ref = decode_logits(m32, tokens, False).softmax(-1)
    py, fz = (decode_logits(m16, tokens, on).softmax(-1) for on in (False, True))
    assert (py - fz).abs().max() < 0.02
    assert (fz - ref).abs().max() < 0.05


@pytest.mark.parametrize("column_major", [False, True])
def test_batch_of_two_and_both_weight_layouts(column_major, tiny_dirs):
    model = load_model(tiny_dirs["llama"])
    assert model.fused_decode  # the default decode step
    model.set_decode_layout(column_major)
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    a = decode_logits(model, tokens, True)
    b = decode_logits(model, tokens, False)
    assert (a - b).abs().max() <= 1e-4


def test_replaced_linears_and_cache_policies_run_inside_the_fused_step(tiny_dirs, monkeypatch):
    """A block with leanlm.quant's packed linears runs as one C++ call (q_linear inside); a KV cache
    policy falls back to its own attention between the C++ glue; both give the Python path's logits."""
    from leanlm.attention.policies import KVPolicy
    from leanlm.decode.generate import generate_tokens
    from leanlm.quant import RTN, quantize
    from leanlm.quant.packed import QuantLinear

    model = load_model(tiny_dirs["gemma3"])
    quantize(model, RTN(bits=8, group=0, dtype="float32"), progress=False)
    assert isinstance(model.layers[0].attn.wqkv, QuantLinear)
    calls = _count_whole_block_calls(monkeypatch)
    tokens = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(6))
    a, b = decode_logits(model, tokens, True), decode_logits(model, tokens, False)
    assert len(calls) == 9 * len(model.layers) and (a - b).abs().max() <= 1e-4  # 6-token prefill + 8 steps, every block

    def gen(on):
        model.fused_decode = on
        return list(generate_tokens(model, [5, 6, 7], max_new_tokens=20, eos_ids=set(), kv=KVPolicy.parse("sinks:2,window:6")))

    assert gen(True) == gen(False)


def test_cached_layer_plans_follow_replaced_modules_weights_and_layouts(tiny_dirs):
    """The whole-block call's arguments are cached per layer between steps; replacing a weight, a
    linear (quantizing), the cache or the weight layout after decoding must be seen by the next step."""
    from leanlm.quant import RTN, quantize

    model = load_model(tiny_dirs["llama"])
    tokens = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(8))
    before = decode_logits(model, tokens, True)  # plans built and cached
    down = model.layers[1].mlp.w_down
    down.weight = torch.nn.Parameter(down.weight.detach() * 0.5)  # a new weight object
    a, b = decode_logits(model, tokens, True), decode_logits(model, tokens, False)
    assert (a - b).abs().max() <= 1e-4 and (a - before).abs().max() > 1e-3
    model.set_decode_layout(True)  # same Parameters, storage moved to column-major
    assert (decode_logits(model, tokens, True) - b).abs().max() <= 1e-4
    model.set_decode_layout(False)
    quantize(model, RTN(bits=4, group=32, dtype="float32"), progress=False)  # new linear modules
    fresh = load_model(tiny_dirs["llama"])  # the same edits on a model that never decoded
    fresh.layers[1].mlp.w_down.weight.data.mul_(0.5)
    quantize(fresh, RTN(bits=4, group=32, dtype="float32"), progress=False)
    a = decode_logits(model, tokens, True)
    assert torch.equal(a, decode_logits(fresh, tokens, True)) and (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gemma3", "mistral"])
def test_multi_token_steps_match_python_path(arch, tiny_dirs):
    """Verification-sized forwards (2..16 new tokens, causal and sliding-window masks over the
    cache) give the Python path's logits."""
    model = load_model(tiny_dirs[arch])
    tokens = torch.randint(0, 97, (1, 43), generator=torch.Generator().manual_seed(7))
    chunks = [(0, 4), (4, 7), (7, 15), (15, 17), (17, 26), (26, 43)]  # the 17-token chunk takes the Python path
    logits = {}
    for on in (False, True):
        model.fused_decode = on
        model.setup_cache(1, 48)
        with torch.inference_mode():
            logits[on] = torch.cat([model(tokens[:, a:b], a) for a, b in chunks], 1)
    assert (logits[True] - logits[False]).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_linear_matches_f_linear(dtype):
    """leanlm's small-row kernel = F.linear for 1..MAX_ROWS rows, with a K that is not a multiple of 8 and a bias."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 83, generator=g).to(dtype)
    b = torch.randn(37, generator=g)
    for rows in range(1, ops.MAX_ROWS + 1):
        x = torch.randn(rows, 83, generator=g).to(dtype)
        y = ops.small_linear(x, w, b)
        ref = torch.nn.functional.linear(x.float(), w.float(), b)
        assert y.dtype == dtype and y.shape == (rows, 37)
        assert (y.float() - ref).abs().max() <= (1e-4 if dtype == torch.float32 else 0.05 * ref.abs().max())
    assert ops.small_linear(torch.randn(ops.MAX_ROWS + 1, 83), w.float()) is None  # more rows: not this kernel
    assert ops.small_linear(torch.randn(2, 83), w.float().t().contiguous().t()) is None  # column-major weight


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_k_token_forward_equals_k_single_steps_bitwise(arch, dtype, tiny_dirs):
    """Batch invariance: verifying k tokens in one forward gives exactly the logits of k decode
    steps (what keeps greedy speculative decoding exact in bf16), including sliding windows."""
    model = load_model(tiny_dirs[arch], dtype=dtype)
    if arch == "gemma3":
        assert any(layer.attn.window for layer in model.layers)  # the tiny Gemma has sliding-window layers
    tokens = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(6)).tolist()[0]
    with torch.inference_mode():
        model.setup_cache(1, 40)
        model(torch.tensor([tokens[:16]]), 0)
        steps = torch.cat([model(torch.tensor([[t]]), 16 + i) for i, t in enumerate(tokens[16:])], 1)
        batch = model(torch.tensor([tokens[16:]]), 16)
    model.clear_cache()
    assert torch.equal(steps, batch)


def test_quantized_k_token_forward_equals_k_single_steps_bitwise(tiny_dirs):
    """The same batch invariance for a model with leanlm.quant's packed int4 weights (q_linear
    from C++), up to the fused step's MAX_ROWS tokens, so a quantized target verifies exactly."""
    from leanlm.quant import RTN, quantize

    model = load_model(tiny_dirs["llama"], dtype="bfloat16")
    quantize(model, RTN(bits=4, group=32), progress=False)
    T = fused.MAX_ROWS
    tokens = torch.randint(0, 97, (1, 8 + T), generator=torch.Generator().manual_seed(7)).tolist()[0]
    with torch.inference_mode():
        model.setup_cache(1, 8 + T + 1)
        model(torch.tensor([tokens[:8]]), 0)
        steps = torch.cat([model(torch.tensor([[t]]), 8 + i) for i, t in enumerate(tokens[8:])], 1)
        batch = model(torch.tensor([tokens[8:]]), 8)
    model.clear_cache()
    assert torch.equal(steps, batch)


def test_input_sparse_linears_run_inside_the_whole_block_call(tiny_dirs, monkeypatch):
    """leanlm.adaptive's native input-sparse linears (activation sparsity) are compiled into the
    block's one C++ call; its decode steps equal those of the glue path that calls each module."""
    from leanlm.adaptive import ActivationSparsity, apply_activation_sparsity
    from leanlm.adaptive.sparsity import SparseInputLinear

    model = load_model(tiny_dirs["llama"])
    calib = torch.randint(3, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    apply_activation_sparsity(model, ActivationSparsity(0.5, ("mlp", "attn"), kernel="native"), calib, progress=False)
    assert isinstance(model.layers[0].mlp.w_down, SparseInputLinear)
    calls = _count_whole_block_calls(monkeypatch)
    tokens = torch.randint(0, 97, (1, 26), generator=torch.Generator().manual_seed(7))

    def decode(whole_block: bool):
        # an 18-token prefill runs the Python block on both sides (the glue path's modules take a
        # multi-row product dense and masked; the whole-block call sweeps each row sparse)
        for layer in model.layers:
            layer.__dict__.pop("_fused_plan", None)
        if not whole_block:
            monkeypatch.setattr(fused, "_layer_plan", lambda *a, **k: None)  # glue path: module calls
        out = decode_logits(model, tokens, True, prompt=18)
        monkeypatch.setattr(fused, "_layer_plan", layer_plan)
        return out

    layer_plan = fused._layer_plan
    glue = decode(False)
    assert not calls
    whole = decode(True)
    assert len(calls) == 8 * len(model.layers)  # 8 steps, every block in one call
    assert torch.equal(whole, glue)
    model.layers[0].mlp.w_down.threshold = 1e9  # a changed threshold reaches the whole-block call
    changed = decode_logits(model, tokens, True, prompt=18)
    assert not torch.equal(changed, whole) and torch.equal(changed, decode(False))
