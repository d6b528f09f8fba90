"""Hostile and careless input, as a fuzz set: every case ends in exit code 2 with exactly one `leanlm: error:`
line on stderr (no traceback), and leaves no output and no hidden temporary file behind. Cases marked
`before_load` must fail before any model is loaded (a load raises here), i.e. before the work."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import yaml

from leanlm.cli import main

LOAD = importlib.import_module("leanlm.model.load")  # the module (leanlm.model.load is also a function's name)


def recipe(steps) -> dict:
    return {"recipe.yaml": yaml.safe_dump({"steps": steps})}


# (case id, argv with {model} {tmp} placeholders, files to create, expected message, must fail before the load)
CASES = [
    # recipe values are type-checked at --check time and before loading (issue: symmetric "false" quantized
    # symmetric; bits 8.0 passed --check then crashed after loading; sparsity "half" crashed)
    ("recipe-symmetric-string", ["compress", "{model}", "{tmp}/recipe.yaml", "--out", "{tmp}/out", "--check"],
     recipe([{"quantize": {"method": "rtn", "symmetric": "false"}}]), "step 1 (quantize): 'symmetric' must be true or false", True),
    ("recipe-bits-float", ["compress", "{model}", "{tmp}/recipe.yaml", "--out", "{tmp}/out", "--check"],
     recipe([{"quantize": {"method": "rtn", "bits": 8.0}}]), "step 1 (quantize): 'bits' must be a whole number", True),
    ("recipe-bits-float-run", ["compress", "{model}", "{tmp}/recipe.yaml", "--out", "{tmp}/out"],
     recipe([{"quantize": {"method": "rtn", "bits": 8.0}}]), "recipe.yaml: step 1 (quantize): 'bits'", True),
    ("recipe-sparsity-string", ["compress", "{model}", "{tmp}/recipe.yaml", "--out", "{tmp}/out"],
     recipe([{"prune": {"method": "magnitude", "sparsity": "half"}}]), "step 1 (prune): 'sparsity' must be", True),
    ("recipe-nested-mixed", ["compress", "{model}", "{tmp}/recipe.yaml", "--out", "{tmp}/out"],
     recipe([{"quantize": {"mixed": {"target_bits": "5"}}}]), "'mixed.target_bits' must be a number", True),
    ("recipe-calibration-string", ["compress", "{model}", "{tmp}/recipe.yaml", "--out", "{tmp}/out"],
     {"recipe.yaml": "steps: [{dtype: bf16}]\ncalibration: lots\n"}, "'calibration' must be a mapping", True),
    ("recipe-not-yaml", ["compress", "{model}", "{tmp}/recipe.yaml", "--out", "{tmp}/out"],
     {"recipe.yaml": "steps: [quantize: {method: rtn"}, "not valid YAML", True),
    # CLI values are range-checked while parsing
    ("max-new-tokens-negative", ["generate", "{model}", "--prompt", "w1", "--max-new-tokens", "-5"], {},
     "--max-new-tokens: must be a whole number >= 1, got -5", True),
    ("threads-negative", ["generate", "{model}", "--prompt", "w1", "--threads", "-1"], {},
     "--threads: must be a whole number from 1", True),
    ("stop-empty", ["generate", "{model}", "--prompt", "w1", "--stop", ""], {}, "--stop: must not be empty", True),
    ("temperature-nan", ["generate", "{model}", "--prompt", "w1", "--temperature", "nan"], {},
     "--temperature: must be a finite number >= 0", True),
    ("seed-too-large", ["generate", "{model}", "--prompt", "w1", "--seed", str(2**63)], {}, "--seed: must be", True),
    ("top-p-zero", ["generate", "{model}", "--prompt", "w1", "--top-p", "0"], {}, "--top-p: must be a finite number > 0", True),
    ("prompt-empty", ["generate", "{model}", "--prompt", ""], {}, "the prompt is empty", True),
    ("gamma-word", ["generate", "{model}", "--prompt", "w1", "--speculate", "lookup", "--gamma", "many"], {},
     "gamma must be a number", True),
    ("bits-float-flag", ["quantize", "{model}", "--bits", "8.0", "--out", "{tmp}/out"], {}, "--bits: expected a whole number", True),
    ("prune-sparsity-word", ["prune", "{model}", "--method", "magnitude", "--sparsity", "half", "--out", "{tmp}/out"], {},
     "--sparsity: expected a number, got 'half'", True),
    ("eval-windows-negative", ["eval", "{model}", "--windows", "-1"], {}, "--windows: must be a whole number >= 0", True),
    ("cost-batch-zero", ["cost", "{model}", "--hw", "h100", "--batch", "0"], {}, "--batch: must be a whole number >= 1", True),
    ("cost-weights-unknown", ["cost", "{model}", "--hw", "h100", "--weights", "int2"], {}, "unknown dtype 'int2'", True),
    ("serve-port-range", ["serve", "{model}", "--port", "70000"], {}, "--port: must be a whole number from 1 to 65535", True),
    ("unknown-flag", ["info", "{model}", "--colour"], {}, "unrecognized arguments: --colour", True),
    # outputs fail before the work
    ("out-parent-is-a-file", ["quantize", "{model}", "--method", "rtn", "--out", "{tmp}/afile/out"],
     {"afile": "not a folder"}, "afile is a file, not a directory", True),
    ("out-dot-force", ["quantize", "{model}", "--method", "rtn", "--out", ".", "--force"], {},
     "is not a directory leanlm wrote", True),
    ("out-foreign-dir-force", ["quantize", "{model}", "--method", "rtn", "--out", "{tmp}/mine", "--force"],
     {"mine/thesis.tex": "years of work"}, "leanlm replaces only its own outputs, even with --force", True),
    ("out-exists", ["export", "{model}", "--format", "gguf", "--out", "{tmp}/m.gguf"], {"m.gguf": "x"},
     "already exists; pass --force", True),
    ("gguf-out-is-a-dir", ["export", "{model}", "--format", "gguf", "--out", "{tmp}/adir", "--force"],
     {"adir/x": "x"}, "is a directory; the output is a file", True),
    ("json-parent-is-a-file", ["info", "{model}", "--json", "{tmp}/afile/info.json"], {"afile": "x"},
     "afile is a file, not a directory", True),
    ("eval-json-is-a-dir", ["eval", "{model}", "--memory", "--json", "{tmp}/adir"], {"adir/x": "x"},
     "is a directory; the output is a file", True),
    ("prune-out-foreign", ["prune", "{model}", "--method", "magnitude", "--sparsity", "0.5", "--out", "{tmp}/d",
                           "--force"], {"d/notes.txt": "mine"}, "not a directory leanlm wrote", True),
    # config.json: invalid JSON, a missing key, a wrong shape
    ("config-invalid-json", ["info", "{tmp}/model"], {"model/config.json": "{bad"}, "config.json is not valid JSON", False),
    ("config-missing-key", ["info", "{tmp}/model"], {"model/config.json": lambda c: {k: v for k, v in c.items()
                                                                                  if k != "hidden_size"}},
     "config.json lacks the key 'hidden_size'", False),
    ("config-a-list", ["info", "{tmp}/model"], {"model/config.json": "[1, 2]"}, "config.json holds a JSON list", False),
    ("config-negative-size", ["info", "{tmp}/model"], {"model/config.json": lambda c: {**c, "vocab_size": -3}},
     "vocab_size must be a positive whole number", False),
    ("config-string-size", ["info", "{tmp}/model"], {"model/config.json": lambda c: {**c, "num_hidden_layers": "3"}},
     "config.json", False),
    ("partial-output", ["info", "{tmp}/model"], {"model/leanlm_output.json": '{"complete": false}'},
     "was still writing when it stopped", False),
    # report: unexpected JSON shapes
    ("report-list", ["report", "{tmp}/r.json", "--out", "{tmp}/r.html"], {"r.json": "[1, 2]"}, "holds a JSON list", True),
    ("report-not-json", ["report", "{tmp}/r.json", "--out", "{tmp}/r.html"], {"r.json": "{"}, "is not valid JSON", True),
    ("report-deep", ["report", "{tmp}/r.json", "--out", "{tmp}/r.html"], {"r.json": "[" * 100000 + "]" * 100000},
     "nests its JSON too deeply", True),
    ("report-wrong-type", ["report", "{tmp}/r.json", "--out", "{tmp}/r.html"],
     {"r.json": json.dumps({"model": "m", "perplexity": {"ppl": "low"}})}, "'perplexity.ppl' is 'low', expected a number",
     True),
]  # fmt: skip


@pytest.fixture()
def no_load(monkeypatch):
    """Make any model load fail loudly (not as a LeanlmError): a case that must fail first never gets there."""

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(LOAD, "resolve", loaded)


def _materialize(tmp: Path, files: dict, model_src: Path) -> None:
    for name, content in files.items():
        path = tmp / name
        if name.startswith("model/"):  # a copy of the tiny model with one file changed
            (tmp / "model").mkdir(exist_ok=True)
            for f in model_src.iterdir():
                if not (tmp / "model" / f.name).exists():
                    (tmp / "model" / f.name).write_bytes(f.read_bytes())
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content = json.dumps(content(json.loads((model_src / path.name).read_text())))
        path.write_text(content)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_leaves_nothing(case, tiny_dirs, tmp_path, monkeypatch, capsys, request):
    _, argv, files, message, before_load = case
    work = tmp_path / "work"
    work.mkdir()
    _materialize(work, files, tiny_dirs["llama"])
    monkeypatch.chdir(work)
    if before_load:
        request.getfixturevalue("no_load")
    before = _snapshot(work)
    argv = [a.format(model=tiny_dirs["llama"], tmp=work) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argument errors exit from the parser
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err and len([x for x in lines if x.startswith("leanlm: error:")]) == 1, err
    assert lines[-1].startswith("leanlm: error:") and message in lines[-1], err
    assert _snapshot(work) == before, "the failed command changed, added or left files"


def test_disk_full_fails_before_the_load(tiny_dirs, tmp_path, monkeypatch, capsys, no_load):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100, 100))
    code = main(["quantize", str(tiny_dirs["llama"]), "--method", "rtn", "--bits", "8", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("leanlm: error:") == 1 and "not enough disk space" in err, err
    assert "estimated from the model's size" in err and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "seteuid"), reason="needs POSIX users")
def test_read_only_folder_fails_before_the_load(tiny_dirs, tmp_path, capsys, no_load):
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))  # outside pytest's private (0700) tree: other users can enter it
    try:
        base.chmod(0o755)
        ro = base / "ro"
        ro.mkdir(mode=0o555)
        ro.chmod(0o555)
        root = os.geteuid() == 0
        if root:  # root writes anywhere: check as an ordinary user (the check reads the effective user)
            os.seteuid(65534)
        try:
            code = main(["quantize", str(tiny_dirs["llama"]), "--method", "rtn", "--out", str(ro / "q")])
        finally:
            if root:
                os.seteuid(0)
        err = capsys.readouterr().err
        assert code == 2 and err.count("leanlm: error:") == 1 and "is not writable by this user" in err, err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)
        import shutil

        shutil.rmtree(base)
