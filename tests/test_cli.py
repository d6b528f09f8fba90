"""The command line: each verb runs, bad input gives one clear line and exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, needs_data

import leanlm
from leanlm.cli import VERBS, build_parser, main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_has_examples(capsys):
    for verb in VERBS:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"  leanlm {verb} " in out.split("\n\nexample")[1], verb  # an example that runs this verb
        description = out.split("\n\n")[1]  # after the usage block
        assert len(description.split()) >= 8 and not description.startswith(("positional", "options")), verb


def test_one_module_per_verb_behind_a_short_dispatcher():
    cli = Path(leanlm.__file__).parent / "cli"
    assert len((cli / "__init__.py").read_text().splitlines()) <= 200
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert set(sub.choices) == set(VERBS) and all((cli / f"{v}.py").is_file() for v in VERBS)


def test_python_dash_m_leanlm(tiny_dirs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(leanlm.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "leanlm", "info", str(tiny_dirs["qwen2"]), "--json", "-"],
                       capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["architecture"] == "qwen2"
    r = subprocess.run([sys.executable, "-m", "leanlm", "info", "/no/such/model"], capture_output=True, text=True,
                       env=env, timeout=300)  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("leanlm: error: model '/no/such/model' not found")


def test_info_json(tiny_dirs, capsys):
    code, out, _ = run(capsys, "info", str(tiny_dirs["qwen2"]), "--json", "-")
    info = json.loads(out)
    assert code == 0 and info["architecture"] == "qwen2" and info["layers"] == 3
    assert info["parameters"] == sum(d["params"] for d in info["by_kind"].values())


def test_errors_are_one_line_with_exit_2(tiny_dirs, capsys, tmp_path):
    code, _, err = run(capsys, "info", "/no/such/model")
    assert code == 2 and err.startswith("leanlm: error: model '/no/such/model' not found") and err.count("\n") == 1
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    code, _, err = run(capsys, "info", str(tmp_path))
    assert code == 2 and "unsupported architecture 'bert'" in err
    code, _, err = run(capsys, "eval", str(tiny_dirs["llama"]), "--tasks", "mmlu", "--data-dir", str(tmp_path))
    assert code == 2 and "unknown task 'mmlu'" in err


def test_eval_json_is_not_overwritten_without_force(tiny_dirs, capsys, tmp_path):
    out = tmp_path / "run.json"
    out.write_text("{}")
    code, _, err = run(capsys, "eval", str(tiny_dirs["llama"]), "--memory", "--json", str(out))
    assert code == 2 and "--force" in err and out.read_text() == "{}"
    code, _, _ = run(capsys, "eval", str(tiny_dirs["llama"]), "--memory", "--json", str(out), "--force")
    assert code == 0 and "weight_mb" in json.loads(out.read_text())["memory"]


def test_eval_json_records_provenance(tiny_dirs, capsys, tmp_path):
    out = tmp_path / "run.json"
    argv = ["eval", str(tiny_dirs["llama"]), "--memory", "--json", str(out)]
    code, _, _ = run(capsys, *argv)
    p = json.loads(out.read_text())["provenance"]
    assert code == 0 and p["command"] == "leanlm " + " ".join(argv)  # the command typed, not the test runner's
    assert {"commit", "dirty", "date", "machine", "versions"} <= set(p)
    assert p["machine"]["cores"] and "cpu" in p["machine"] and "torch" in p["versions"]


@needs_data
def test_eval_speed_and_task_on_tiny_model(tiny_dirs, capsys, tmp_path):
    # the tiny model has no tokenizer of its own: give it the word-level one
    code, out, err = run(capsys, "eval", str(tiny_dirs["llama"]), "--speed", "--prompt-len", "16",
                         "--new-tokens", "4", "--runs", "1", "--tasks", "piqa,lambada", "--limit", "3",
                         "--ppl", "--seq-len", "16", "--windows", "2", "--json", "-")  # fmt: skip
    r = json.loads(out)
    assert code == 0 and r["speed"]["decode_tok_s"]["median"] > 0
    assert r["tasks"]["piqa"]["n"] == 3 and "acc_norm" in r["tasks"]["piqa"] and "ppl" in r["tasks"]["lambada"]
    assert r["perplexity"]["tokens"] == 2 * 15 and "perplexity" in err  # the table goes to stderr with --json -
