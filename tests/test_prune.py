"""Pruning: exact masks, structured surgery equals zero-masking, saved models reload, healing, errors."""

import copy
import json

import pytest
import torch

from leanlm import LeanlmError
from leanlm.cli import main
from leanlm.evaluate.speed import weight_bytes
from leanlm.model import load_model, save
from leanlm.prune import (
    SparseLinear,
    Structured,
    Unstructured,
    heal,
    nm_mask,
    owl_layer_sparsity,
    parse_pattern,
    prune_structured,
    prune_unstructured,
    save_compressed,
    sparsegpt_prune,
    sparsify_model,
    unstructured_mask,  # fmt: skip
    wanda_scores,
)
from leanlm.prune.calibration import block_linears, row_parts

from conftest import needs_gemma3

TOKENS = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))


def logits(model, tokens=PROBE):
    with torch.inference_mode():
        return model(tokens)


# ---- masks ----------------------------------------------------------------------------------
def test_unstructured_and_nm_masks_are_exact():
    scores = torch.rand(12, 40, generator=torch.Generator().manual_seed(0))
    for s in (0.3, 0.5, 0.7, 0.9):
        per_row = unstructured_mask(scores, s, per_row=True)
        assert ((~per_row).sum(1) == round(s * 40)).all()
        whole = unstructured_mask(scores, s, per_row=False)
        assert (~whole).sum() == round(s * scores.numel())
        assert scores[~whole].max() <= scores[whole].min()  # the lowest scores go
    for n, m in ((2, 4), (4, 8), (1, 4)):
        mask = nm_mask(scores, n, m)
        groups = mask.reshape(12, 40 // m, m)
        assert (groups.sum(-1) == n).all()
        kept_min = torch.where(groups, scores.reshape(12, -1, m), torch.inf).amin(-1)
        dropped_max = torch.where(~groups, scores.reshape(12, -1, m), -torch.inf).amax(-1)
        assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruned_blocks_have_the_requested_sparsity_and_pattern(tiny_dirs, method):
    base = load_model(tiny_dirs["llama"])
    for target in (0.5, "2:4", "4:8"):
        model = copy.deepcopy(base)
        cfg = Unstructured(method, sparsity=target if isinstance(target, float) else None,
                           pattern=target if isinstance(target, str) else None)  # fmt: skip
        report = prune_unstructured(model, cfg, TOKENS, progress=False)
        assert report["sparsity_prunable"] == pytest.approx(0.5, abs=1e-9)
        for layer in model.layers:
            for name, lin in block_linears(layer).items():
                for a, b in row_parts(layer, name):
                    w = lin.weight[a:b]
                    if cfg.nm:
                        n, m = cfg.nm
                        assert ((w != 0).reshape(w.shape[0], -1, m).sum(-1) == n).all()
                    elif method == "wanda":  # per output row
                        assert ((w == 0).sum(1) == w.shape[1] // 2).all()
                    else:
                        assert (w == 0).sum() == w.numel() // 2
        assert torch.isfinite(logits(model)).all()


def test_wanda_beats_magnitude_when_inputs_have_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 40.0  # a few outlier features, as LLM activations have
    w = torch.randn(32, 64, generator=g)
    sq = x.pow(2).sum(0)
    err = {}
    for name, scores in (("magnitude", w.abs()), ("wanda", wanda_scores(w, sq))):
        mask = unstructured_mask(scores, 0.5, per_row=True)
        err[name] = (x @ (w * mask).T - x @ w.T).pow(2).mean().item()
    assert err["wanda"] < 0.5 * err["magnitude"]


def test_sparsegpt_reconstructs_better_than_wanda():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.3  # correlated inputs
    w = torch.randn(48, 64, generator=g)
    H = 2 * x.T.double() @ x.double() / x.shape[0]
    w_sg, keep = sparsegpt_prune(w, H, 0.5)
    assert (keep.sum() == w.numel() // 2) and ((w_sg == 0) == ~keep).all()
    w_wanda = w * unstructured_mask(wanda_scores(w, x.pow(2).sum(0)), 0.5, per_row=True)
    err = lambda v: (x @ v.T - x @ w.T).pow(2).mean().item()
    assert err(w_sg) < 0.8 * err(w * keep)  # the OBS updates repair most of what the mask alone breaks
    assert err(w_sg) < err(w_wanda)
    _, keep24 = sparsegpt_prune(w, H, nm=(2, 4))
    assert (keep24.reshape(48, -1, 4).sum(-1) == 2).all()


def test_owl_allocation_keeps_mean_and_favours_outlier_layers():
    s = owl_layer_sparsity([0.01, 0.02, 0.05, 0.03], 0.7, lam=0.08)
    assert sum(s) / 4 == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16) and s[2] == min(s) and s[0] == max(s)
    assert owl_layer_sparsity([0.1, 0.1], 0.5) == [0.5, 0.5]


def test_owl_pruning_runs_on_a_tiny_model(tiny_dirs):
    model = load_model(tiny_dirs["qwen2"])
    report = prune_unstructured(model, Unstructured("wanda", 0.6, allocation="owl"), TOKENS, progress=False)
    assert len(set(report["layer_sparsity"])) > 1
    assert report["sparsity_prunable"] == pytest.approx(0.6, abs=0.01)


# ---- structured surgery == zero masking -------------------------------------------------------
def _zero_mask(model, report):
    """The same removal as zeros: a removed neuron's down column, a removed head's wo columns."""
    with torch.no_grad():
        if report["kind"] == "layers":
            for i in report["removed"]:
                model.layers[i].attn.wo.weight.zero_()
                model.layers[i].mlp.w_down.weight.zero_()
        for i, rem in (report["removed"].items() if isinstance(report["removed"], dict) else []):
            if report["kind"] == "neurons":
                model.layers[i].mlp.w_down.weight[:, rem] = 0
            else:
                hd = model.layers[i].attn.head_dim
                for h in rem["q_heads"]:
                    model.layers[i].attn.wo.weight[:, h * hd : (h + 1) * hd] = 0
    return model


CASES = [
    ("neurons", {"ratio": 0.25}),
    ("neurons", {"ratio": 0.4, "importance": "wanda", "scope": "global"}),
    ("neurons", {"ratio": 0.3, "importance": "magnitude"}),
    ("heads", {"ratio": 0.5, "head_mode": "kv"}),
    ("heads", {"ratio": 0.34, "head_mode": "q", "importance": "wanda"}),
    ("layers", {"remove": 1}),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("kind,kw", CASES)
def test_structured_pruning_equals_zero_masking(tiny_dirs, arch, kind, kw):
    base = load_model(tiny_dirs[arch])
    pruned = copy.deepcopy(base)
    report = prune_structured(pruned, Structured(kind, **kw), TOKENS, progress=False)
    assert report["params_after"] < report["params_before"]
    masked = _zero_mask(copy.deepcopy(base), report)
    assert (logits(pruned) - logits(masked)).abs().max() < 2e-5
    assert (logits(pruned) - logits(base)).abs().max() > 1e-3  # something was really removed
    if kind == "neurons" and kw.get("scope") != "global":
        assert all(s.ffn_dim == round(80 * (1 - kw["ratio"])) for s in pruned.config.layers)


def test_structured_pruning_shrinks_weight_bytes_and_cache(tiny_dirs):
    base = load_model(tiny_dirs["llama"])
    m = copy.deepcopy(base)
    prune_structured(m, Structured("heads", ratio=0.5, head_mode="kv"), TOKENS, progress=False)
    assert m.config.kv_bytes_per_token(4) == base.config.kv_bytes_per_token(4) // 2
    assert weight_bytes(m) < weight_bytes(base)
    from leanlm.decode.generate import generate_tokens

    out = list(generate_tokens(m, [5, 6, 7], 5, eos_ids=set()))  # cached decode works on the shrunk model
    assert len(out) == 5


@pytest.mark.parametrize("arch,kind,kw", [("llama", "neurons", {"ratio": 0.25}), ("qwen2", "heads", {"ratio": 0.5}),
                                          ("gemma3", "layers", {"remove": 2}), ("gemma3", "heads", {"ratio": 0.34, "head_mode": "q"})])  # fmt: skip
def test_saved_uniform_pruned_model_reloads_in_transformers(tiny_dirs, tmp_path, arch, kind, kw):
    from transformers import AutoModelForCausalLM

    model = load_model(tiny_dirs[arch])
    prune_structured(model, Structured(kind, **kw), TOKENS, progress=False)
    assert model.config.is_uniform()
    out = save(model, None, tmp_path / "pruned")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.inference_mode():
        theirs = hf(PROBE).logits
    assert (logits(model) - theirs).abs().max() < 1e-4
    assert torch.equal(logits(load_model(out)), logits(model))


def test_nonuniform_pruned_model_reloads_in_leanlm(tiny_dirs, tmp_path):
    model = load_model(tiny_dirs["llama"])
    prune_structured(model, Structured("neurons", ratio=0.5, scope="global"), TOKENS, progress=False)
    assert not model.config.is_uniform()
    out = save(model, None, tmp_path / "pruned")
    assert len(json.loads((out / "config.json").read_text())["leanlm_layers"]) == 3
    assert torch.equal(logits(load_model(out)), logits(model))


@pytest.fixture(scope="module")
def gemma_4heads(tmp_path_factory):
    """A tiny Gemma 3 with Gemma-3-270M's attention shape: 4 query heads sharing 1 KV head, hidden = 4 x head_dim."""
    from conftest import make_word_tokenizer, tiny_hf_config
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config("gemma3")
    cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads = 64, 16, 4, 1
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if "norm" in name else 0.15))
    d = tmp_path_factory.mktemp("gemma_4heads")
    hf.save_pretrained(d, safe_serialization=True)
    make_word_tokenizer().save_pretrained(d)
    return d


def test_transformers_loadable_comes_from_a_load(tiny_dirs, gemma_4heads, tmp_path):
    """A uniform prune loads in transformers with leanlm's logits; per-layer widths do not load; and a uniform
    Gemma 3 pruned from 4 to 3 query heads does not load either (transformers requires hidden_size % heads == 0),
    which equal widths alone (is_uniform) cannot tell."""
    from leanlm.export import check_transformers_load, transformers_loadable

    uniform = load_model(tiny_dirs["llama"])
    prune_structured(uniform, Structured("neurons", ratio=0.25), TOKENS, progress=False)
    r = transformers_loadable(uniform)
    assert r.loadable and r.error is None and r.max_logit_diff < 1e-4, r

    per_layer = load_model(tiny_dirs["llama"])
    prune_structured(per_layer, Structured("neurons", ratio=0.5, scope="global"), TOKENS, progress=False)
    assert not per_layer.config.is_uniform()
    r = transformers_loadable(per_layer)
    assert not r.loadable and r.error, r

    gemma = load_model(gemma_4heads)
    prune_structured(gemma, Structured("heads", ratio=0.25, head_mode="q"), TOKENS, progress=False)
    assert [l.n_heads for l in gemma.config.layers] == [3] * 4 and gemma.config.is_uniform()
    r = transformers_loadable(gemma)
    assert not r.loadable and "attention heads" in r.error, r
    assert torch.equal(logits(load_model(save(gemma, None, tmp_path / "g3"))), logits(gemma))  # leanlm loads it

    sparse = load_model(tiny_dirs["llama"])
    prune_unstructured(sparse, Unstructured("magnitude", 0.6), progress=False)
    assert check_transformers_load(save(sparse, None, tmp_path / "dense"), sparse).loadable  # zeros stored
    assert not check_transformers_load(save_compressed(sparse, None, tmp_path / "bitmask")).loadable


# ---- honest storage ---------------------------------------------------------------------------
def test_compressed_storage_is_smaller_and_exact(tiny_dirs, tmp_path):
    model = load_model(tiny_dirs["llama"])
    prune_unstructured(model, Unstructured("wanda", 0.7), TOKENS, progress=False)
    dense_dir = save(model, None, tmp_path / "dense")
    comp_dir = save_compressed(model, None, tmp_path / "compressed")
    dense_mb = (dense_dir / "model.safetensors").stat().st_size
    comp_mb = (comp_dir / "model.safetensors").stat().st_size
    assert comp_mb < 0.75 * dense_mb
    assert torch.equal(logits(load_model(comp_dir)), logits(model))
    ref = logits(model)
    for fmt in ("csr", "bitmask"):
        m = copy.deepcopy(model)
        rep = sparsify_model(m, fmt)
        assert rep["replaced"] == 4 * 3 and any(isinstance(x, SparseLinear) for x in m.modules())
        assert (logits(m) - ref).abs().max() < 1e-4
        if fmt == "bitmask":
            assert weight_bytes(m) < weight_bytes(model)
    with pytest.raises(LeanlmError, match="before sparsify_model"):
        save_compressed(m, None, tmp_path / "again")


# ---- healing ----------------------------------------------------------------------------------
def _kl(teacher, student, tokens):
    import torch.nn.functional as F

    lt, ls = F.log_softmax(logits(teacher, tokens), -1), F.log_softmax(logits(student, tokens), -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean().item()


def test_healing_reduces_kl_and_keeps_zeros(tiny_dirs):
    teacher = load_model(tiny_dirs["llama"])
    student = copy.deepcopy(teacher)
    prune_structured(student, Structured("neurons", ratio=0.5), TOKENS, progress=False)
    train = torch.randint(0, 97, (512, 24), generator=torch.Generator().manual_seed(2))
    held = torch.randint(0, 97, (8, 24), generator=torch.Generator().manual_seed(3))
    before = _kl(teacher, student, held)
    rep = heal(student, teacher, train, steps=20, lr=3e-3, batch_size=8, progress=False)
    assert _kl(teacher, student, held) < 0.95 * before and rep["last_loss"] < rep["first_loss"]
    assert not any(p.requires_grad for p in student.parameters())

    sparse = copy.deepcopy(teacher)
    prune_unstructured(sparse, Unstructured("magnitude", 0.5), progress=False)
    heal(sparse, teacher, train, steps=3, lr=1e-3, keep_zeros=True, progress=False)
    assert all((lin.weight == 0).float().mean() >= 0.5 for l in sparse.layers for lin in block_linears(l).values())


# ---- errors and CLI ---------------------------------------------------------------------------
def test_bad_inputs_name_the_fix(tiny_dirs):
    for bad in ("2-4", "4:2", "0:4", "a:b"):
        with pytest.raises(LeanlmError, match="N:M"):
            parse_pattern(bad)
    with pytest.raises(LeanlmError, match=r"\[0, 1\)"):
        Unstructured("wanda", 1.2)
    with pytest.raises(LeanlmError, match="drop --sparsity"):
        Unstructured("wanda", 0.7, pattern="2:4")
    with pytest.raises(LeanlmError, match="--sparsity S"):
        Unstructured("wanda")
    with pytest.raises(LeanlmError, match="magnitude, wanda, sparsegpt"):
        Unstructured("random", 0.5)
    with pytest.raises(LeanlmError, match="--ratio"):
        Structured("neurons", ratio=1.0)
    with pytest.raises(LeanlmError, match="--remove"):
        Structured("layers")
    model = load_model(tiny_dirs["llama"])
    with pytest.raises(LeanlmError, match="below 3"):
        prune_structured(model, Structured("layers", remove=3), TOKENS, progress=False)
    with pytest.raises(LeanlmError, match="calibration"):
        prune_unstructured(model, Unstructured("wanda", 0.5))
    with pytest.raises(LeanlmError, match="multiple of 8"):
        nm_mask(torch.rand(4, 12), 4, 8)


def _run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # an argument refused while parsing: the parser's one error line, exit 2
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def calib_file(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text(" ".join(f"w{(i * 13) % 90}" for i in range(3000)))
    return f


def test_cli_prune_unstructured_and_structured(tiny_dirs, tmp_path, capsys, calib_file):
    from transformers import AutoModelForCausalLM

    src = tiny_dirs["llama"]
    common = ["--calib-text", calib_file, "--calib-samples", 4, "--calib-seq-len", 32]
    code, _, err = _run(capsys, "prune", src, "--method", "wanda", "--pattern", "2:4", "--out", tmp_path / "w", *common)
    assert code == 0, err
    assert torch.isfinite(logits(load_model(tmp_path / "w"))).all()
    code, out, err = _run(capsys, "prune", src, "--method", "sparsegpt", "--sparsity", 0.5, "--storage", "dense",
                          "--out", tmp_path / "d", "--json", tmp_path / "d.json", *common)  # fmt: skip
    d = json.loads((tmp_path / "d.json").read_text())
    assert code == 0 and d["pruning"]["sparsity_prunable"] == 0.5
    assert d["after"]["transformers_loadable"] is True  # from an actual transformers load
    AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    code, _, err = _run(capsys, "prune", src, "--method", "wanda", "--sparsity", 0.5, "--out", tmp_path / "b",
                          "--json", tmp_path / "b.json", *common)  # fmt: skip (bitmask storage: leanlm's own format)
    assert code == 0 and json.loads((tmp_path / "b.json").read_text())["after"]["transformers_loadable"] is False
    code, _, err = _run(capsys, "prune", src, "--structured", "neurons", "--ratio", 0.25, "--heal-steps", 2,
                          "--out", tmp_path / "n", *common)  # fmt: skip
    assert code == 0, err
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "n").config.intermediate_size == 60
    code, _, err = _run(capsys, "prune", src, "--structured", "layers", "--remove", 1, "--out", tmp_path / "l", *common)
    assert code == 0 and load_model(tmp_path / "l").config.n_layers == 2
    # no overwrite without --force; the existing output is untouched
    code, _, err = _run(capsys, "prune", src, "--structured", "layers", "--remove", 1, "--out", tmp_path / "l", *common)
    assert code == 2 and "--force" in err
    code, _, err = _run(capsys, "prune", src, "--structured", "layers", "--remove", 1, "--out", tmp_path / "l", "--force", *common)
    assert code == 0


def test_cli_prune_bad_input(tiny_dirs, tmp_path, capsys):
    src = tiny_dirs["llama"]
    cases = [
        (["--method", "wanda", "--pattern", "5:4"], "N:M"),
        (["--method", "wanda", "--sparsity", "1.5"], ">= 0 and < 1"),
        (["--structured", "neurons", "--ratio", "0"], "--ratio"),
        (["--structured", "layers"], "--remove"),
        (["--method", "wanda", "--sparsity", "0.5", "--structured", "neurons", "--ratio", "0.2"], "either"),
        ([], "either"),
    ]
    for extra, msg in cases:
        code, _, err = _run(capsys, "prune", src, *extra, "--out", tmp_path / "x")
        assert code == 2 and msg in err and err.count("\n") == 1, (extra, err)
        assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as e:
        main(["prune", "--help"])
    assert e.value.code == 0 and "example" in capsys.readouterr().out


@pytest.mark.real_model
@needs_gemma3
def test_gemma3_270m_three_heads_is_not_transformers_loadable():
    """Gemma-3-270M pruned from 4 to 3 query heads per layer: uniform widths, yet transformers refuses the
    config (hidden 640 is not a multiple of 3 heads); leanlm loads it. The flag must come from the load."""
    from leanlm.export import transformers_loadable

    model = load_model("gemma3-270m", dtype="bfloat16")  # half the bytes to save; the refusal is the config
    prune_structured(model, Structured("heads", ratio=0.25, head_mode="q", importance="magnitude"), progress=False)
    assert {l.n_heads for l in model.config.layers} == {3} and model.config.is_uniform()
    r = transformers_loadable(model)
    assert not r.loadable and "attention heads" in r.error, r


def test_runtime_loads_compressed_pruned_checkpoints_without_the_pruning_package(tiny_dirs, tmp_path):
    """No import circle model <-> prune: no module of leanlm.model imports leanlm.prune (not even inside a
    function), and loading a bitmask checkpoint in a fresh interpreter leaves leanlm.prune unimported."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    model_pkg = Path(__file__).resolve().parents[1] / "src" / "leanlm" / "model"
    for path in model_pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith(("..prune", "leanlm.prune")) for n in names), (path.name, names)

    model = load_model(tiny_dirs["llama"])
    prune_unstructured(model, Unstructured("magnitude", 0.7), progress=False)
    out = save_compressed(model, None, tmp_path / "bitmask")
    code = ("import sys; from leanlm.model import load_model; load_model(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.startswith('leanlm.prune')))")  # fmt: skip
    src = str(Path(__file__).resolve().parents[1] / "src")
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": src})  # fmt: skip
    assert p.returncode == 0 and p.stdout.strip() == "[]", (p.stdout, p.stderr[-1500:])
