"""MLA-like KV compression (leanlm.attention.mla) on tiny random models, and an exactness check on SmolLM2."""

import pytest
import torch

import leanlm
from leanlm.attention import MLA, MLAAttention, KVPolicy, cache_bytes, kv_bytes_per_token
from leanlm.attention.mla import convert, heal
from leanlm.decode.generate import generate_tokens
from leanlm.errors import LeanlmError
from leanlm.model import load_model
from leanlm.model.distill import distill_loss

from conftest import needs_smollm2

TOL = 1e-4


def _ids(n=2, T=30, seed=0):
    return torch.randint(0, 97, (n, T), generator=torch.Generator().manual_seed(seed))


def _full(attn, rope_dims=None):
    """The rank that keeps every no-RoPE key dim and value dim (exact)."""
    d = attn.head_dim if rope_dims is None else rope_dims
    return attn.n_kv_heads * (2 * attn.head_dim - d)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3", "mistral"])
def test_full_rank_all_rope_dims_is_exact(arch, tiny_dirs):
    """rank = every value dim, rope_dims = head_dim: same logits as the original, in one forward and through
    the latent cache in chunks and single tokens (QK-norm: qwen3, gemma3; sliding windows: gemma3, mistral)."""
    base, model = load_model(tiny_dirs[arch]), load_model(tiny_dirs[arch])
    a = model.layers[0].attn
    leanlm.apply(model, MLA(rank=_full(a), rope_dims=a.head_dim), _ids(4, 16, 1), progress=False)
    assert all(isinstance(l.attn, MLAAttention) for l in model.layers)
    assert model.applied[-1]["type"] == "MLA"
    ids = _ids()
    with torch.inference_mode():
        ref = base(ids)
        assert (model(ids) - ref).abs().max().item() <= TOL
        model.setup_cache(2, ids.shape[1])
        outs = [model(ids[:, s : s + c], start=s) for s, c in ((0, 17), (17, 5), (22, 1), (23, 7))]
        model.clear_cache()
    assert (torch.cat(outs, 1) - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_lossy_conversion_cache_matches_its_own_forward(arch, tiny_dirs):
    """Partial RoPE + a small latent changes the logits, but decoding through the latent cache equals the
    converted model's own whole-sequence forward."""
    base, model = load_model(tiny_dirs[arch]), load_model(tiny_dirs[arch])
    convert(model, MLA(rank=6, rope_dims=4), _ids(4, 16, 1), progress=False)
    ids = _ids(1, 20)
    with torch.inference_mode():
        whole = model(ids)
        assert (whole - base(ids)).abs().max().item() > 1e-2  # the conversion is lossy here
        model.setup_cache(1, 20)
        steps = [model(ids[:, :12], start=0)] + [model(ids[:, s : s + 1], start=s) for s in range(12, 20)]
    assert (torch.cat(steps, 1) - whole).abs().max().item() <= TOL


def test_kv_bytes_reduce_as_configured(tiny_dirs):
    model = load_model(tiny_dirs["llama"])  # 2 KV heads of head_dim 8, 3 layers, fp32
    assert kv_bytes_per_token(model) == 3 * 2 * 2 * 8 * 4
    rep = convert(model, MLA(rank=6, rope_dims=4), _ids(4, 16, 1), progress=False)
    per_layer = 6 + 2 * 4  # latent + the RoPE'd key dims of both KV heads
    assert kv_bytes_per_token(model) == rep["kv_bytes_per_token_after"] == 3 * per_layer * 4
    assert kv_bytes_per_token(model, torch.bfloat16) == 3 * per_layer * 2
    assert rep["kv_ratio"] == pytest.approx(32 / 14, rel=1e-3)
    model.setup_cache(1, 50)  # the cache the runtime allocates holds exactly that
    assert cache_bytes(model) == 50 * kv_bytes_per_token(model)
    assert all(len(p) == 2 and len(p[0]) == 2 for p in rep["rope_pairs"])  # 2 KV heads x 2 frequency pairs


def test_qk_norm_model_caches_one_inverse_norm_per_head(tiny_dirs):
    model = load_model(tiny_dirs["qwen3"])
    convert(model, MLA(rank=6, rope_dims=4), _ids(4, 16, 1), progress=False)
    assert kv_bytes_per_token(model) == 3 * (6 + 2 * (4 + 1)) * 4


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_save_load_roundtrip_and_generate(arch, tiny_dirs, word_tokenizer, tmp_path):
    model = load_model(tiny_dirs[arch])
    leanlm.apply(model, MLA(rank=5, rope_dims=4, select="rotation"), _ids(4, 16, 1), progress=False)
    leanlm.save(model, word_tokenizer, tmp_path / "mla")
    back, tok = leanlm.load(tmp_path / "mla")
    assert all(isinstance(l.attn, MLAAttention) for l in back.layers)
    for a, b in zip(model.layers, back.layers):
        assert torch.equal(a.attn.rope_idx, b.attn.rope_idx)
    ids = _ids()
    with torch.inference_mode():
        assert torch.equal(model(ids), back(ids))
    assert kv_bytes_per_token(back) == kv_bytes_per_token(model)
    prompt = [1, 5, 9, 13]
    got = list(generate_tokens(back, prompt, 8, eos_ids=set()))
    assert got == list(generate_tokens(model, prompt, 8, eos_ids=set())) and len(got) == 8
    # greedy decode through the latent cache == argmax of the whole-sequence forward
    seq = prompt + got[:-1]
    with torch.inference_mode():
        logits = back(torch.tensor([seq]))[0, len(prompt) - 1 :]
    assert logits.argmax(-1).tolist() == got


def test_healing_reduces_kl(tiny_dirs):
    base, model = load_model(tiny_dirs["llama"]), load_model(tiny_dirs["llama"])
    calib = _ids(8, 24, 2)
    convert(model, MLA(rank=4, rope_dims=4), calib, progress=False)
    held = _ids(2, 24, 3)

    def kl(ids):
        with torch.no_grad():
            return distill_loss(model(ids), base(ids)).item()

    before, before_held = kl(calib), kl(held)
    frozen = {n: p.clone() for n, p in model.named_parameters() if ".mla_down." not in n and ".mla_up." not in n}
    rep = heal(model, base, calib, steps=40, lr=3e-3, progress=False)
    assert rep["last_loss"] < rep["first_loss"]
    assert kl(calib) < 0.85 * before  # on the windows it trained on (0.62 -> 0.47 when written)
    assert kl(held) < before_held  # and on windows it never saw
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # only the latent trained


def test_apply_with_heal_steps_records_and_heals(tiny_dirs):
    model = load_model(tiny_dirs["llama"])
    rep = leanlm.apply(model, MLA(rank=4, rope_dims=4, heal_steps=5, heal_lr=1e-3), _ids(4, 16, 1), progress=False)
    assert rep["heal"]["steps"] == 5 and model.applied[-1]["config"]["heal_steps"] == 5


@pytest.mark.parametrize("kw, fix", [
    ({"rope_dims": 3}, "rope_dims must be even"),
    ({"rank": 0}, "rank must be an integer >= 1"),
    ({"select": "best"}, "use one of: rotation, norm, high"),
    ({"heal_scope": "all"}, "use one of: latent, attention"),
    ({"heal_lr": 0}, "heal_lr must be > 0"),
])  # fmt: skip
def test_bad_config_names_the_fix(kw, fix):
    with pytest.raises(LeanlmError, match=fix):
        MLA(**kw)


def test_bad_use_names_the_fix(tiny_dirs):
    model = load_model(tiny_dirs["llama"])  # head_dim 8, 2 KV heads
    with pytest.raises(LeanlmError, match="use rope_dims <= 8"):
        convert(model, MLA(rank=4, rope_dims=10, select="high", whiten=False))
    with pytest.raises(LeanlmError, match="use rank <= 24"):
        convert(model, MLA(rank=25, rope_dims=4, select="high", whiten=False))
    with pytest.raises(LeanlmError, match="needs calibration"):
        leanlm.apply(model, MLA(rank=4, rope_dims=4))
    convert(model, MLA(rank=4, rope_dims=4, select="high", whiten=False))  # no calibration needed
    with pytest.raises(LeanlmError, match="already mla-converted"):
        convert(model, MLA(rank=4, rope_dims=4, select="high", whiten=False))
    with pytest.raises(LeanlmError, match="does not combine"):
        model.setup_cache(1, 16, cache_cls=KVPolicy.parse("sinks:2,window:8"))
    bf16 = load_model(tiny_dirs["llama"], dtype="bfloat16")
    with pytest.raises(LeanlmError, match="float32"):
        convert(bf16, MLA(rank=4, rope_dims=4, heal_steps=2), _ids(2, 8))


@needs_smollm2
def test_smollm2_full_rank_conversion_is_exact(smollm2):
    """On the real model: keeping every RoPE dim and the full value rank reproduces the logits."""
    import copy

    base, _ = smollm2
    model = copy.deepcopy(base)
    a = model.layers[0].attn
    convert(model, MLA(rank=_full(a), rope_dims=a.head_dim, select="high", whiten=False), progress=False)
    ids = _ids(1, 48, 5) * 37
    with torch.inference_mode():
        ref = base(ids)
        assert (model(ids) - ref).abs().max().item() <= 2e-3 * ref.abs().max().item()
    assert kv_bytes_per_token(model) == kv_bytes_per_token(base)


def test_recipe_step(tiny_dirs):
    from leanlm.recipe import build_step

    (cfg,) = build_step("mla", {"rank": 4, "rope_dims": 4, "heal_steps": 0})
    assert cfg == MLA(rank=4, rope_dims=4)
    with pytest.raises(LeanlmError, match="unknown key"):
        build_step("mla", {"rank": 4, "ropedims": 4})
