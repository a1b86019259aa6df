"""report.html: one self-contained page (inline CSS, figures as data: URIs; no script, no font or
stylesheet fetched), so it opens from file:// on a machine with no network and can be mailed."""

from __future__ import annotations

import base64
import datetime as dt
from html import escape

from orchestrator.report.figures import Drawn

Section = tuple[str, str, tuple[list[str], list[list[str]]]]
"""(title, text above it, a table)."""

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1180px;
 padding:0 1.2em;color:#1d1d1f}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:.9em} .note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.4em 0}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em} th,td{border:1px solid #ddd;padding:.3em .55em;
 text-align:left;vertical-align:top} th{background:#f3f4f6} tr:nth-child(even) td{background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em;max-width:900px}
.tabs input{display:none} .tabs label{display:inline-block;padding:.2em .7em;border:1px solid #ccc;
 border-radius:4px;margin:0 .3em .3em 0;cursor:pointer;font-size:.9em} .tabs input:checked+label{background:#1f77b4;
 color:#fff;border-color:#1f77b4} .panel{display:none}
.headline{display:flex;flex-wrap:wrap;gap:1em;margin:1em 0}
.card{border:1px solid #ddd;border-radius:8px;padding:.7em 1em;
 flex:1 1 280px;max-width:420px} .card b{font-size:1.5em;display:block} .card span{color:#555;font-size:.88em}
"""


def page(experiment: str, unit: str, headline: list[tuple[str, str, str]], ranking: str,
         summary: tuple[list[str], list[list[str]]], figures: list[Drawn], sections: list[Section], notes: list[str],
         legend: str) -> str:
    """The page: a card per defence (`headline`: name, worst case, what reached it), the ranking,
    the summary table, the figures, then each further section's table."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(experiment)}: "
           f"budget-to-failure</title><style>{_CSS}</style></head><body>",
           f"<h1>Budget-to-failure: {escape(experiment)}</h1>",
           f"<p class='meta'>attack-sweep report, budgets in {escape(unit)}, written {when} from the MLflow records "
           "of this sweep.</p>",
           "<div class='headline'>" + "".join(
               f"<div class='card'>{escape(name)}<b>{escape(value)}</b><span>{escape(detail)}</span></div>"
               for name, value, detail in headline) + "</div>",
           f"<p>{escape(ranking)}</p>", _table(*summary)]
    out += [f"<p class='note'>{escape(n.removeprefix('note: '))}</p>" for n in notes]
    out.append(f"<p class='meta'>{escape(legend)}</p>")
    done: set[str] = set()
    for fig in figures:
        if fig.group in done:
            continue
        if fig.group:
            done.add(fig.group)
            out.append(_tabs([f for f in figures if f.group == fig.group]))
        else:
            out.append(f"<h2 id='{fig.name}'>{escape(fig.title)}</h2>{_figure(fig)}")
    for title, text, (header, body) in sections:
        out.append(f"<h2>{escape(title)}</h2>" + (f"<p>{escape(text)}</p>" if text else "") + _table(header, body))
    out.append("</body></html>")
    return "\n".join(out)


def _figure(fig: Drawn) -> str:
    data = base64.b64encode(fig.path.read_bytes()).decode("ascii")
    return (f"<figure><img alt='{escape(fig.title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{escape(fig.caption)}</figcaption></figure>")


def _tabs(figs: list[Drawn]) -> str:
    """Alternative figures under one heading, one shown at a time, picked by a tab (radio buttons
    and CSS: no script)."""
    group = figs[0].group
    labels = [f.name.removeprefix(group + "-") for f in figs]
    radios = "".join(f"<input type='radio' name='{group}' id='{f.name}-tab'{' checked' if i == 0 else ''}>"
                     f"<label for='{f.name}-tab'>{escape(label)}</label>"
                     for i, (f, label) in enumerate(zip(figs, labels, strict=True)))
    panels = "".join(f"<div class='panel'>{_figure(f)}</div>" for f in figs)
    rules = "".join(f"#{f.name}-tab:checked ~ .panels > .panel:nth-child({i + 1}){{display:block}}"
                    for i, f in enumerate(figs))
    title = figs[0].title.split(" (")[0]
    return (f"<h2 id='{group}'>{escape(title)}</h2><p class='meta'>budget unit:</p><div class='tabs'>{radios}"
            f"<div class='panels'>{panels}</div></div><style>{rules}</style>")


def _table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td{_cls(c)}>{escape(c)}</td>" for c in b) + "</tr>" for b in body)
    return f"<div style='overflow-x:auto'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"


def _cls(text: str) -> str:
    try:
        float(text.lstrip("> ").split(" ")[0])
    except ValueError:
        return ""
    return " class='num'"
