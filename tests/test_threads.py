"""The decode thread governor: it keeps the fastest thread count, moves off a count that slowed down,
and a fixed setting never changes the count."""

import pytest
import torch

from leanlm.decode.threads import ThreadGovernor, candidate_counts
from leanlm.errors import LeanlmError


def drive(gov: ThreadGovernor, seconds_for, steps: int) -> list[int]:
    """Run the governor's pick/record loop with simulated step times; returns the count used per step."""
    used = []
    for i in range(steps):
        n, probe = gov._pick()
        gov._record(n, seconds_for(i, n), probe)
        used.append(n)
    return used


def test_candidate_counts():
    assert candidate_counts(2) == [2, 1]
    assert candidate_counts(8) == [8, 4, 2, 1]
    assert candidate_counts(6) == [6, 3, 1]
    assert candidate_counts(1) == [1]


def test_idle_machine_keeps_all_threads_and_probes_rarely():
    gov = ThreadGovernor(max_threads=2, adapt=True)
    used = drive(gov, lambda i, n: 0.010 if n == 2 else 0.016, 512)
    assert gov.current == 2
    probes = used.count(1)
    assert 1 <= probes <= 8, probes  # interval doubles 16 -> 128: a handful of probes in 512 steps
    assert used[-100:].count(1) <= 1


def test_busy_core_moves_to_one_thread_and_back():
    busy = range(100, 300)  # steps during which another process holds a core
    gov = ThreadGovernor(max_threads=2, adapt=True)

    def seconds(i, n):
        if i in busy:
            return 0.050 if n == 2 else 0.016
        return 0.010 if n == 2 else 0.016

    used = drive(gov, seconds, 700)
    assert used[60:100].count(2) >= 39  # idle: two threads, at most one probe
    assert used[110:300].count(1) > 150  # the slowdown triggers a probe; one thread wins while busy
    assert gov.current == 2  # after the load goes, a probe finds two threads faster again
    assert used[-50:].count(2) >= 49


def test_fixed_thread_count_never_changes():
    gov = ThreadGovernor(max_threads=2, adapt=False)
    used = drive(gov, lambda i, n: 0.050 if n == 2 else 0.001, 100)
    assert set(used) == {2}


def test_env_switch_turns_adaptation_off(monkeypatch):
    monkeypatch.setenv("LEANLM_ADAPT_THREADS", "0")
    assert not ThreadGovernor(max_threads=2).adapt
    monkeypatch.setenv("LEANLM_ADAPT_THREADS", "1")
    assert ThreadGovernor(max_threads=2).adapt
    monkeypatch.setenv("LEANLM_ADAPT_THREADS", "off")
    with pytest.raises(LeanlmError, match="LEANLM_ADAPT_THREADS='off'"):
        ThreadGovernor(max_threads=2)


def test_generate_restores_threads_and_reports(tiny_model):
    from leanlm.decode.generate import GenerationStats, generate_tokens

    model = tiny_model
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        st_fixed, st_adapt = GenerationStats(), GenerationStats()
        fixed = list(generate_tokens(model, [1, 2, 3], 40, eos_ids=set(), stats=st_fixed, adapt_threads=False))
        adapted = list(generate_tokens(model, [1, 2, 3], 40, eos_ids=set(), stats=st_adapt, adapt_threads=True))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert fixed == adapted  # the thread count does not change greedy tokens
    assert st_fixed.extra["threads"]["steps_per_thread_count"] == {2: 39}
    assert sum(st_adapt.extra["threads"]["steps_per_thread_count"].values()) == 39
    assert 1 in st_adapt.extra["threads"]["steps_per_thread_count"]  # it did probe one thread


@pytest.fixture
def tiny_model(tiny_dirs):
    import leanlm

    return leanlm.load(tiny_dirs["llama"])[0]
