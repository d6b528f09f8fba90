"""No code from a model folder ever runs: a folder may carry an `auto_map` and .py files, and transformers
asks "run custom code? [y/N]" on stdin, where a "y" can arrive as the first line of a piped prompt.
leanlm passes trust_remote_code=False to every transformers loader, so the planted modules never import."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import leanlm
from conftest import make_tiny_hf, make_word_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"
EVIL_MODULES = ("modeling_evil", "tokenization_evil", "configuration_evil")


@pytest.fixture()
def planted(tmp_path):
    """(model folder whose config and tokenizer point at marker-writing modules, the marker's path)."""
    d, marker = tmp_path / "model", tmp_path / "MARKER"
    make_tiny_hf("llama").save_pretrained(d)
    make_word_tokenizer().save_pretrained(d)
    for mod in EVIL_MODULES:  # each writes the marker when imported, i.e. when transformers runs it
        (d / f"{mod}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran {mod}')\n")
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel",
                "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}  # fmt: skip
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "auto_map": auto_map}))
    tok = json.loads((d / "tokenizer_config.json").read_text())
    tok.update(auto_map={"AutoTokenizer": auto_map["AutoTokenizer"]}, tokenizer_class="EvilTokenizer")
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    return d, marker


def _run(code: str, args: list[str], stdin: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def test_loading_a_planted_folder_never_runs_its_code(planted, monkeypatch):
    """In-process: every question transformers might ask is answered "y"; still nothing runs."""
    from leanlm.export import check_transformers_load
    from leanlm.model import load_model

    d, marker = planted
    monkeypatch.setattr(builtins, "input", lambda *a, **k: "y")
    with pytest.raises(leanlm.LeanlmError, match="never runs code from a model folder"):
        leanlm.load(d)
    assert not marker.exists(), marker.read_text()
    load_model(d)  # the weights and config load without the folder's code
    assert check_transformers_load(d).loadable  # a llama: transformers' own class, never the folder's
    assert not marker.exists(), marker.read_text()


def test_library_load_with_yes_on_stdin_never_runs_folder_code(planted):
    d, marker = planted
    p = _run("import sys, leanlm; leanlm.load(sys.argv[1])", [str(d)], "y\n" * 8)
    assert not marker.exists(), (marker.read_text(), p.stderr[-2000:])
    assert p.returncode != 0 and "never runs code from a model folder" in p.stderr, p.stderr[-2000:]


def test_cli_generate_with_y_as_first_prompt_line_never_runs_folder_code(planted):
    d, marker = planted
    code = "import sys; from leanlm.cli import main; sys.exit(main(sys.argv[1:]))"
    p = _run(code, ["generate", str(d), "--no-chat", "--max-new-tokens", "3"], "y\nw1 w2 w3\n")
    assert not marker.exists(), (marker.read_text(), p.stderr[-2000:])
    assert p.returncode == 2 and "never runs code from a model folder" in p.stderr, (p.returncode, p.stderr[-2000:])
