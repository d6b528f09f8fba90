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


# ---- an eval result beside its base model ------------------------------------------------------------------
MACHINE = {"cpu": "Test CPU 9000", "isa": ["avx2", "avx512f"], "cores": 2, "threads": 2}


def eval_json(model, dtype, ppl, prefill, decode, weight_mb, kl=None, windows=8, cpu="Test CPU 9000"):
    """The shape `leanlm eval --json` writes (numbers chosen so that every ratio is easy to check)."""
    r = {"model": model, "dtype": dtype, "threads": 2, "time": "2025-01-01T10:00:00",
         "perplexity": {"text": "wikitext2", "ppl": ppl, "tokens": 4088, "windows": windows, "seq_len": 512},
         "speed": {"threads": 2, "prompt_len": 512, "new_tokens": 64,
                   "prefill_tok_s": {"median": prefill, "min": prefill, "max": prefill, "runs": 3},
                   "ttft_ms": {"median": 1000.0, "min": 1000.0, "max": 1000.0, "runs": 3},
                   "decode_tok_s": {"median": decode, "min": decode, "max": decode, "runs": 3}},
         "memory": {"weight_mb": weight_mb, "kv_bytes_per_token": 46080, "peak_rss_mb": 2 * weight_mb},
         "provenance": {"commit": "0123456789abcdef", "dirty": False, "command": f"leanlm eval {model}",
                        "date": "2025-01-01T10:00:00+00:00", "machine": {**MACHINE, "cpu": cpu},
                        "versions": {"torch": "2.9"}}}  # fmt: skip
    if kl is not None:
        r["kl"] = {"reference": "smollm2-135m", "text": "wikitext2", "kl": kl, "top1_agreement": 0.9, "ppl_base": 10.0,
                   "ppl": ppl, "tokens": 4088, "windows": windows, "seq_len": 512}  # fmt: skip
    return r


@pytest.fixture
def runs(tmp_path):
    files = {"fp32": eval_json("smollm2-135m", "float32", 10.0, 400.0, 20.0, 500.0),
             "bf16": eval_json("smollm2-135m", "bfloat16", 10.1, 500.0, 40.0, 250.0),
             "int4": eval_json("runs/smollm2-gptq4", "float32", 10.5, 250.0, 100.0, 50.0, kl=0.1234)}  # fmt: skip
    for name, d in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
    return {name: tmp_path / f"{name}.json" for name in files}


def test_eval_report_sets_the_result_beside_the_fastest_base(runs, capsys):
    assert main(["report", str(runs["int4"]), "--base", str(runs["fp32"]), "--base", str(runs["bf16"])]) == 0
    out = capsys.readouterr().out
    page = runs["int4"].with_suffix(".html").read_text()
    # ratios against bf16, the faster base: decode 100/40, weights 250/50, ppl 10.5/10.1, prefill 250 vs 500
    for text in ("2.50x faster", "5.00x smaller", "+4.0%", "2.00x slower", "0.1234", "90.0"):
        assert text in page and text in out, text
    assert "90.0%" in page  # top-1 agreement
    assert "the fastest base given" in page and "smollm2-135m · bfloat16" in page
    assert "<svg" in page and "<img" not in page  # the plot is inline: one self-contained file
    assert "Test CPU 9000" in page and "0123456789" in page and "2025-01-01 10:00 UTC" in page  # provenance footer
    assert all(s in page for s in ("Perplexity", "Decode", "Prefill", "Weights in memory", "Peak memory"))
    assert "5.00x less" not in page and "includes the float32 KL reference" in page  # 100 MB vs 500: not comparable


def test_eval_report_without_base_uses_the_kl_reference(runs, tmp_path):
    page = render(runs["int4"], tmp_path / "alone.html").read_text()
    assert "+5.0%" in page and "smollm2-135m · float32" in page  # ppl 10.5 vs the reference's 10.0
    assert "pass --base" in page


def test_eval_report_warns_when_runs_are_not_comparable(tmp_path, runs):
    other = eval_json("smollm2-135m", "float32", 10.0, 400.0, 20.0, 500.0, windows=40, cpu="Other CPU")
    (tmp_path / "other.json").write_text(json.dumps(other))
    page = render(runs["int4"], tmp_path / "w.html", base=tmp_path / "other.json").read_text()
    assert "windows 8 vs 40" in page and "different machines" in page
    assert "bfloat16 base is usually faster" in page  # a float32 base alone flatters the speed ratios


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected an object"),
    ('{"speed": [1, 2], "perplexity": {"ppl": 3.0}}', "'speed' is list, expected an object"),
    ('{"speed": {"decode_tok_s": "fast"}}', "'speed.decode_tok_s' is 'fast', expected a number"),
    ('{"trials": [1, "x", {"ppl": "a"}], "speed": {"e": 3}}', None),  # odd shapes in a generic JSON: still a page
])  # fmt: skip
def test_report_gives_clear_errors_on_unexpected_shapes(tmp_path, content, message):
    src = tmp_path / "odd.json"
    src.write_text(content)
    if message is None:
        assert render(src).is_file()
    else:
        with pytest.raises(LeanlmError, match=message.replace("[", r"\[")):
            render(src)


def test_report_base_must_be_an_eval_result(runs, tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"speed": {"leanlm": {"decode_tok_s": 3.0}}}))
    assert main(["report", str(runs["int4"]), "--base", str(bench)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leanlm: error: base") and "holds no leanlm eval figures" in err and err.count("\n") == 1
    assert main(["report", str(bench), "--base", str(runs["bf16"])]) == 2
    assert "--base compares two `leanlm eval --json` results" in capsys.readouterr().err
