"""Matplotlib figures of the report: base vs compressed bars (inline SVG), and the benchmark / search plots (PNG)."""

from __future__ import annotations

import io
import math
from pathlib import Path

BLUE, GREY, DARK_GREY, RED = "#2563eb", "#b8c0cc", "#7b8794", "#d1495b"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _number(v) -> bool:
    """A value a plot can place: a finite int or float (a NaN perplexity is shown as n/a, not plotted)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def comparison_svg(cmp) -> str | None:
    """One panel per headline metric (decode, prefill, weights, perplexity): a bar per model, the result in blue."""
    plt = _pyplot()
    keys = [k for k in ("decode", "prefill", "weight_mb", "ppl") if sum(k in c.values for c in cmp.columns) >= 1]
    if not keys:
        return None
    metrics = {m.key: m for m in cmp.metrics()}
    fig, axes = plt.subplots(1, len(keys), figsize=(2.75 * len(keys), 0.42 * len(cmp.columns) + 1.25), squeeze=False)
    with plt.rc_context({"svg.fonttype": "none"}):
        for ax, key in zip(axes[0], keys):
            m = metrics[key]
            cols = cmp.columns  # every panel lists every model, so that the rows line up with the first's labels
            vals = [c.values.get(key) if _number(c.values.get(key)) else None for c in cols]
            colors = [BLUE if c.role == "result" else DARK_GREY if c is cmp.ratio_base else GREY for c in cols]
            ys = list(range(len(cols)))
            ax.barh(ys, [v or 0 for v in vals], color=colors, height=0.62)
            ax.set_yticks(ys, [c.label if ax is axes[0][0] else "" for c in cols], fontsize=8.5)
            ax.invert_yaxis()
            r = cmp.ratio(m)
            for y, v, c in zip(ys, vals, cols):
                label = f" {v:,.{m.digits}f}" if v is not None else " n/a"
                if c.role == "result" and r is not None:
                    label += f"  ({r.text})"
                ax.text(v or 0, y, label, va="center", fontsize=8.5, color="#1f2933" if v is not None else "#9aa5b1",
                        fontweight="bold" if c.role == "result" else "normal")  # fmt: skip
            unit = f" ({m.unit})" if m.unit else ""
            ax.set_title(f"{m.label}{unit}\n{'higher' if m.higher_is_better else 'lower'} is better", fontsize=9.5,
                         color="#1f2933", loc="left")  # fmt: skip
            ax.set_xlim(0, max(v or 0 for v in vals) * 1.6 or 1)
            ax.tick_params(axis="x", labelsize=7.5, colors="#52606d")
            ax.tick_params(axis="y", length=0)
            for side in ("top", "right", "left"):
                ax.spines[side].set_visible(False)
            ax.spines["bottom"].set_color("#cbd2d9")
            ax.grid(axis="x", color="#eef1f4")
            ax.set_axisbelow(True)
        fig.tight_layout(w_pad=1.2)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog: the SVG sits inside the HTML


def plot_speed(speed: dict, path: Path) -> Path | None:
    plt = _pyplot()
    engines = [e for e, s in speed.items() if isinstance(s, dict) and _number(s.get("decode_tok_s"))]
    if not engines:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(engines) + 1.8))
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill tok/s"), (axes[1], "decode_tok_s", "decode tok/s")):
        vals = [speed[e].get(key) if _number(speed[e].get(key)) else 0 for e in engines]
        colors = [BLUE if str(e).startswith("leanlm") else "#999999" for e in engines]
        ax.barh([str(e) for e in engines], vals, color=colors)
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


def plot_trials(trials: list, path: Path, x: str = "ppl", y: str = "decode_tok_s") -> Path | None:
    plt = _pyplot()
    pts = [(t[x], t[y], str(t.get("name", ""))) for t in trials
           if isinstance(t, dict) and _number(t.get(x)) and _number(t.get(y))]  # fmt: skip
    if not pts:
        return None
    front = set(pareto_front([(a, b) for a, b, _ in pts]))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (a, b, name) in enumerate(pts):
        on = i in front
        ax.scatter(a, b, color=RED if on else "#8d99ae", s=40 if on else 20, zorder=3)
        ax.annotate(name, (a, b), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fp = sorted((pts[i][0], pts[i][1]) for i in front)
    ax.plot([p[0] for p in fp], [p[1] for p in fp], color=RED, lw=1, label="Pareto front (measured)")
    ax.set_xlabel(f"{x} (lower is better)")
    ax.set_ylabel(f"{y} (higher is better)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(values: dict, path: Path, title: str) -> Path | None:
    plt = _pyplot()
    items = [(str(k), v) for k, v in values.items() if _number(v)]
    if not items:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(items)), 3.5))
    ax.bar(range(len(items)), [v for _, v in items], color=BLUE)
    ax.set_xticks(range(len(items)), [k for k, _ in items], rotation=90, fontsize=6)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_verification(rows: list, path: Path) -> Path | None:
    plt = _pyplot()
    pts = [(r["measured"], r["predicted"], str(r.get("name", ""))) for r in rows
           if isinstance(r, dict) and _number(r.get("measured")) and _number(r.get("predicted"))]  # fmt: skip
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 5))
    hi = max(max(a, b) for a, b, _ in pts) * 1.1
    ax.plot([0, hi], [0, hi], color="#999", lw=1, label="predicted = measured")
    for a, b, name in pts:
        ax.scatter(a, b, color=BLUE)
        ax.annotate(name, (a, b), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("measured tok/s")
    ax.set_ylabel("predicted tok/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
