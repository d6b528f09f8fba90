"""leanlm.evaluate.needle: prompt length, needle placement, scoring slice, recall check."""

import pytest
from conftest import needs_smollm2

from leanlm.errors import LeanlmError
from leanlm.evaluate.needle import make_case, recalled

BOOK = " ".join(f"w{i % 90} the end ." if i % 7 == 0 else f"w{i % 90} w{(3 * i) % 90}" for i in range(6000))


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.9])
def test_case_fits_and_places_the_needle(word_tokenizer, depth):
    case = make_case(word_tokenizer, BOOK, context=400, depth=depth, seed=1, offset=100, score=64)
    assert 360 <= len(case.ids) <= 400
    assert len(case.answer) == 6 and case.answer.isdigit()
    lo, hi = case.score_range
    assert case.needle_token < lo <= hi < len(case.ids) and hi - lo <= 64
    # the needle sits near the requested depth of the prompt
    assert abs(case.needle_token / len(case.ids) - depth) < 0.1
    # seeded: the same case twice, a different number for another depth
    assert make_case(word_tokenizer, BOOK, 400, depth, seed=1, offset=100).answer == case.answer


def test_too_short_text_is_an_error(word_tokenizer):
    with pytest.raises(LeanlmError, match="haystack"):
        make_case(word_tokenizer, "w1 w2 w3", context=400, depth=0.5)
    with pytest.raises(LeanlmError, match="depth"):
        make_case(word_tokenizer, BOOK, context=400, depth=1.5)


@needs_smollm2
def test_recall_check_with_a_real_tokenizer(smollm2):
    _, tok = smollm2
    text = " ".join(["It was a bright cold day in April, and the clocks were striking thirteen."] * 400)
    case = make_case(tok, text, context=1024, depth=0.5, seed=3, offset=10)
    assert len(case.ids) <= 1024
    prompt = tok.decode(case.ids)
    assert f"The secret passphrase is {case.answer}." in prompt
    assert prompt.rstrip().endswith("The secret passphrase is")  # the answer is primed
    assert recalled(tok, tok(f" {case.answer}.", add_special_tokens=False).input_ids, case)
    assert not recalled(tok, tok(f" {case.answer}7", add_special_tokens=False).input_ids, case)
    assert not recalled(tok, tok(" 123", add_special_tokens=False).input_ids, case)
