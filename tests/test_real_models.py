"""Integration on the real default models (SmolLM2-135M, Gemma 3 270M): parity with
transformers, perplexity agreement, the bf16 path, chat generation. Skipped when the model
wheels are not installed; the README's test command installs them."""

import pytest
import torch
from conftest import DATA, needs_data, needs_gemma3, needs_smollm2

from leanlm.decode.generate import generate
from leanlm.evaluate.data import wikitext2_test
from leanlm.evaluate.perplexity import perplexity

SENTENCE = "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in Paris."

pytestmark = pytest.mark.real_model


def _hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@needs_smollm2
def test_smollm2_logits_match_transformers(smollm2):
    model, tok = smollm2
    hf = _hf(model.directory)
    ids = tok(SENTENCE, return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = hf(ids).logits
        assert (model(ids) - ref).abs().max().item() <= 1e-4
        model.setup_cache(1, ids.shape[1])
        model(ids[:, :-1], start=0)
        step = model(ids[:, -1:], start=ids.shape[1] - 1)[0, -1]
        model.clear_cache()
    assert (step - ref[0, -1]).abs().max().item() <= 1e-4


@needs_smollm2
@needs_data
def test_smollm2_perplexity_equals_transformers_and_bf16_is_close(smollm2):
    model, tok = smollm2
    text = wikitext2_test(DATA)
    ours = perplexity(model, tok, text, 512, 4, progress=False)
    theirs = perplexity(_hf(model.directory), tok, text, 512, 4, progress=False)
    assert f"{ours['ppl']:.4g}" == f"{theirs['ppl']:.4g}"
    from leanlm import load

    bf16, _ = load("smollm2-135m", dtype="bfloat16")
    p16 = perplexity(bf16, tok, text, 512, 4, progress=False)["ppl"]
    assert abs(p16 / ours["ppl"] - 1) < 0.002  # the bf16 path keeps quality within 0.2%


@needs_smollm2
def test_smollm2_chat_generation_answers(smollm2):
    model, tok = smollm2
    text = generate(model, tok, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in text


@needs_gemma3
def test_gemma3_logits_match_transformers():
    from leanlm import load

    model, tok = load("gemma3-270m")
    hf = _hf(model.directory)
    ids = tok(SENTENCE, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.inference_mode():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4
    out = generate(model, tok, "The capital of France is", max_new_tokens=8, chat=False)
    assert len(tok(out, add_special_tokens=False).input_ids) >= 4  # a continuation, not an immediate EOS
