"""An evaluation's report (stages/evaluate.py) as one self-contained HTML page: the headline, each measure for
both models as bars, the loss and perplexity, the forgetting check, the judge's tally and every row.

Everything from the data and the models is escaped: the page is opened in browsers, and a row's text is
whatever the data or a model wrote. No scripts, no outside requests: it reads the same offline and in a zip.
"""

from __future__ import annotations

import datetime
import html

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#1f2937;line-height:1.45}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem}table{border-collapse:collapse;width:100%;font-size:.9rem}
td,th{border:1px solid #e5e7eb;padding:.35rem .5rem;vertical-align:top;text-align:left}th{background:#f9fafb}
.flag{background:#fef2f2;border:1px solid #fecaca;padding:.6rem;border-radius:6px}
.ok{background:#f0fdf4;border:1px solid #bbf7d0;padding:.6rem;border-radius:6px}
.legend span{display:inline-block;width:.9rem;height:.9rem;margin:0 .3rem 0 1rem;vertical-align:middle}
td.answer{white-space:pre-wrap;max-width:28rem}
"""
COLOURS = ("#9ca3af", "#4f46e5")  # the base (or the run compared against), the evaluated run


def e(value) -> str:
    return html.escape("" if value is None else str(value))


def render(report: dict) -> str:
    base, tuned = report["labels"]["base"], report["labels"]["tuned"]
    created = datetime.datetime.fromtimestamp(report["created"]).strftime("%Y-%m-%d %H:%M")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation of {e(tuned)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Evaluation: {e(tuned)} against {e(base)}</h1>",
             f"<p>{e(report['headline'])}</p>",
             f"<p>Data: {e(report['data'])}; {len(report['rows'])} rows; greedy decoding, up to "
             f"{e(report['settings']['max_new_tokens'])} new tokens; made {e(created)} by evaluation run "
             f"{e(report['evaluation_run'])}.</p>",
             _legend(base, tuned), _measures(report), _loss(report), _forgetting(report), _judge(report),
             _benchmark(report), _rows(report), "</body></html>"]
    return "\n".join(p for p in parts if p)


def _legend(base: str, tuned: str) -> str:
    return (f"<p class='legend'>Bars:<span style='background:{COLOURS[0]}'></span>{e(base)}"
            f"<span style='background:{COLOURS[1]}'></span>{e(tuned)}</p>")


def _bars(values: list[tuple[str, float | None, float | None]], scale: float = 1.0) -> str:
    """Paired horizontal bars, one pair per label, as inline SVG (values from 0 to `scale`)."""
    width, row_h = 560, 34
    label_w = 150
    svg = [f"<svg width='{width}' height='{row_h * len(values) + 10}' role='img'>"]
    for i, (label, left, right) in enumerate(values):
        y = i * row_h + 4
        svg.append(f"<text x='0' y='{y + 18}' font-size='13'>{e(label)}</text>")
        for j, value in enumerate((left, right)):
            if value is None:
                continue
            length = max(0.0, min(1.0, value / scale if scale else 0.0)) * (width - label_w - 60)
            svg.append(f"<rect x='{label_w}' y='{y + j * 13}' width='{length:.1f}' height='12' "
                       f"fill='{COLOURS[j]}'></rect><text x='{label_w + length + 4:.1f}' y='{y + j * 13 + 10}' "
                       f"font-size='11'>{value:.3f}</text>")
    svg.append("</svg>")
    return "".join(svg)


def _measures(report: dict) -> str:
    base, tuned = report["labels"]["base"], report["labels"]["tuned"]
    summary = report["summary"]
    bars = [(m, summary.get(m, {}).get("base_mean"), summary.get(m, {}).get("tuned_mean")) for m in report["metrics"]]
    rows = "".join(f"<tr><td>{e(m)}</td><td>{e(report['descriptions'].get(m, ''))}</td>"
                   f"<td>{_num(summary.get(m, {}).get('base_mean'))}</td>"
                   f"<td>{_num(summary.get(m, {}).get('tuned_mean'))}</td>"
                   f"<td>{_tally(report, m)}</td></tr>" for m in report["metrics"])
    return (f"<h2>Measures (mean per row; higher is better)</h2>{_bars(bars)}<table><tr><th>measure</th>"
            f"<th>what it checks</th><th>{e(base)}</th><th>{e(tuned)}</th><th>rows {e(tuned)} won / lost / tied"
            f"</th></tr>{rows}</table>")


def _tally(report: dict, metric: str) -> str:
    found = report["summary"].get(metric)
    if not found:
        return ""
    return f"{found['tuned_wins']} / {found['base_wins']} / {found['ties']}"


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _loss(report: dict) -> str:
    labels = report["labels"]
    loss = report["loss"]
    return ("<h2>Loss on the reference answers (lower is closer to the data)</h2><table><tr><th></th><th>loss</th>"
            "<th>perplexity</th><th>answer tokens</th></tr>" + "".join(
                f"<tr><td>{e(labels[side])}</td><td>{_num(loss.get(side, {}).get('loss'))}</td>"
                f"<td>{_num(loss.get(side, {}).get('perplexity'))}</td><td>{e(loss.get(side, {}).get('tokens'))}</td>"
                "</tr>" for side in ("base", "tuned")) + "</table>")


def _forgetting(report: dict) -> str:
    found = report.get("forgetting")
    if not found:
        return ""
    lost = [q for q in found["questions"] if q["base_passed"] and not q["tuned_passed"]]
    listing = "".join(f"<tr><td>{e(q['prompt'])}</td><td>{e(q['answer'])}</td><td class='answer'>"
                      f"{e(q['base_reply'])}</td><td class='answer'>{e(q['tuned_reply'])}</td></tr>" for q in lost)
    table = ("<p>Answered right before, wrong now:</p><table><tr><th>question</th><th>expected</th><th>before</th>"
             f"<th>now</th></tr>{listing}</table>") if lost else ""
    return (f"<h2>Forgetting check</h2><div class='{'flag' if found['flagged'] else 'ok'}'>{e(found['message'])}</div>"
            f"{_bars([('general questions right', found['base_rate'], found['tuned_rate'])])}{table}")


def _judge(report: dict) -> str:
    found = report.get("judge")
    if not found:
        return ""
    wins, labels = found["wins"], report["labels"]
    return (f"<h2>Judge: {e(found['judge'])}</h2><p>Rubric: {e(found['rubric'])}</p><p>"
            + ", ".join(f"{e(labels.get(k, k))}: {v}" for k, v in wins.items()) + f" (of {found['judged']} rows; the answers' order "
            "alternated row by row).</p>")


def _benchmark(report: dict) -> str:
    found = report.get("benchmark")
    if not found:
        return ""
    if "error" in found:
        return f"<h2>Benchmark {e(found['task'])}</h2><p>{e(found['error'])}</p>"
    rows = "".join(f"<tr><td>{e(report['labels'].get(side, side))}</td><td>{e(values)}</td></tr>"
                   for side, values in found["results"].items())
    return f"<h2>Benchmark {e(found['task'])}</h2><table>{rows}</table>"


def _rows(report: dict) -> str:
    base, tuned = report["labels"]["base"], report["labels"]["tuned"]
    head = (f"<tr><th>#</th><th>prompt</th><th>reference</th><th>{e(base)}</th><th>{e(tuned)}</th>"
            + "".join(f"<th>{e(m)}</th>" for m in report["metrics"]) + "</tr>")
    body = "".join(
        f"<tr><td>{row['row']}</td><td class='answer'>{e(row['prompt'])}</td><td class='answer'>{e(row['reference'])}"
        f"</td><td class='answer'>{e(row['base'])}</td><td class='answer'>{e(row['tuned'])}</td>"
        + "".join(f"<td>{_num(row[m]['base'])} / {_num(row[m]['tuned'])}</td>"
                  for m in report["metrics"]) + "</tr>" for row in report["rows"])
    return f"<h2>Every row (scores: {e(base)} / {e(tuned)})</h2><table>{head}{body}</table>"
