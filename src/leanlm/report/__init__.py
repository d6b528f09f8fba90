"""`leanlm report RUN.json [--base BASE.json ...]`: one HTML page a person reads at a glance.

An eval result (`leanlm eval --json`) is shown beside its base model: headline ratios (x faster, x smaller,
+% perplexity), a side-by-side table of quality, speed, size and memory, and a plot, all in one self-contained
file. Other result JSONs get plots of the sections they hold: engine speeds (`speed: {engine: {prefill_tok_s,
decode_tok_s}}`, as the benchmarks write) as bars; search trials (`trials: [{ppl, decode_tok_s}]`) as a
quality-vs-cost chart with the Pareto front; per-layer sensitivity as bars; predicted vs measured speed as a
scatter (PNG files next to the HTML). Every page lists all recorded values and, in its footer, the provenance.
"""

from __future__ import annotations

from pathlib import Path

from . import page
from .compare import Comparison, compare, is_eval_result, read_json
from .plots import comparison_svg, pareto_front, plot_bars, plot_speed, plot_trials, plot_verification

__all__ = ["compare", "pareto_front", "plot_bars", "plot_speed", "plot_trials", "plot_verification", "render",
           "summary_table", "terminal_summary"]


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
    """Every value stored under `key` anywhere in the JSON."""
    if isinstance(d, dict):
        for k, v in d.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(d, list):
        for v in d:
            yield from _find(v, key)


def render(run_json: str | Path, out: str | Path | None = None, force: bool = False,
           base: list[str | Path] | str | Path | None = None) -> Path:  # fmt: skip
    """Write the HTML report of `run_json` (default: next to it, .html); `base`: eval JSON(s) of the base model."""
    from ..io import check_writable, write_text_atomic

    bases = [base] if isinstance(base, (str, Path)) else list(base or [])
    data = read_json(run_json)
    out = Path(out) if out else Path(run_json).with_suffix(".html")
    check_writable(out, force)
    if bases or is_eval_result(data):
        text = comparison_page(compare(run_json, bases))
    else:
        text = generic_page(Path(run_json), data, out)
    return write_text_atomic(out, text, force)


def comparison_page(cmp: Comparison) -> str:
    res = cmp.result
    model = res.data.get("model", res.label)
    base_names = sorted({str(c.data.get("model") or c.label.split(" · ")[0]) for c in cmp.bases})
    title = page.esc(Path(str(model)).name) + (f" <span>vs {page.esc(', '.join(base_names))}</span>" if base_names else "")
    when = (res.provenance or {}).get("date") or res.data.get("time") or "undated"
    body = [f"<header><div class='kicker'>leanlm report</div><h1>{title}</h1>"
            f"<p class='sub'>{page.esc(model)} · {page.esc(res.data.get('dtype', '?'))} · evaluated "
            f"{page.esc(page.when(when))}</p></header>", page.cards(cmp)]  # fmt: skip
    if cmp.notes:  # what the ratios are relative to, right under them
        body.append("<ul class='notes'>" + "".join(f"<li>{page.esc(n)}</li>" for n in cmp.notes) + "</ul>")
    body += [f"<div class='warn'>{page.esc(w)}</div>" for w in cmp.warnings]
    body += ["<h2>Side by side</h2>", page.comparison_table(cmp)]
    svg = comparison_svg(cmp)
    if svg:
        body += ["<h2>At a glance</h2>", f"<div class='figure'>{svg}</div>"]
    for c in cmp.columns:
        if c.data:
            rows = _flatten({k: v for k, v in c.data.items() if k != "provenance"})
            body.append(f"<details><summary>All values recorded for {page.esc(c.label)} ({page.esc(c.src)})</summary>"
                        f"{page.values_table(rows)}</details>")  # fmt: skip
    footer = page.provenance_footer([(c.label, c.provenance) for c in cmp.columns if c.data])
    return page.document(f"leanlm report: {Path(str(model)).name}", "".join(body), footer)


def generic_page(src: Path, data: dict, out: Path) -> str:
    """Benchmark and search JSONs: a plot per recognised section (PNG files beside `out`), then every value."""
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
    body = [f"<header><div class='kicker'>leanlm report</div><h1>{page.esc(src.name)}</h1></header>"]
    for title, p in figs:
        if p is not None:
            body.append(f"<h2>{page.esc(title)}</h2><div class='figure'><img src='{page.esc(p.name)}' "
                        f"alt='{page.esc(title)}'></div>")  # fmt: skip
    body.append(f"<h2>All values</h2>{page.values_table(_flatten({k: v for k, v in data.items() if k != 'provenance'}))}")
    prov = data.get("provenance")
    footer = page.provenance_footer([(src.name, prov if isinstance(prov, dict) else None)])
    return page.document(f"leanlm report: {src.name}", "".join(body), footer)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summary_table(data) -> str:
    """A compact terminal table of the engines/trials found in a benchmark or search JSON."""
    lines = []
    for speed in _find(data, "speed"):
        if isinstance(speed, dict):
            for e, s in speed.items():
                if isinstance(s, dict) and _num(s.get("decode_tok_s")):
                    pre = s.get("prefill_tok_s") if _num(s.get("prefill_tok_s")) else 0.0
                    lines.append(f"{e:28s} prefill {pre:9.1f} tok/s   decode {s['decode_tok_s']:7.1f} tok/s")
    for trials in _find(data, "trials"):
        if isinstance(trials, list):
            scored = [t for t in trials if isinstance(t, dict) and _num(t.get("ppl")) and _num(t.get("decode_tok_s"))]
            front = {id(scored[i]) for i in pareto_front([(t["ppl"], t["decode_tok_s"]) for t in scored])}
            for t in scored:
                lines.append(f"{str(t.get('name', '?')):28s} ppl {t['ppl']:8.3f}   decode "
                             f"{t['decode_tok_s']:7.1f} tok/s{'   *pareto' if id(t) in front else ''}")  # fmt: skip
    return "\n".join(lines)


def comparison_text(cmp: Comparison) -> str:
    """The side-by-side table for the terminal."""
    cols = cmp.columns
    head = ["", *(c.label for c in cols)] + ([f"vs {cmp.ratio_base.label}"] if cmp.ratio_base else [])
    rows = [head]
    for m in cmp.metrics():
        r = cmp.ratio(m)
        unit = f" ({m.unit})" if m.unit else ""
        rows.append([m.label + unit, *(page.fmt(m, c.values.get(m.key), unit=False) for c in cols)]
                    + ([r.text if r else ""] if cmp.ratio_base else []))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]  # fmt: skip
    return "\n".join(lines + cmp.notes + [f"warning: {w}" for w in cmp.warnings])


def terminal_summary(run_json: str | Path, base: list[str | Path] | None = None) -> str:
    data = read_json(run_json)
    if base or is_eval_result(data):
        return comparison_text(compare(run_json, base))
    return summary_table(data)

