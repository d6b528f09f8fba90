"""A compressed model beside its base: the figures of `leanlm eval --json` results, side by side, with ratios.

The candidate is one eval JSON; the bases are eval JSONs of the uncompressed model (say its fp32 and bf16
runs). Ratios are taken against the fastest base given (highest decode tok/s), since a speed-up over a slow
baseline says little. Settings that make two figures incomparable (other windows, prompt length, threads,
machine) are reported as warnings, not hidden.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LeanlmError

EVAL_SECTIONS = {"perplexity": "ppl", "kl": "kl", "speed": "decode_tok_s", "memory": "weight_mb"}


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    group: str  # quality | speed | size | memory
    path: tuple[str, ...]  # where `leanlm eval --json` stores it
    unit: str
    digits: int
    higher_is_better: bool
    ratio: str | None  # how a ratio reads: "faster", "smaller", "less", "ppl" (a % change); None: no ratio
    scale: float = 1.0  # shown value = stored value * scale


METRICS = (
    Metric("ppl", "Perplexity", "quality", ("perplexity", "ppl"), "", 3, False, "ppl"),
    Metric("kl", "KL vs reference", "quality", ("kl", "kl"), "", 4, False, None),
    Metric("top1", "Top-1 agreement", "quality", ("kl", "top1_agreement"), "%", 1, True, None, 100.0),
    Metric("prefill", "Prefill", "speed", ("speed", "prefill_tok_s"), "tok/s", 1, True, "faster"),
    Metric("decode", "Decode", "speed", ("speed", "decode_tok_s"), "tok/s", 1, True, "faster"),
    Metric("ttft", "Time to first token", "speed", ("speed", "ttft_ms"), "ms", 1, False, "faster"),
    Metric("weight_mb", "Weights in memory", "size", ("memory", "weight_mb"), "MB", 1, False, "smaller"),
    Metric("disk_mb", "Size on disk", "size", ("memory", "disk_mb"), "MB", 1, False, "smaller"),
    Metric("kv", "KV cache per token", "memory", ("memory", "kv_bytes_per_token"), "KiB", 1, False, "smaller", 1 / 1024),
    Metric("peak_rss", "Peak memory (RSS)", "memory", ("memory", "peak_rss_mb"), "MB", 0, False, "less"),
)
GROUPS = {"quality": "Quality", "speed": "Speed", "size": "Size", "memory": "Memory"}


def read_json(path: str | Path, what: str = "result") -> dict:
    """A result JSON as a dict, or a LeanlmError that says what is wrong with the file."""
    src = Path(path)
    if not src.is_file():
        raise LeanlmError(f"{what} {src} not found: pass a JSON written by leanlm eval --json or a benchmark")
    try:
        data = json.loads(src.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LeanlmError(f"{what} {src} is not valid JSON ({e})") from e
    except RecursionError:
        raise LeanlmError(f"{what} {src} nests its JSON too deeply to be a leanlm result") from None
    if not isinstance(data, dict):
        raise LeanlmError(f"{what} {src} holds a JSON {type(data).__name__}, expected an object (a leanlm result)")
    return data


def is_eval_result(data) -> bool:
    """Written by `leanlm eval --json`: one model's perplexity / kl / speed / memory sections."""
    return isinstance(data, dict) and any(isinstance(data.get(s), dict) and k in data[s] for s, k in EVAL_SECTIONS.items())


def figure(data: dict, path: tuple[str, ...], src: str) -> float | None:
    """The number stored at `path` (a speed summary gives its median); None when absent; an error when malformed."""
    value = data
    for i, key in enumerate(path):
        if not isinstance(value, dict):
            raise LeanlmError(f"{src}: '{'.'.join(path[:i])}' is {type(value).__name__}, expected an object")
        if key not in value:
            return None
        value = value[key]
    if isinstance(value, dict) and "median" in value:  # speed summaries: {median, min, max, runs}
        value = value["median"]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LeanlmError(f"{src}: '{'.'.join(path)}' is {value!r}, expected a number")
    return float(value)


@dataclass
class Column:
    """One model's figures (shown values, already scaled)."""

    label: str
    src: str
    role: str  # "base", "reference" (only the KL reference's perplexity is known) or "result"
    data: dict
    values: dict[str, float] = field(default_factory=dict)

    @property
    def provenance(self) -> dict | None:
        p = self.data.get("provenance")
        return p if isinstance(p, dict) else None


def _column(data: dict, src: str, role: str) -> Column:
    model = data.get("model")
    name = Path(str(model)).name if isinstance(model, str) and model else Path(src).stem
    dtype = data.get("dtype")
    col = Column(f"{name} · {dtype}" if isinstance(dtype, str) else name, src, role, data)
    for m in METRICS:
        v = figure(data, m.path, src)
        if v is not None:
            col.values[m.key] = v * m.scale
    if "ppl" not in col.values and (v := figure(data, ("kl", "ppl"), src)) is not None:
        col.values["ppl"] = v  # KL was scored on its own windows: the candidate's ppl on them
    return col


@dataclass
class Ratio:
    text: str  # "2.41x faster", "+3.2%"
    better: bool | None  # None: no change worth a colour


def ratio(metric: Metric, value: float | None, base: float | None) -> Ratio | None:
    if metric.ratio is None or value is None or base is None or not value > 0 or not base > 0:
        return None  # also NaN: no ratio of a failed measurement
    if math.isinf(value) or math.isinf(base):
        return None
    if metric.ratio == "ppl":
        change = value / base - 1
        return Ratio(f"{change:+.1%}", None if abs(change) < 0.0005 else change < 0)
    r = value / base if metric.higher_is_better else base / value
    opposite = {"faster": "slower", "smaller": "larger", "less": "more"}[metric.ratio]
    if abs(r - 1) < 0.005:
        return Ratio("same", None)
    return Ratio(f"{r:.2f}x {metric.ratio}" if r > 1 else f"{1 / r:.2f}x {opposite}", r > 1)


@dataclass
class Comparison:
    result: Column
    bases: list[Column]
    ratio_base: Column | None
    notes: list[str]  # how the ratios were taken
    warnings: list[str]  # what makes figures hard to compare
    no_ratio: set[str] = field(default_factory=set)  # metrics whose values are shown but not comparable

    @property
    def columns(self) -> list[Column]:
        return [*self.bases, self.result]

    def metrics(self) -> list[Metric]:
        """The metrics at least one column has."""
        return [m for m in METRICS if any(m.key in c.values for c in self.columns)]

    def ratio(self, metric: Metric) -> Ratio | None:
        if metric.key in self.no_ratio:
            return None
        base = self.ratio_base.values.get(metric.key) if self.ratio_base else None
        return ratio(metric, self.result.values.get(metric.key), base)


def _settings(data: dict, section: str, keys: tuple[str, ...]) -> dict:
    sec = data.get(section)
    return {k: sec.get(k) for k in keys} if isinstance(sec, dict) else {}


def _cpu(data: dict) -> str | None:
    p = data.get("provenance")
    m = p.get("machine") if isinstance(p, dict) else None
    return m.get("cpu") if isinstance(m, dict) else None


def compare(result_json: str | Path, base_jsons: list[str | Path] | None = None) -> Comparison:
    """Read the candidate and its bases, pick the base the ratios use, and note what differs between them."""
    data = read_json(result_json)
    if not is_eval_result(data):
        raise LeanlmError(f"{result_json} holds no leanlm eval figures (perplexity, kl, speed or memory): --base "
                          "compares two `leanlm eval --json` results")  # fmt: skip
    result = _column(data, str(result_json), "result")
    bases = []
    for b in base_jsons or []:
        bdata = read_json(b, "base")
        if not is_eval_result(bdata):
            raise LeanlmError(f"base {b} holds no leanlm eval figures (perplexity, speed or memory): pass the "
                              "JSON `leanlm eval BASE_MODEL --json` wrote")  # fmt: skip
        bases.append(_column(bdata, str(b), "base"))
    notes, warnings = [], []
    kl = data.get("kl") if isinstance(data.get("kl"), dict) else {}
    if not bases and kl.get("ppl_base") is not None:  # without --base, the KL reference is the one base figure known
        ref = Column(f"{kl.get('reference', 'reference')} · float32", str(result_json), "reference", {})
        ref.values["ppl"] = figure(data, ("kl", "ppl_base"), str(result_json))
        bases.append(ref)
        if (v := figure(data, ("kl", "ppl"), str(result_json))) is not None:
            result.values["ppl"] = v  # scored on the windows of ppl_base (--ppl may have used others)
        notes.append("Only the KL reference's perplexity is known: pass --base BASE.json (the base model's "
                     "`leanlm eval --json`) for speed, size and memory ratios.")  # fmt: skip
    ratio_base = None
    if bases:
        fast = [c for c in bases if "decode" in c.values]
        ratio_base = max(fast, key=lambda c: c.values["decode"]) if fast else bases[0]
        others = [c for c in fast if c is not ratio_base]
        if len(bases) == 1:
            notes.append(f"Ratios compare with {ratio_base.label}, the only base given.")
            if ratio_base.data.get("dtype") == "float32":
                warnings.append("The base is float32: a bfloat16 base is usually faster on CPUs with bf16 support, "
                                "so speed ratios against float32 flatter the result. Add --base with the bf16 run.")
        else:
            slower = ", ".join(f"{c.label} {c.values['decode']:.1f}" for c in others)
            notes.append(f"Ratios compare with {ratio_base.label}, the fastest base given (decode "
                         f"{ratio_base.values.get('decode', 0):.1f} tok/s" + (f"; {slower} tok/s)." if slower else ")."))
        if ratio_base.role == "base":
            warnings += _incomparable(data, ratio_base)
    ref = kl.get("reference")
    no_ratio = set()
    if ref:
        notes.append(f"KL and top-1 agreement are measured against {ref} in float32 on the same windows.")
        if "peak_rss" in result.values and not any(isinstance(c.data.get("kl"), dict) for c in bases):
            no_ratio.add("peak_rss")  # the reference model was loaded in the same process: its peak is not the model's
            notes.append("Peak memory of the result includes the float32 KL reference loaded in the same process, so "
                         "it has no ratio: evaluate without --kl-ref to measure the model's own peak.")  # fmt: skip
    return Comparison(result, bases, ratio_base, notes, warnings, no_ratio)


def _incomparable(data: dict, base: Column) -> list[str]:
    out = []
    keys = {"perplexity": ("text", "seq_len", "windows"), "speed": ("prompt_len", "new_tokens", "threads")}
    for section, ks in keys.items():
        a, b = _settings(data, section, ks), _settings(base.data, section, ks)
        if a and b and a != b:
            diff = ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in ks if a.get(k) != b.get(k))
            out.append(f"{section} was measured with other settings than the base ({diff}): its ratio compares "
                       "unlike runs.")  # fmt: skip
    ca, cb = _cpu(data), _cpu(base.data)
    if ca and cb and ca != cb:
        out.append(f"Measured on different machines ({ca} vs {cb}): speed ratios mix hardware and method.")
    return out
