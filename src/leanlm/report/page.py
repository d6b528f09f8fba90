"""HTML of the report: one self-contained page (styles inline, plots inline), readable at a glance."""

from __future__ import annotations

import html

from .compare import GROUPS, Comparison, Metric

CSS = """
:root{--ink:#1f2933;--muted:#616e7c;--line:#e4e7eb;--blue:#2563eb;--good:#0f7b4a;--bad:#b42318;--bg:#f7f8fa}
*{box-sizing:border-box}
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--ink);margin:0;background:var(--bg)}
main{max-width:1120px;margin:0 auto;padding:28px 32px 16px}
header .kicker{font-size:12px;letter-spacing:.08em;text-transform:uppercase;color:var(--muted)}
h1{font-size:28px;margin:4px 0 2px}h1 span{color:var(--muted);font-weight:400}
.sub{color:var(--muted);margin:0 0 20px;font-size:14px}
h2{font-size:16px;margin:28px 0 10px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:12px}
.card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:14px 16px}
.card .label{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.05em}
.card .big{font-size:25px;font-weight:650;margin:6px 0 2px;white-space:nowrap}
.card .big small{font-size:15px;font-weight:500;margin-left:4px}
.card .detail{font-size:13px;color:var(--muted)}
.good{color:var(--good)}.bad{color:var(--bad)}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid var(--line);border-radius:10px;
 overflow:hidden;font-size:14px}
th,td{padding:7px 12px;text-align:right;border-bottom:1px solid var(--line);white-space:nowrap}
th:first-child,td:first-child{text-align:left;white-space:normal;min-width:250px}
thead th{background:#f0f2f5;font-weight:600;font-size:13px}
td .hint{display:block;font-size:11.5px;color:var(--muted)}
tr.group td{background:#fafbfc;font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.05em;
 color:var(--muted);text-align:left}
.result{background:#eef4ff}thead th.result{background:#dbe7fe}
td.ratio{font-weight:600}
.figure{background:#fff;border:1px solid var(--line);border-radius:10px;padding:12px}
.figure svg{width:100%;height:auto}.figure img{max-width:100%}
ul.notes{margin:10px 0 0;padding-left:20px;font-size:13.5px;color:var(--muted)}
.warn{background:#fff8e6;border:1px solid #f5d48a;border-radius:8px;padding:8px 12px;margin-top:10px;font-size:13.5px}
details{margin-top:24px;font-size:13px}summary{cursor:pointer;color:var(--muted)}
details table td{text-align:left;font-size:12.5px;padding:3px 10px}
footer{max-width:1120px;margin:24px auto 0;padding:14px 32px 28px;border-top:1px solid var(--line);font-size:12px;
 color:var(--muted)}
footer p{margin:4px 0}footer code{font-size:11.5px;background:#eef1f4;padding:1px 4px;border-radius:4px}
"""


def esc(x) -> str:
    return html.escape(str(x))


def fmt(metric: Metric, value: float | None, unit: bool = True) -> str:
    if value is None:
        return "–"
    text = f"{value:,.{metric.digits}f}"
    if unit and metric.unit:
        text += metric.unit if metric.unit == "%" else f" {metric.unit}"
    return text


def _hint(metric: Metric, data: dict) -> str:
    """The settings a figure was measured at, under its name."""
    p, s, k = (data.get(x) if isinstance(data.get(x), dict) else {} for x in ("perplexity", "speed", "kl"))
    if metric.key == "ppl" and p:
        return f"{p.get('text', '?')}, {p.get('windows', '?')} windows of {p.get('seq_len', '?')} tokens"
    if metric.key in ("kl", "top1") and k:
        return f"vs {k.get('reference', '?')} (float32), {k.get('windows', '?')} windows"
    if metric.key == "prefill" and s:
        return f"prompt of {s.get('prompt_len', '?')} tokens"
    if metric.key == "decode" and s:
        threads = s.get("threads", "?")
        return f"{s.get('new_tokens', '?')} new tokens, batch 1, {threads} thread{'' if threads == 1 else 's'}"
    if metric.key == "peak_rss":
        return "VmHWM of the eval process"
    return ""


def _ratio_cell(cmp: Comparison, m: Metric) -> str:
    r = cmp.ratio(m)
    if r is None:
        return "<td class='ratio'></td>"
    cls = "" if r.better is None else " good" if r.better else " bad"
    return f"<td class='ratio{cls}'>{esc(r.text)}</td>"


def comparison_table(cmp: Comparison) -> str:
    cols = cmp.columns
    head = "".join(f"<th class='{'result' if c.role == 'result' else ''}'>{esc(c.label)}</th>" for c in cols)
    vs = f"<th>vs {esc(cmp.ratio_base.label)}</th>" if cmp.ratio_base else ""
    rows, group = [], None
    for m in cmp.metrics():
        if m.group != group:
            group = m.group
            rows.append(f"<tr class='group'><td colspan='{len(cols) + 1 + bool(vs)}'>{GROUPS[group]}</td></tr>")
        hint = _hint(m, cmp.result.data)
        cells = "".join(f"<td class='{'result' if c.role == 'result' else ''}'>{esc(fmt(m, c.values.get(m.key)))}</td>"
                        for c in cols)  # fmt: skip
        rows.append(f"<tr><td>{esc(m.label)}{f'<span class=hint>{esc(hint)}</span>' if hint else ''}</td>{cells}"
                    + (_ratio_cell(cmp, m) if vs else "") + "</tr>")  # fmt: skip
    return f"<table><thead><tr><th></th>{head}{vs}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def cards(cmp: Comparison) -> str:
    """The headline: speed, size, quality loss, agreement with the reference."""
    by_key = {m.key: m for m in cmp.metrics()}
    base = cmp.ratio_base.values if cmp.ratio_base else {}
    res = cmp.result.values
    out = []

    def card(label, big, detail, better):
        cls = "" if better is None else " good" if better else " bad"
        number, _, word = big.partition(" ")  # "2.26x faster": the number large, the word beside it
        big = esc(number) + (f"<small>{esc(word)}</small>" if word else "")
        out.append(f"<div class='card'><div class='label'>{esc(label)}</div><div class='big{cls}'>{big}</div>"
                   f"<div class='detail'>{esc(detail)}</div></div>")  # fmt: skip

    for key, label in (("decode", "Decode speed"), ("prefill", "Prefill speed"), ("weight_mb", "Weights"),
                       ("ppl", "Perplexity"), ("peak_rss", "Peak memory")):  # fmt: skip
        m = by_key.get(key)
        if m is None or key not in res:
            continue
        r = cmp.ratio(m)
        if r is not None:
            card(label, r.text, f"{fmt(m, base[key], unit=False)} → {fmt(m, res[key])}", r.better)
        elif key == "ppl":
            card(label, fmt(m, res[key]), "no base perplexity to compare with", None)
    if "kl" in res:
        top1 = f"top-1 agreement {res['top1']:.1f}%" if "top1" in res else ""
        card("KL vs reference", f"{res['kl']:.4f}", top1, None)
    return f"<div class='cards'>{''.join(out)}</div>" if out else ""


def when(date) -> str:
    """'2025-01-01T10:00:00+00:00' -> '2025-01-01 10:00 UTC' (other strings as they are)."""
    text = str(date)
    if len(text) >= 16 and text[10] == "T":
        return text[:10] + " " + text[11:16] + (" UTC" if text.endswith("+00:00") else "")
    return text


def _short_machine(m: dict) -> str:
    parts = [m.get("cpu") or "unknown CPU"]
    if m.get("isa"):
        parts.append(" ".join(map(str, m["isa"][:6])) + (" …" if len(m["isa"]) > 6 else ""))
    if m.get("cores"):
        threads = m.get("threads", "?")
        parts.append(f"{m['cores']} cores, {threads} thread{'' if threads == 1 else 's'} in use")
    return " · ".join(parts)


def provenance_footer(items: list[tuple[str, dict | None]]) -> str:
    """Where each figure came from: machine (once when shared), commit, date, command."""
    stamped = [(label, p) for label, p in items if p is not None]
    machines = {_short_machine(p.get("machine") if isinstance(p.get("machine"), dict) else {}) for _, p in stamped}
    lines = [f"<p><b>Machine</b>: {esc(next(iter(machines)))}</p>"] if len(machines) == 1 else []
    for label, p in items:
        if p is None:
            lines.append(f"<p><b>{esc(label)}</b>: no provenance stamp in this JSON (`leanlm eval --json` records "
                         "commit, machine and date)</p>")  # fmt: skip
            continue
        m = p.get("machine") if isinstance(p.get("machine"), dict) else {}
        machine = "" if len(machines) == 1 else esc(_short_machine(m)) + " · "
        commit = str(p.get("commit") or "no git commit")[:10] + (" + uncommitted changes" if p.get("dirty") else "")
        v = p.get("versions") if isinstance(p.get("versions"), dict) else {}
        torch = f" · torch {v['torch']}" if v.get("torch") else ""
        lines.append(f"<p><b>{esc(label)}</b>: {machine}commit <code>{esc(commit)}</code> · "
                     f"{esc(when(p.get('date', 'undated')))}{esc(torch)}"
                     + (f" · <code>{esc(p['command'])}</code>" if p.get("command") else "") + "</p>")  # fmt: skip
    return f"<footer>{''.join(lines)}<p>Written by leanlm report.</p></footer>"


def values_table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows) + "</table>"


def document(title: str, body: str, footer: str) -> str:
    return (f"<!doctype html><html lang='en'><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width,initial-scale=1'><title>{esc(title)}</title><style>{CSS}</style>"
            f"<body><main>{body}</main>{footer}</body></html>\n")  # fmt: skip
