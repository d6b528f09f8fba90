"""The command line: each verb runs, bad input gives one clear line and exit code 2."""

import json

import pytest
from conftest import DATA, needs_data

from leanlm.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_has_examples(capsys):
    for verb in ("info", "generate", "eval"):
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        assert "example" in capsys.readouterr().out


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
