"""The decode loop: greedy equals recomputing the full sequence, sampling is seeded and filtered."""

import io

import pytest
import torch

from leanlm import LeanlmError
from leanlm.decode.generate import GenerationStats, Sampling, filtered_probs, generate, generate_tokens
from leanlm.model import load_model


@pytest.mark.parametrize("arch", ["llama", "gemma3", "mistral"])
def test_greedy_with_cache_equals_full_recompute(arch, tiny_dirs):
    model = load_model(tiny_dirs[arch])
    prompt = [5, 17, 3, 44, 2]
    got = list(generate_tokens(model, prompt, 12, eos_ids=set()))
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt) :]
    assert model.layers[0].attn.cache is None  # cache released after generation


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny_dirs):
    model = load_model(tiny_dirs["llama"])
    s = Sampling(temperature=1.0, top_p=0.9, seed=7)
    a = list(generate_tokens(model, [1, 2, 3], 10, s, eos_ids=set()))
    b = list(generate_tokens(model, [1, 2, 3], 10, s, eos_ids=set()))
    assert a == b
    greedy = list(generate_tokens(model, [1, 2, 3], 10, eos_ids=set()))
    assert list(generate_tokens(model, [1, 2, 3], 10, Sampling(1.0, top_k=1, seed=3), eos_ids=set())) == greedy


def test_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    p = filtered_probs(logits, Sampling(temperature=1.0, top_k=2))
    assert (p[2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, -1)
    p = filtered_probs(logits, Sampling(temperature=1.0, top_p=0.7))
    # the smallest prefix of sorted tokens whose mass reaches 0.7
    k = int((full.cumsum(-1) < 0.7).sum()) + 1
    assert (p[:k] > 0).all() and (p[k:] == 0).all()


def test_stops_at_eos(tiny_dirs):
    model = load_model(tiny_dirs["llama"])
    greedy = list(generate_tokens(model, [1, 2, 3], 10, eos_ids=set()))
    st = GenerationStats()
    out = list(generate_tokens(model, [1, 2, 3], 10, eos_ids={greedy[3]}, stats=st))
    assert out == greedy[: greedy.index(greedy[3]) + 1] and st.stop_reason == "eos"


def test_stop_string_and_streaming(tiny_dirs, word_tokenizer):
    model = load_model(tiny_dirs["llama"])
    model.config.eos_token_ids = []
    full = generate(model, word_tokenizer, "w1 w2 w3", 8, chat=False)
    words = full.split()
    assert len(words) == 8
    # first word that does not already occur inside the text before it
    k = next(i for i in range(1, 8) if words[i] not in " ".join(words[:i]))
    buf = io.StringIO()
    st = GenerationStats()
    cut = generate(model, word_tokenizer, "w1 w2 w3", 8, chat=False, stop=[words[k]], stream=buf, stats=st)
    assert cut == " ".join(words[:k]) + " " and st.stop_reason == "stop string"
    assert buf.getvalue() == cut + "\n"


def test_prompt_longer_than_context(tiny_dirs):
    model = load_model(tiny_dirs["llama"])
    with pytest.raises(LeanlmError, match="context window is 256"):
        list(generate_tokens(model, list(range(90)) * 3, 4))


def test_bad_sampling_values():
    with pytest.raises(LeanlmError, match="top_p"):
        Sampling(temperature=1.0, top_p=1.5)
    with pytest.raises(LeanlmError, match="temperature"):
        Sampling(temperature=-1)
