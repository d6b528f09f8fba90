"""Perplexity, KL, multiple-choice scoring and speed/memory reports on tiny models."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DATA, make_tiny_hf, needs_data

from leanlm import LeanlmError
from leanlm.evaluate import tasks
from leanlm.evaluate.data import read_text, wikitext2_test
from leanlm.evaluate.perplexity import kl_divergence, make_windows, perplexity
from leanlm.evaluate.speed import measure_speed, memory_report
from leanlm.model import load_model

TEXT = " ".join(f"w{(i * 7) % 90}" for i in range(400))


def test_perplexity_matches_transformers_loss(tiny_dirs, word_tokenizer):
    hf = make_tiny_hf("llama")
    model = load_model(tiny_dirs["llama"])
    ours = perplexity(model, word_tokenizer, TEXT, seq_len=64, max_windows=5, progress=False)
    theirs = perplexity(hf, word_tokenizer, TEXT, seq_len=64, max_windows=5, progress=False)
    assert ours["tokens"] == 5 * 63 and ours["windows"] == 5
    # reference: transformers' own mean loss per window
    windows = make_windows(word_tokenizer, TEXT, 64, 5)
    with torch.inference_mode():
        losses = [hf(w, labels=w).loss.item() for w in windows]
    assert math.isclose(ours["ppl"], math.exp(sum(losses) / len(losses)), rel_tol=1e-5)
    assert math.isclose(ours["ppl"], theirs["ppl"], rel_tol=1e-5)


def test_kl_is_zero_against_itself_and_positive_against_another(tiny_dirs, word_tokenizer):
    a = load_model(tiny_dirs["llama"])
    same = kl_divergence(a, a, word_tokenizer, TEXT, 32, 3, progress=False)
    assert abs(same["kl"]) < 1e-6 and same["top1_agreement"] == 1.0
    b = load_model(tiny_dirs["llama"], dtype="bfloat16")
    diff = kl_divergence(a, b, word_tokenizer, TEXT, 32, 3, progress=False)
    assert diff["kl"] > 0 and math.isclose(diff["ppl_base"], same["ppl"], rel_tol=1e-6)
    # hand check on one window: KL(p||q) = sum p (log p - log q)
    w = make_windows(word_tokenizer, TEXT, 32, 1)[0]
    with torch.inference_mode():
        lp, lq = F.log_softmax(a(w)[0, :-1], -1), F.log_softmax(b(w)[0, :-1], -1)
    one = kl_divergence(a, b, word_tokenizer, TEXT, 32, 1, progress=False)
    assert math.isclose(one["kl"], (lp.exp() * (lp - lq)).sum(-1).mean().item(), rel_tol=1e-4)


def test_windows_start_with_bos_when_the_tokenizer_adds_it(word_tokenizer):
    from transformers import PreTrainedTokenizerFast

    class BosTokenizer(PreTrainedTokenizerFast):
        def __call__(self, text, add_special_tokens=True, **kw):
            out = super().__call__(text, **kw)
            if add_special_tokens:
                out["input_ids"] = [self.bos_token_id] + out["input_ids"]
            return out

    tok = BosTokenizer(tokenizer_object=word_tokenizer.backend_tokenizer, bos_token="<s>", unk_token="<unk>")
    ws = make_windows(tok, TEXT, 16, 3)
    assert all(w[0, 0].item() == tok.bos_token_id for w in ws) and ws[0].shape == (1, 16)


def test_too_short_text_and_empty_text(word_tokenizer, tmp_path):
    with pytest.raises(LeanlmError, match="fewer than one window"):
        make_windows(word_tokenizer, "w1 w2", 64, 1)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(LeanlmError, match="empty"):
        read_text(str(empty))


def test_encode_pair_moves_trailing_space(word_tokenizer):
    ctx, cont = tasks.encode_pair(word_tokenizer, "w1 w2 ", "w3 w4")
    assert word_tokenizer.decode(cont) == "w3 w4" and len(ctx) == 2


def test_scoring_prefers_the_likely_continuation(tiny_dirs, word_tokenizer):
    """Build a doc whose gold continuation is the model's own greedy output."""
    from leanlm.decode.generate import generate_tokens

    model = load_model(tiny_dirs["llama"])
    ctx = "w1 w2 w3"
    ids = word_tokenizer(ctx).input_ids
    greedy = list(generate_tokens(model, ids, 3, eos_ids=set()))
    good = word_tokenizer.decode(greedy)
    bad = " ".join(f"w{(greedy[0] + 11 + k) % 90}" for k in range(3))
    doc = tasks.Doc([ctx, ctx], [" " + bad, " " + good], gold=1)
    (ll_bad, g_bad), (ll_good, g_good) = tasks.score_choices(model, word_tokenizer, doc, 256)
    assert ll_good > ll_bad and g_good and not g_bad
    # the log-likelihood equals a direct computation
    seq = torch.tensor([ids + greedy])
    with torch.inference_mode():
        lp = F.log_softmax(model(seq)[0], -1)
    direct = sum(lp[len(ids) - 1 + i, t].item() for i, t in enumerate(greedy))
    assert math.isclose(ll_good, direct, rel_tol=1e-5)


def test_unknown_task():
    with pytest.raises(LeanlmError, match="unknown task"):
        tasks.load_docs("nonsense")


@needs_data
def test_task_loaders_read_the_data_dir():
    hs = tasks.load_docs("hellaswag", DATA, limit=3)
    assert len(hs) == 3 and len(hs[0].continuations) == 4 and 0 <= hs[0].gold < 4
    assert hs[0].contexts[0].startswith("Roof shingle removal: A man is sitting on a roof. He")
    wg = tasks.load_docs("winogrande", DATA, limit=1)[0]
    assert wg.contexts == ["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]
    assert wg.gold == 1 and wg.continuations[0] == " always got the easier cases."
    lam = tasks.load_docs("lambada", DATA, limit=1)[0]
    assert lam.continuations == [" signs"]
    for t in tasks.TASKS:
        assert tasks.load_docs(t, DATA, limit=2)


@needs_data
def test_wikitext_string_layout():
    text = wikitext2_test(DATA)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert len(text) > 1_200_000


def test_missing_data_dir_is_explained(monkeypatch):
    monkeypatch.delenv("LEANLM_DATA", raising=False)
    with pytest.raises(LeanlmError, match="--data-dir"):
        read_text("wikitext2")


def test_speed_and_memory_reports(tiny_dirs):
    model = load_model(tiny_dirs["llama"])
    s = measure_speed(model, prompt_len=16, new_tokens=5, runs=2, progress=False)
    assert s["decode_tok_s"]["runs"] == 2 and s["decode_tok_s"]["median"] > 0 and s["prefill_tok_s"]["min"] > 0
    m = memory_report(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert m["weight_mb"] * 2**20 == n_params * 4
    assert m["kv_bytes_per_token"] == 3 * 2 * 2 * 8 * 4
