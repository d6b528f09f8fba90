"""Cascades: live runs equal the replay of each rung's answers, the thresholds' limits, DeepConf confidence."""

from __future__ import annotations

import json
import math

import pytest
from conftest import DATA

from leanlm.adaptive.cascade import (Cascade, Rung, check_shared_tokenizer, evaluate_task_cascade, replay,
                                     score_doc, trace_confidence)  # fmt: skip
from leanlm.errors import LeanlmError

needs_data = pytest.mark.skipif(not (DATA / "arc").is_dir(), reason="needs LEANLM_DATA")


@pytest.fixture(scope="module")
def ladder(tiny_dirs):
    from leanlm import load

    small, tok = load(str(tiny_dirs["llama"]), "float32")
    large, _ = load(str(tiny_dirs["qwen2"]), "float32")
    rungs = [Rung("small", small, step_s=1.0, token_s=0.01), Rung("large", large, step_s=4.0, token_s=0.04)]
    return rungs, tok


@needs_data
def test_a_live_cascade_equals_the_replay_of_each_rungs_answers(ladder):
    from leanlm.evaluate.tasks import evaluate_task, load_docs

    rungs, tok = ladder
    docs = load_docs("arc_easy", None, 12)
    per_rung = [[score_doc(r.model, tok, d) for d in docs] for r in rungs]
    confs = sorted(a["conf"] for a in per_rung[0])
    th = (confs[5] + confs[6]) / 2  # about half the documents escalate
    live = evaluate_task_cascade(Cascade(rungs, [th]), tok, "arc_easy", limit=12, progress=False)
    rep = replay(per_rung, [th], rungs, [d.gold for d in docs])
    assert live["acc"] == pytest.approx(rep["acc"])
    assert live["answered_share"] == pytest.approx(rep["answered_share"])
    assert rep["answered_share"] == pytest.approx([0.5, 0.5]), confs
    assert live["cost_share_of_large"] == pytest.approx(rep["cost_share_of_large"])
    assert 0 < rep["cost_share_of_large"] < 1.25 + 1e-9  # small (1/4 the price) for all + large for half
    # the limits: a threshold of 0 never escalates (the small model's accuracy), 1 always does (the large one's)
    assert replay(per_rung, [0.0], rungs, [d.gold for d in docs])["acc"] == pytest.approx(
        evaluate_task(rungs[0].model, tok, "arc_easy", limit=12, progress=False)["acc"])
    always = replay(per_rung, [1.0], rungs, [d.gold for d in docs])
    assert always["acc"] == pytest.approx(evaluate_task(rungs[1].model, tok, "arc_easy", limit=12, progress=False)["acc"])
    assert always["cost_share_of_large"] == pytest.approx(1.25)


def test_deepconf_trace_confidence():
    confs = [5.0] * 10 + [1.0] * 4 + [5.0] * 10
    assert trace_confidence(confs, 4, "lowest_group") == pytest.approx(1.0)  # the window over the dip
    assert trace_confidence(confs, 4, "tail") == pytest.approx(5.0)
    assert trace_confidence(confs, 8, "lowest_group") == pytest.approx((4 * 5 + 4 * 1) / 8)
    assert trace_confidence([], 4, "tail") == math.inf


def test_cascade_settings_are_checked(ladder, tiny_dirs):
    rungs, tok = ladder
    with pytest.raises(LeanlmError, match="needs 1 thresholds"):
        Cascade(rungs, [0.5, 0.6])
    with pytest.raises(LeanlmError, match="at least two models"):
        Cascade(rungs[:1], [])

    class Other:
        def __call__(self, text):
            class E:
                input_ids = [1, 2, 3]
            return E()

    with pytest.raises(LeanlmError, match="does not share"):
        check_shared_tokenizer([tok, Other()], ["a", "b"])


@needs_data
def test_eval_cascade_cli(tiny_dirs, tmp_path, capsys):
    from leanlm.cli import main

    out = tmp_path / "c.json"
    assert main(["eval", str(tiny_dirs["llama"]), "--tasks", "arc_easy", "--limit", "4", "--cascade",
                 str(tiny_dirs["llama_untied"]), "--cascade-threshold", "0.5", "--hw", "h100", "--json", str(out)]) == 0  # fmt: skip
    r = json.loads(out.read_text())["tasks"]["arc_easy"]
    assert r["n"] == 4 and sum(r["answered_share"]) == pytest.approx(1.0) and len(r["models"]) == 2
    assert main(["eval", str(tiny_dirs["llama"]), "--cascade", str(tiny_dirs["llama_untied"])]) != 0
    assert "add --tasks" in capsys.readouterr().err
    # a tokenizer that encodes differently (transformers loads the tiny Qwen2 directory with its own Qwen2
    # tokenizer class, which encodes the probe otherwise) is refused, naming the model
    assert main(["eval", str(tiny_dirs["llama"]), "--tasks", "arc_easy", "--limit", "2", "--cascade",
                 str(tiny_dirs["qwen2"]), "--hw", "h100"]) != 0  # fmt: skip
    assert "does not share" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [("high", "takes probabilities"), ("1.5", "must be in [0, 1]")])
def test_eval_cascade_threshold_errors_name_the_fix(tiny_dirs, capsys, bad, message):
    from leanlm.cli import main

    assert main(["eval", str(tiny_dirs["llama"]), "--tasks", "arc_easy", "--limit", "2", "--cascade",
                 str(tiny_dirs["llama_untied"]), "--cascade-threshold", bad, "--hw", "h100"]) != 0  # fmt: skip
    assert message in capsys.readouterr().err
