"""Helpers shared by the benchmark scripts: engines measured the same way, in one process.

Every engine gets the same token ids. Runs are interleaved (engine A, engine B, A, B, ...)
so that machine noise hits all engines alike; we report the median of the runs.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from leanlm.evaluate.peers import (Engine, HFEngine, LlamaCppEngine, OpenVINOEngine, QualityRef,  # noqa: F401
                                   window_scores)

RESULTS = Path(__file__).resolve().parent / "results"


def _code_at_start() -> dict:
    """The commit (and dirty flag) when this process started: a long run's result names the code it ran,
    even if the tree changed before it finished."""
    try:
        from leanlm.provenance import git_commit
    except ImportError:  # leanlm not importable: write_result will fail with the real error
        return {}
    return {**git_commit(Path(__file__).resolve().parent), "started": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds")}


_START = _code_at_start()


def machine() -> dict:
    """The machine block of every result (leanlm.provenance.machine: CPU model, ISA flags, cores, caches)."""
    from leanlm.provenance import machine as _machine

    return _machine()


def add_result_args(ap) -> None:
    """The options every benchmark shares: where its result goes and how the machine was used."""
    ap.add_argument("--archive", action="store_true",
                    help="write under benchmarks/results/archive/DATE/ instead of the canonical file")
    ap.add_argument("--machine-shared", action="store_true",
                    help="record that other jobs ran on the machine during this run (speed figures are noisy)")


# the archive file each result name got in this process: a run that rewrites its result after every
# measurement keeps writing to one file instead of making NAME-2, NAME-3, ...
_ARCHIVE_PATHS: dict[str, Path] = {}


def archive_path(name: str, root: Path | None = None, day: str | None = None) -> Path:
    """archive/YYYY-MM-DD/NAME.json, or NAME-2.json, NAME-3.json, ... when that exists (never overwritten)."""
    root = RESULTS if root is None else Path(root)
    folder = root / "archive" / (day or datetime.date.today().isoformat())
    path, n = folder / f"{name}.json", 2
    while path.exists():
        path, n = folder / f"{name}-{n}.json", n + 1
    return path


def bench_command() -> str:
    """The command line as it is re-run from the repository root."""
    arg0 = sys.argv[0] if sys.argv else ""
    script = Path(arg0).resolve()
    if not arg0 or not script.is_file():
        return shlex.join(["python", *sys.argv])
    try:
        shown = f"benchmarks/{script.relative_to(Path(__file__).resolve().parent)}"
    except ValueError:
        shown = arg0
    return shlex.join(["python", shown, *sys.argv[1:]])


def stamp_top_level(obj: dict) -> dict:
    """obj with commit, command and machine copied up from its provenance block (a result's own "machine"
    summary, when it has one, is kept)."""
    prov = obj["provenance"]
    top = {"commit": prov.get("commit"), "command": prov.get("command")}
    if "machine" not in obj:
        top["machine"] = prov.get("machine")
    return {**top, **obj}


def write_result(name: str, obj: dict, *, partial: bool = False, archive: bool = False, checkpoint: bool = False,
                 machine_shared: bool | None = None, root: Path | None = None) -> Path:
    """Write a result stamped with its provenance (commit, command, machine, versions, date), atomically.

    Only a complete run (partial=False, archive=False) writes the canonical benchmarks/results/NAME.json,
    and only with its final write. A partial run (a narrowing flag such as --only/--configs/--quick was
    given), an --archive run, and the intermediate writes of a long run (checkpoint=True) go to
    benchmarks/results/archive/YYYY-MM-DD/NAME.json, never overwriting a file there either; the
    checkpoint file of a run that then completes is removed. So a re-run that stops half-way, or that
    measured only some rows, can never replace the figures the docs cite.
    """
    from leanlm.io import write_json_atomic
    from leanlm.provenance import stamp

    root = RESULTS if root is None else Path(root)
    canonical = not partial and not archive and not checkpoint
    key = f"{root}/{name}"
    prov = stamp(bench_command(), code=_START or None)  # the commit (and start time) read when the run started
    prov["machine_shared"] = machine_shared
    try:
        prov["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    # complete: every row the script measures by default, to its end (an --archive run may be complete)
    # the stamp also sits at the top level, where a reader (or a hook) finds commit, command and machine without
    # knowing the provenance block; stamp_top_level keeps the two the same
    obj = stamp_top_level({**obj, "complete": not partial and not checkpoint, "provenance": prov})
    if canonical:
        path = root / f"{name}.json"
        write_json_atomic(path, obj, force=True)
        ckpt = _ARCHIVE_PATHS.pop(key, None)
        if ckpt is not None and ckpt.exists():
            ckpt.unlink()  # the run completed: its checkpoint is superseded by the canonical file
    else:
        path = _ARCHIVE_PATHS.get(key) or archive_path(name, root)
        _ARCHIVE_PATHS[key] = path
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, obj, force=True)
    print(f"wrote {path}")
    return path


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_rss_mb(spec: str, dtype: str, threads: int) -> float:
    """Peak RSS of a fresh process that loads `spec` and generates 32 tokens (what a user pays)."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so the child would report this
    # (large) benchmark process's peak
    code = (f"import re, torch, leanlm; from leanlm.decode.generate import generate_tokens; "
            f"torch.set_num_threads({threads}); m, _ = leanlm.load({spec!r}, {dtype!r}); "
            f"list(generate_tokens(m, list(range(100, 132)), 32, eos_ids=set())); "
            f"print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def small_kernel(enabled: bool):
    """Within: leanlm's native small-row products (model/fused.py) on or off (ATen's GEMVs), for
    same-run A/B measurements; the previous setting is restored on exit."""
    from leanlm.model.runtime import Linear

    saved, Linear.fused_small = Linear.fused_small, enabled
    try:
        yield
    finally:
        Linear.fused_small = saved


class LeanlmEngine(Engine):
    """leanlm's decode loop; small_kernel=False runs its small-row products on ATen instead of
    leanlm's native kernel (model/fused.py), for a same-run A/B."""

    def __init__(self, model, name: str, small_kernel: bool = True, prepare: bool = True):
        self.model, self.name, self.small_kernel = model, name, small_kernel
        if prepare:  # as `leanlm generate` and `leanlm serve` decode (weight layout, huge pages)
            model.prepare_decode()

    def _run(self, ids, n):
        from leanlm.decode.generate import GenerationStats, generate_tokens

        st = GenerationStats()
        with small_kernel(self.small_kernel):
            for _ in generate_tokens(self.model, ids, n, eos_ids=set(), stats=st):
                pass
        return st

    def prefill(self, ids):
        return self._run(ids, 1).prefill_s

    def decode(self, ids, n):
        return self._run(ids, n).decode_tok_s


def interleaved_speed(engines: list[Engine], prompt: list[int], short: list[int], new_tokens: int,
                      runs: int, warmup: int = 1, phases: tuple[str, ...] = ("prefill", "decode"),
                      desc: str = "speed runs") -> dict:
    """Median prefill tok/s, TTFT and decode tok/s per engine, runs interleaved across engines.
    phases: which of "prefill" (on `prompt`) and "decode" (`new_tokens` after `short`) to time; the fields of a
    phase left out are absent."""
    from tqdm.auto import tqdm

    unknown = set(phases) - {"prefill", "decode"}
    if unknown or not phases:
        raise ValueError(f"phases must be a non-empty subset of ('prefill', 'decode'), got {phases}")
    raw = {e.name: {"prefill_s": [], "decode_tok_s": []} for e in engines}
    for r in tqdm(range(warmup + runs), desc=desc):
        for e in engines:
            p = e.prefill(prompt) if "prefill" in phases else None
            d = e.decode(short, new_tokens) if "decode" in phases else None
            if r >= warmup:
                raw[e.name]["prefill_s"].append(p)
                raw[e.name]["decode_tok_s"].append(d)
    out = {}
    for name, v in raw.items():
        out[name] = {}
        if "prefill" in phases:
            out[name].update({"prefill_tok_s": median([len(prompt) / s for s in v["prefill_s"]]),
                              "ttft_ms": median(v["prefill_s"]) * 1e3,
                              "prefill_tok_s_runs": [len(prompt) / s for s in v["prefill_s"]]})  # fmt: skip
        if "decode" in phases:
            out[name].update({"decode_tok_s": median(v["decode_tok_s"]), "decode_tok_s_runs": v["decode_tok_s"]})
    return out


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(f"{c:>{widths[c]}}" for c in cols))
    for r in rows:
        print("  ".join(f"{_fmt(r.get(c)):>{widths[c]}}" for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 10 else f"{v:.1f}"
    return "" if v is None else str(v)


def dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


def leanlm_quant_configs() -> dict:
    """leanlm's low-bit paths the peer comparisons time: int8 RTN per channel and int4 RTN group 128, by engine name
    (bench_runtime.py, bench_peers.py)."""
    from leanlm.quant import RTN

    return {"leanlm-int8": RTN(bits=8, group=0, symmetric=True), "leanlm-int4": RTN(bits=4, group=128)}


def dram_read_bandwidth(gb: float = 1.0, repeats: int = 5) -> dict:
    """DRAM read bandwidth with torch's thread count: the best of `repeats` sums over a `gb`-GB fp32 tensor (far
    larger than the L3, so each sum streams it from memory once). GB = 1e9 bytes."""
    n = int(gb * 1e9) // 4
    x = torch.ones(n, dtype=torch.float32)  # written once: every page is mapped before the timed reads
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    del x
    return {"dram_read_gb_s": n * 4 / min(times) / 1e9, "tensor_gb": n * 4 / 1e9, "repeats": repeats,
            "sum_s_runs": times, "threads": torch.get_num_threads(), "method": "best of torch.sum over fp32 tensor"}


_SPIN = """
import os, sys
cpu, parent = int(sys.argv[1]), int(sys.argv[2])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
n = 0
while True:  # spin; stop by itself if the benchmark died without killing us
    n += 1
    if n & 0xFFFFF == 0 and os.getppid() != parent:
        break
"""


class BusyCore:
    """A separate process spinning on one core (pinned to `cpu`; -1: not pinned) while the context is open, so
    engines are timed on a machine with one core taken by another job. Always killed on exit (also on Ctrl-C or
    an error); `report()` gives the spinner's CPU use over its life (1.0 = it held a whole core)."""

    def __init__(self, cpu: int = -1):
        if cpu >= (os.cpu_count() or 1):
            raise ValueError(f"busy-core cpu {cpu} does not exist ({os.cpu_count()} CPUs)")
        self.cpu, self.proc, self.started, self.cpu_s, self.wall_s = cpu, None, 0.0, 0.0, 0.0

    def _cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, IndexError, ValueError):
            return float("nan")

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _SPIN, str(self.cpu), str(os.getpid())])
        self.started = time.perf_counter()
        time.sleep(0.2)  # let it start spinning before anything is timed
        if self.proc.poll() is not None:
            raise RuntimeError(f"busy-core process exited at once (code {self.proc.returncode})")
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.cpu_s, self.wall_s = self._cpu_seconds(), time.perf_counter() - self.started
            self.proc.kill()
            self.proc.wait()
        return False

    def report(self) -> dict:
        return {"cpu": self.cpu, "wall_s": self.wall_s, "spinner_cpu_s": self.cpu_s,
                "spinner_core_share": self.cpu_s / self.wall_s if self.wall_s else None}
