"""The report renders the expected plots and tables."""

import json

import pytest

from leanlm import LeanlmError
from leanlm.cli import main
from leanlm.report import pareto_front, render


def test_pareto_front():
    pts = [(10.0, 5.0), (11.0, 9.0), (12.0, 8.0), (10.5, 5.0), (13.0, 12.0)]
    assert pareto_front(pts) == [0, 1, 4]  # (12, 8) and (10.5, 5) are dominated


def test_report_from_benchmark_and_search(tmp_path, capsys):
    run = {"speed": {"leanlm-bf16": {"prefill_tok_s": 500.0, "decode_tok_s": 35.0},
                     "transformers-fp32": {"prefill_tok_s": 480.0, "decode_tok_s": 18.0}},
           "trials": [{"name": "base", "ppl": 20.0, "decode_tok_s": 18.0}, {"name": "int8", "ppl": 20.1, "decode_tok_s": 40.0},
                      {"name": "bad", "ppl": 25.0, "decode_tok_s": 30.0}],
           "sensitivity": {"layers.0.attn.wqkv": 0.02, "layers.0.mlp.w_down": 0.05},
           "verification": [{"name": "fp32", "measured": 18.0, "predicted": 17.0}]}  # fmt: skip
    src = tmp_path / "run.json"
    src.write_text(json.dumps(run))
    assert main(["report", str(src)]) == 0
    out = capsys.readouterr().out
    assert "leanlm-bf16" in out and "*pareto" in out
    page = (tmp_path / "run.html").read_text()
    for name in ("run-speed0.png", "run-pareto0.png", "run-sensitivity0.png", "run-verify0.png"):
        assert (tmp_path / name).stat().st_size > 1000 and name in page
    assert "transformers-fp32" in page and "layers.0.mlp.w_down" in page
    with pytest.raises(LeanlmError, match="--force"):
        render(src)


def test_report_errors(tmp_path):
    with pytest.raises(LeanlmError, match="not found"):
        render(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(LeanlmError, match="not valid JSON"):
        render(bad)
