"""Per-step thread count for decode, chosen from measured step times.

Why: a decode step is a chain of ~200 short parallel regions (one per product). When another process
takes one of the cores, every region waits in its barrier for the thread the OS descheduled, and a
2-thread step can take 5x as long as on an idle machine (llama.cpp suffers the same). One thread on
the core still free then runs far faster. The governor times each step and, now and then, tries the
other thread counts for one step; it keeps whichever is fastest. On an idle machine the probes lose
and grow rarer (the interval doubles up to `max_interval` steps), so they cost little; a sudden
slowdown of the current choice probes again at once.

`LEANLM_ADAPT_THREADS=0` (or `adapt=False`) keeps the thread count fixed.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch

EMA = 0.3  # weight of the newest step in the running step time of a thread count
SWITCH_MARGIN = 0.95  # a probe must be 5% faster than the current choice to take over
SLOWDOWN = 1.6  # a step this much slower than its running time suggests the machine changed: probe next


def adapt_enabled() -> bool:
    value = os.environ.get("LEANLM_ADAPT_THREADS", "1").strip()
    if value not in ("0", "1"):
        from ..errors import LeanlmError

        raise LeanlmError(f"LEANLM_ADAPT_THREADS={value!r}: use 1 (adapt the thread count per step, the default) "
                          "or 0 (keep it fixed)")  # fmt: skip
    return value == "1"


def candidate_counts(max_threads: int) -> list[int]:
    """The thread counts tried: the maximum and its halvings down to 1 (e.g. 8, 4, 2, 1)."""
    out, n = [], max_threads
    while n >= 1:
        out.append(n)
        n //= 2
    if out[-1] != 1:
        out.append(1)
    return out


class ThreadGovernor:
    """Choose the intra-op thread count for each decode step.

    Use: `with gov.step(): logits = model(...)` around every one-token step."""

    def __init__(self, max_threads: int | None = None, adapt: bool | None = None, min_interval: int = 16,
                 max_interval: int = 128):  # fmt: skip
        self.max_threads = max_threads or torch.get_num_threads()
        self.adapt = adapt_enabled() if adapt is None else adapt
        self.counts = candidate_counts(self.max_threads) if self.adapt else [self.max_threads]
        self.current = self.max_threads
        self.seconds: dict[int, float] = {}  # running step time per thread count
        self.min_interval, self.max_interval = min_interval, max_interval
        self.interval = min_interval
        self.countdown = 4  # let the first steps (warm caches) set the current count's time first
        self.next_probe = 0  # index into the other counts, round robin
        self.steps: dict[int, int] = {}  # steps run per thread count (reported in stats)

    def _pick(self) -> tuple[int, bool]:
        if len(self.counts) == 1:
            return self.current, False
        self.countdown -= 1
        if self.countdown > 0 or self.current not in self.seconds:
            return self.current, False
        others = [n for n in self.counts if n != self.current]
        n = others[self.next_probe % len(others)]
        self.next_probe += 1
        return n, True

    def _record(self, n: int, seconds: float, probe: bool) -> None:
        self.steps[n] = self.steps.get(n, 0) + 1
        prev = self.seconds.get(n)
        if probe:
            self.seconds[n] = seconds  # fresh: an old time of this count says nothing of the machine now
            if self.seconds[n] < SWITCH_MARGIN * self.seconds[self.current]:
                self.current, self.interval = n, self.min_interval
            else:
                self.interval = min(self.max_interval, self.interval * 2)
            self.countdown = self.interval
            return
        self.seconds[n] = seconds if prev is None else (1 - EMA) * prev + EMA * seconds
        if prev is not None and seconds > SLOWDOWN * prev and len(self.counts) > 1:
            self.interval = self.min_interval
            self.countdown = min(self.countdown, 1)

    @contextmanager
    def step(self):
        n, probe = self._pick()
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        t0 = time.perf_counter()
        try:
            yield n
        finally:
            self._record(n, time.perf_counter() - t0, probe)

    def restore(self) -> None:
        """Put the thread count back to what the caller had set."""
        if torch.get_num_threads() != self.max_threads:
            torch.set_num_threads(self.max_threads)

    def report(self) -> dict:
        return {"adapt": self.adapt, "max_threads": self.max_threads, "steps_per_thread_count": dict(self.steps)}
