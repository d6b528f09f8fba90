"""The lm-evaluation-harness backend: registered as "leanlm", its scores agree with leanlm's own tasks, and its
rolling log-likelihood and generation agree with leanlm's runtime. The harness reads its tasks from local jsonl
(task YAMLs written here; HF_DATASETS_OFFLINE / HF_HUB_OFFLINE keep it off the network)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leanlm
from leanlm.evaluate.data import FILES, data_dir

from conftest import needs_data, needs_smollm2

pytest.importorskip("lm_eval", reason="pip install lm-eval (leanlm[deploy])")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from leanlm.evaluate.lm_eval_backend import LeanlmLM  # noqa: E402  (after the skip: it needs lm_eval)

# leanlm's prompts for the two tasks (evaluate/tasks.py), as harness task YAMLs over the local files
TASK_YAMLS = {
    "arc_easy": """task: leanlm_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: gold
doc_to_choice: choices
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "openbookqa": """task: leanlm_openbookqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: question_stem
doc_to_target: gold
doc_to_choice: choices
metric_list:
  - metric: acc
  - metric: acc_norm
""",
}


def _task_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tasks"
    d.mkdir()
    for task, text in TASK_YAMLS.items():
        (d / f"leanlm_{task}.yaml").write_text(text.format(path=data_dir() / FILES[task]))
    return d


@needs_data
@needs_smollm2
@pytest.mark.real_model
def test_harness_scores_agree_with_leanlm_tasks(smollm2, tmp_path):
    """2 tasks x 50 documents: the harness with the leanlm backend gives leanlm's own per-choice log-likelihoods
    and its accuracy. (acc_norm is compared per document below: the harness divides by the choice's length in
    characters, leanlm's tasks by its length in bytes with the leading space.)"""
    import lm_eval
    import numpy as np
    from lm_eval.tasks import TaskManager

    from leanlm.evaluate.tasks import evaluate_task, load_docs, score_choices

    model, tok = smollm2
    results = lm_eval.simple_evaluate(model=LeanlmLM(model=model, tokenizer=tok), tasks=list(f"leanlm_{t}" for t in TASK_YAMLS),
                                      task_manager=TaskManager(include_path=str(_task_dir(tmp_path))), limit=50,
                                      log_samples=True, bootstrap_iters=0)  # fmt: skip
    for task in TASK_YAMLS:
        ours = evaluate_task(model, tok, task, limit=50, progress=False)
        theirs = results["results"][f"leanlm_{task}"]
        samples = sorted(results["samples"][f"leanlm_{task}"], key=lambda s: s["doc_id"])
        assert len(samples) == ours["n"] == 50
        assert theirs["acc,none"] == pytest.approx(ours["acc"], abs=1e-9), task
        docs = load_docs(task, limit=50)
        norm_theirs = []
        for doc, sample in zip(docs, samples):
            lls = np.array([r[0][0] for r in sample["resps"]])
            ref = np.array([ll for ll, _ in score_choices(model, tok, doc, model.config.max_seq_len)])
            np.testing.assert_allclose(lls, ref, rtol=1e-5, atol=1e-4)
            norm_theirs.append(float((lls / np.array([len(c.strip()) for c in doc.continuations])).argmax() == doc.gold))
        assert theirs["acc_norm,none"] == pytest.approx(np.mean(norm_theirs), abs=1e-9), task


def test_rolling_loglikelihood_and_generation_match_the_runtime(tiny_dirs):
    """loglikelihood_rolling is the summed log-probability of every token of the text (one window, and several
    windows with max_length 8); generate_until is leanlm's greedy decode, cut at the stop string."""
    from lm_eval.api.instance import Instance

    from leanlm.decode.generate import Sampling, generate_tokens

    model, tok = leanlm.load(tiny_dirs["llama"])
    text = " ".join(f"w{(i * 7) % 90}" for i in range(20))
    ids = tok(text, add_special_tokens=False).input_ids
    with torch.inference_mode():
        full = [tok.eos_token_id] + ids  # the harness's first window conditions on the prefix token
        logp = torch.log_softmax(model(torch.tensor([full]))[0].float(), -1)
        want = float(logp[:-1].gather(-1, torch.tensor(full[1:])[:, None]).sum())
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    assert LeanlmLM(model=model, tokenizer=tok).loglikelihood_rolling([req])[0] == pytest.approx(want, rel=1e-4)
    windowed = LeanlmLM(model=model, tokenizer=tok, max_length=8).loglikelihood_rolling([req])[0]
    assert windowed < 0 and windowed != pytest.approx(want, rel=1e-6)  # shorter contexts: a different, finite sum

    lm = LeanlmLM(model=model, tokenizer=tok)
    prompt = "w1 w2 w3"
    greedy = list(generate_tokens(model, tok(prompt, add_special_tokens=False).input_ids, 6, Sampling(), set()))
    words = tok.decode(greedy, skip_special_tokens=True)
    stop = words.split()[2]  # the third generated word
    out = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 6}), 0),
                             Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 6}), 1)])  # fmt: skip
    assert out[0] == words.split(stop)[0] and out[1] == words


def test_lm_eval_cli_runs_the_leanlm_model(tiny_dirs, tmp_path):
    """`python -m leanlm.evaluate.lm_eval_backend --model leanlm --model_args pretrained=...` is lm-eval's CLI with
    the backend registered (plain `lm_eval --model leanlm` does not import it: lm-eval 0.4 has no plugin discovery)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "leanlm.evaluate.lm_eval_backend", "--model", "leanlm", "--model_args",
           f"pretrained={tiny_dirs['llama']}", "--tasks", "leanlm_openbookqa", "--include_path", str(_task_dir(tmp_path)),
           "--limit", "3", "--output_path", str(out)]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "leanlm_openbookqa" in run.stdout and "acc" in run.stdout
    assert list(out.rglob("results_*.json"))
