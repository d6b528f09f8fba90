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
from conftest import make_tiny_hf, make_word_tokenizer, needs_smollm2

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


LOADERS = ("from_pretrained", "from_config")


def test_every_transformers_loader_call_passes_trust_remote_code_false():
    """Source audit: each from_pretrained / from_config call in leanlm names trust_remote_code=False, so a new
    call cannot quietly fall back to transformers' question on stdin."""
    import ast

    calls = []
    for path in sorted((SRC / "leanlm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOADERS:
                kw = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kw.get("trust_remote_code"), ast.Constant) and kw["trust_remote_code"].value is False
                calls.append((f"{path.relative_to(SRC)}:{node.lineno}", safe))
    assert len(calls) >= 5, calls  # the audit sees the loaders (config, tokenizer, model, GGUF paths)
    assert [where for where, safe in calls if not safe] == []


@pytest.mark.real_model
@needs_smollm2
def test_a_gguf_beside_planted_code_never_runs_it(planted, tmp_path, monkeypatch):
    """A .gguf in a folder whose config and tokenizer config name custom code: converting it reads the GGUF
    alone (transformers' gguf_file= loaders see a folder holding only the file), so nothing of the folder runs."""
    from leanlm.model.load import DEFAULT_MODELS

    d, marker = planted
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))  # a fresh cache: the conversion really runs
    monkeypatch.setattr(builtins, "input", lambda *a, **k: "y")
    (d / "model.gguf").symlink_to(DEFAULT_MODELS["smollm2-135m"]())
    model, tok = leanlm.load(d / "model.gguf")
    assert model.config.n_layers == 30 and tok("Hello").input_ids
    assert not marker.exists(), marker.read_text()


def make_tiny_dir(d: Path) -> Path:
    make_tiny_hf("llama").save_pretrained(d)
    make_word_tokenizer().save_pretrained(d)
    return d


def test_a_verb_that_did_not_ask_for_stdin_cannot_read_it(tmp_path, monkeypatch, capsys):
    """While a verb runs, sys.stdin is empty: a "y" piped in never reaches a question asked on the way."""
    import io

    from leanlm.cli import info, main

    answers = []
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    monkeypatch.setattr(info, "model_info", lambda model: answers.append(sys.stdin.read()) or {"ok": True})
    assert main(["info", str(make_tiny_dir(tmp_path / "m")), "--json", "-"]) == 0
    assert answers == [""] and sys.stdin.read() == "y\n"  # the user's stdin is back, unread


def test_generate_reads_stdin_only_as_its_prompt_and_never_waits_on_a_terminal(tmp_path, monkeypatch, capsys):
    import io

    from leanlm.cli import main

    d = make_tiny_dir(tmp_path / "m")
    monkeypatch.setattr(sys, "stdin", io.StringIO("w1 w2 w3"))
    assert main(["generate", str(d), "--no-chat", "--max-new-tokens", "2", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == 3

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("w1"))
    assert main(["generate", str(d), "--no-chat"]) == 2
    assert "no prompt: pass --prompt TEXT" in capsys.readouterr().err
