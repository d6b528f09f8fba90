"""Continuous batching (decode/batch.py, Transformer.decode_rows): sequences at different positions, each with
its own caches, decoded in one forward per step give exactly what each gives alone."""

import pytest
import torch
from conftest import needs_smollm2

from leanlm import ops
from leanlm.decode.batch import Sequence, batchable, generate_batch, step
from leanlm.decode.generate import Sampling, generate_tokens
from leanlm.model import load_model

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C++ compiler for the fused decode kernels")

# prompts of different lengths: the sequences sit at different positions in every batched step
PROMPTS = [[5, 9, 14], [3, 40, 41, 8, 77, 12, 6], [60], [22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32], [90, 2]]


def _alone(model, prompts, max_new, samplings=None, eos=frozenset()):
    samplings = samplings or [Sampling()] * len(prompts)
    return [list(generate_tokens(model, p, max_new, s, set(eos), adapt_threads=False)) for p, s in zip(prompts, samplings)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_batched_greedy_equals_each_sequence_alone(arch, dtype, tiny_dirs):
    """Greedy tokens of 5 prompts decoded together = each decoded alone (qkv bias, QK-norm and sliding windows)."""
    model = load_model(tiny_dirs[arch], dtype=dtype)
    assert batchable(model)
    assert generate_batch(model, PROMPTS, 20, eos_ids=set()) == _alone(model, PROMPTS, 20)


def test_batched_logits_are_bitwise_those_of_one_sequence(tiny_dirs):
    """The logits rows of a batched step are bit for bit the single-sequence forward's."""
    model = load_model(tiny_dirs["llama"], dtype="bfloat16")
    seqs = [Sequence(model, p, 8, eos_ids=set()) for p in PROMPTS]
    batched = model.decode_rows([s.token for s in seqs], [s.pos for s in seqs], [s.caches for s in seqs])
    for s, row in zip(seqs, batched):  # the same step alone, on a fresh prefill
        alone = Sequence(model, PROMPTS[seqs.index(s)], 8, eos_ids=set())
        assert torch.equal(row, model.decode_rows([alone.token], [alone.pos], [alone.caches])[0])
        for layer, cache in zip(model.layers, alone.caches):
            layer.attn.cache = cache
        with torch.inference_mode():
            ref = model(torch.tensor([[alone.token]]), start=alone.pos)[0, -1]
        model.clear_cache()
        assert torch.equal(row, ref)


def test_sequences_join_and_leave_between_steps(tiny_dirs):
    """A sequence that joins a running batch, and one that leaves early, change nobody's tokens."""
    model = load_model(tiny_dirs["qwen2"], dtype="bfloat16")
    budgets = [18, 4, 12, 9, 15]
    want = [_alone(model, [p], n)[0] for p, n in zip(PROMPTS, budgets)]
    got: dict[int, list[int]] = {}
    live: dict[int, Sequence] = {}
    for t in range(40):
        if t % 3 == 0 and len(got) < len(PROMPTS):  # one joins every third step
            i = len(got)
            live[i] = Sequence(model, PROMPTS[i], budgets[i], eos_ids=set())
            got[i] = [live[i].token]
        for i in [i for i, s in live.items() if s.finished]:
            live.pop(i).release()
        if live:
            step(model, list(live.values()))
            for i, s in live.items():
                got[i].append(s.token)
    assert [got[i] for i in range(len(PROMPTS))] == want


def test_sampled_with_seeds_and_eos(tiny_dirs):
    """Sampling with a seed per sequence is exact too, and a sequence stops at its EOS as it does alone."""
    model = load_model(tiny_dirs["llama"])
    samplings = [Sampling(temperature=0.9, top_p=0.95, seed=s) for s in range(len(PROMPTS))]
    alone = _alone(model, PROMPTS, 24, samplings)
    eos = {alone[1][5]}  # a token the second prompt samples: it must stop there, the others where they stop alone
    assert generate_batch(model, PROMPTS, 24, samplings, eos_ids=eos) == _alone(model, PROMPTS, 24, samplings, eos)


def test_more_sequences_than_one_kernel_call(tiny_dirs):
    """More than ops.MAX_ROWS sequences run in chunks of MAX_ROWS, still exact."""
    model = load_model(tiny_dirs["llama"], dtype="bfloat16")
    prompts = [[(7 * i + j) % 97 for j in range(1 + i % 5)] for i in range(ops.MAX_ROWS + 3)]
    assert generate_batch(model, prompts, 6, eos_ids=set()) == _alone(model, prompts, 6)


def test_quantized_model_batched_equals_alone(tiny_dirs):
    """Packed int8 and int4 weights (q_linear over the stacked rows) keep every sequence's tokens."""
    from leanlm.quant import RTN, quantize

    for bits in (8, 4):
        model = load_model(tiny_dirs["llama"], dtype="bfloat16")
        quantize(model, RTN(bits=bits, group=32), progress=False)
        assert batchable(model)
        assert generate_batch(model, PROMPTS, 12, eos_ids=set()) == _alone(model, PROMPTS, 12)


def test_models_that_cannot_batch_say_so(tiny_dirs):
    """A model carrying a KV-cache policy, or without the fused step, is not batchable; Sequence refuses it."""
    from leanlm.errors import LeanlmError

    model = load_model(tiny_dirs["llama"])
    model.fused_decode = False
    assert not batchable(model)
    with pytest.raises(LeanlmError, match="cannot be decoded in a batch"):
        Sequence(model, [1, 2, 3], 4)


@pytest.mark.real_model
@needs_smollm2
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_real_model_batched_equals_alone(dtype):
    """SmolLM2-135M: 6 short prompts decoded together give each prompt's own greedy tokens."""
    import leanlm

    model, tok = leanlm.load("smollm2-135m", dtype=dtype)
    prompts = [tok(f"Two short facts about {w}:\n1.").input_ids for w in ("the moon", "rivers", "owls", "glass",
                                                                          "chess", "coral reefs")]  # fmt: skip
    assert generate_batch(model, prompts, 24, eos_ids=set()) == _alone(model, prompts, 24)
