"""`leanlm report RUN.json`: an HTML page (plots + tables) from any leanlm result JSON.

Recognised sections get plots: engine speeds (`speed: {engine: {prefill_tok_s, decode_tok_s}}`,
as written by the benchmarks) as bars; search trials (`trials: [{ppl, decode_tok_s, pareto}]`)
as a quality-vs-cost chart with the Pareto front; per-layer sensitivity (`sensitivity:
{layer: value}`) as bars; predicted vs measured speed (`verification: [...]`) as a scatter.
Everything else is flattened into a table. Plots are PNG files next to the HTML.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..errors import LeanlmError


def _flatten(d, prefix="") -> list[tuple[str, str]]:
    rows = []
    if isinstance(d, dict):
        for k, v in d.items():
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, list) and d and all(isinstance(x, (int, float)) for x in d) and len(d) <= 12:
        rows.append((prefix, ", ".join(f"{x:.4g}" for x in d)))
    elif isinstance(d, list):
        for i, v in enumerate(d[:200]):
            rows += _flatten(v, f"{prefix}[{i}]")
    else:
        rows.append((prefix, f"{d:.6g}" if isinstance(d, float) else str(d)))
    return rows


def _find(d, key):
    """Every value stored under `key` anywhere in the JSON, with its path."""
    if isinstance(d, dict):
        for k, v in d.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(d, list):
        for v in d:
            yield from _find(v, key)


def plot_speed(speed: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [e for e, s in speed.items() if isinstance(s, dict) and "decode_tok_s" in s]
    if not engines:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(engines) + 1.8))
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill tok/s"), (axes[1], "decode_tok_s", "decode tok/s")):
        vals = [speed[e].get(key) or 0 for e in engines]
        colors = ["#2a7ab9" if e.startswith("leanlm") else "#999999" for e in engines]
        ax.barh(engines, vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
        ax.set_title(title)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower quality loss x, higher speed y)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front


def plot_trials(trials: list[dict], path: Path, x: str = "ppl", y: str = "decode_tok_s") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(t[x], t[y], t.get("name", "")) for t in trials if t.get(x) is not None and t.get(y) is not None]
    if not pts:
        return None
    front = set(pareto_front([(a, b) for a, b, _ in pts]))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (a, b, name) in enumerate(pts):
        on = i in front
        ax.scatter(a, b, color="#d1495b" if on else "#8d99ae", s=40 if on else 20, zorder=3)
        ax.annotate(name, (a, b), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fp = sorted((pts[i][0], pts[i][1]) for i in front)
    ax.plot([p[0] for p in fp], [p[1] for p in fp], color="#d1495b", lw=1, label="Pareto front (measured)")
    ax.set_xlabel(f"{x} (lower is better)")
    ax.set_ylabel(f"{y} (higher is better)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(values: dict, path: Path, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(k, v) for k, v in values.items() if isinstance(v, (int, float))]
    if not items:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(items)), 3.5))
    ax.bar(range(len(items)), [v for _, v in items], color="#2a7ab9")
    ax.set_xticks(range(len(items)), [k for k, _ in items], rotation=90, fontsize=6)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_verification(rows: list[dict], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["measured"], r["predicted"], r.get("name", "")) for r in rows if "measured" in r and "predicted" in r]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 5))
    hi = max(max(a, b) for a, b, _ in pts) * 1.1
    ax.plot([0, hi], [0, hi], color="#999", lw=1, label="predicted = measured")
    for a, b, name in pts:
        ax.scatter(a, b, color="#2a7ab9")
        ax.annotate(name, (a, b), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("measured tok/s")
    ax.set_ylabel("predicted tok/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(run_json: str | Path, out: str | Path | None = None, force: bool = False) -> Path:
    from ..io import check_writable, write_text_atomic

    src = Path(run_json)
    if not src.is_file():
        raise LeanlmError(f"{src} not found: pass a JSON written by leanlm eval --json or a benchmark")
    try:
        data = json.loads(src.read_text())
    except json.JSONDecodeError as e:
        raise LeanlmError(f"{src} is not valid JSON ({e})") from e
    out = Path(out) if out else src.with_suffix(".html")
    check_writable(out, force)
    stem = out.with_suffix("")
    figs = []
    for i, speed in enumerate(_find(data, "speed")):
        if isinstance(speed, dict) and any(isinstance(v, dict) and "decode_tok_s" in v for v in speed.values()):
            figs.append(("Prefill and decode speed", plot_speed(speed, Path(f"{stem}-speed{i}.png"))))
    for i, trials in enumerate(_find(data, "trials")):
        if isinstance(trials, list):
            figs.append(("Quality vs cost (Pareto front)", plot_trials(trials, Path(f"{stem}-pareto{i}.png"))))
    for i, sens in enumerate(_find(data, "sensitivity")):
        if isinstance(sens, dict):
            figs.append(("Per-layer sensitivity", plot_bars(sens, Path(f"{stem}-sensitivity{i}.png"), "sensitivity")))
    for i, ver in enumerate(_find(data, "verification")):
        if isinstance(ver, list):
            figs.append(("Cost model: predicted vs measured", plot_verification(ver, Path(f"{stem}-verify{i}.png"))))
    parts = [f"<h1>leanlm report: {html.escape(src.name)}</h1>"]
    for title, p in figs:
        if p is not None:
            parts.append(f"<h2>{html.escape(title)}</h2><img src='{html.escape(p.name)}' alt='{html.escape(title)}'>")
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in _flatten(data))
    parts.append(f"<h2>All values</h2><table>{rows}</table>")
    page = ("<!doctype html><meta charset='utf-8'><title>leanlm report</title><style>body{font-family:sans-serif;"
            "max-width:1100px;margin:auto}td{border-bottom:1px solid #ddd;padding:2px 8px;font-size:13px}"
            "img{max-width:100%}</style>" + "\n".join(parts))  # fmt: skip
    return write_text_atomic(out, page, force)


def summary_table(data: dict) -> str:
    """A compact terminal table of the engines/trials found in a result JSON."""
    lines = []
    for speed in _find(data, "speed"):
        if isinstance(speed, dict):
            for e, s in speed.items():
                if isinstance(s, dict) and "decode_tok_s" in s:
                    lines.append(f"{e:28s} prefill {s.get('prefill_tok_s', 0):9.1f} tok/s   decode {s['decode_tok_s']:7.1f} tok/s")
    for trials in _find(data, "trials"):
        if isinstance(trials, list):
            scored = [t for t in trials if t.get("ppl") is not None and t.get("decode_tok_s") is not None]
            front = {id(scored[i]) for i in pareto_front([(t["ppl"], t["decode_tok_s"]) for t in scored])}
            for t in scored:
                lines.append(f"{t.get('name', '?'):28s} ppl {t['ppl']:8.3f}   decode "
                             f"{t['decode_tok_s']:7.1f} tok/s{'   *pareto' if id(t) in front else ''}")  # fmt: skip
    return "\n".join(lines)
