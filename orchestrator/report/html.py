"""report.html: one self-contained page (inline CSS, figures as data: URIs; no script, no font or
stylesheet fetched), so it opens from file:// on a machine with no network and can be mailed."""

from __future__ import annotations

import base64
import datetime as dt
from html import escape

from orchestrator.report.conditions import Cell, Glance
from orchestrator.report.figures import Drawn
from orchestrator.report.records import REFERENCE, defence_label

Section = tuple[str, str, tuple[list[str], list[list[str]]]] | tuple[str, str, tuple[list[str], list[list[str]]], str]
"""(title, text above it, a table[, how to show it: "heat" shades each cell by its leading number in [0, 1]])."""

BADGES = {"pass": "✓ pass", "fail": "✗ fail", "inconclusive": "? inconclusive", "not measured": "– not measured",
          "base": f"● {REFERENCE}", "reported": ""}
"""A verdict as its badge's text: a symbol and the word, so it reads without colour."""

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
.card .cond{display:block;margin-top:.4em;color:#1d1d1f;font-size:.88em}
.badge{display:inline-block;padding:.05em .5em;border-radius:1em;font-size:.85em;font-weight:600;
 white-space:nowrap;border:1.5px solid transparent}
.b-pass{background:#dff3e4;color:#0b5d1e;border-color:#1e8e3e} .b-fail{background:#b3261e;color:#fff}
.b-inconclusive{background:#fff3c4;color:#6b4e00;border-color:#c99a00;border-style:dashed}
.b-not-measured{background:#fff;color:#666;border-color:#bbb;border-style:dotted}
.b-base{background:#e8eef7;color:#2d4a7a;border-color:#9fb3d1}
table.glance{font-size:.92em} table.glance td,table.glance th{padding:.45em .7em;vertical-align:middle}
table.glance thead small{display:block;font-weight:normal;color:#666;font-size:.85em;white-space:nowrap}
table.glance td{max-width:16em}
table.glance tbody th{background:#fff;text-align:left} table.glance tr:nth-child(even) td{background:#fff}
table.glance .fig{display:block;font-variant-numeric:tabular-nums;color:#333;margin-top:.15em}
table.glance .none{color:#888;font-size:.85em}
"""


def page(experiment: str, unit: str, headline: list[tuple[str, str, str]], ranking: str,
         summary: tuple[list[str], list[list[str]]], figures: list[Drawn], sections: list[Section], notes: list[str],
         legend: str, conditions: tuple[str, str, list[Glance], dict[str, str]] | None = None) -> str:
    """The page: a card per defence (`headline`: name, worst case, what reached it), the ranking,
    with `conditions` (title, legend, a Glance per defence in headline's order, what each condition
    asks) the conditions at a glance and the trainability figure, then the summary table, the
    figures, and each further section's table."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(experiment)}: "
           f"budget-to-failure</title><style>{_CSS}</style></head><body>",
           f"<h1>Budget-to-failure: {escape(experiment)}</h1>",
           f"<p class='meta'>attack-sweep report, budgets in {escape(unit)}, written {when} from the MLflow records "
           "of this sweep.</p>",
           "<div class='headline'>" + "".join(
               f"<div class='card'>{escape(name)}<b>{escape(value)}</b><span>{escape(detail)}</span>"
               + (f"<span class='cond'>{escape(conditions[2][k].summary)}</span>" if conditions else "") + "</div>"
               for k, (name, value, detail) in enumerate(headline)) + "</div>",
           f"<p>{escape(ranking)}</p>"]
    block = [f for f in figures if f.group == "trainability"]
    if conditions:
        out.append(_conditions(*conditions, block))
        figures = [f for f in figures if f.group != "trainability"]
    out.append((f"<h2 id='summary'>Budget-to-failure per defence ({escape(unit)})</h2>" if conditions else "")
               + _table(*summary))
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
    for title, text, (header, body), *how in sections:
        out.append(f"<h2>{escape(title)}</h2>" + (f"<p>{escape(text)}</p>" if text else "")
                   + _table(header, body, heat="heat" in how)
                   + ("<p class='meta'>Shaded by the number: the redder, the closer to 1.</p>" if "heat" in how
                      else ""))
    out.append("</body></html>")
    return "\n".join(out)


def _conditions(title: str, legend: str, glance: list[Glance], asks: dict[str, str], figs: list[Drawn]) -> str:
    """The conditions at a glance: a row per defence, a badge and a figure per condition, the
    paired ratio; then the legend and the trainability figure."""
    names = ["resistance", "stability", "trainability", "generalisation"]
    head = "<th>defence</th>" + "".join(
        f"<th>{escape(n)}" + (f"<small>{escape(asks[n])}</small>" if n in asks else "") + "</th>"
        for n in [*names, "paired"]).replace("<th>paired", "<th>paired vs base") + "<th>passed</th>"
    rows = []
    for g in glance:
        cells = "".join(_verdict_cell(g.cells[n]) for n in names)
        pair = g.cells["paired"]
        paired = ("<span class='none'>reference</span>" if pair.verdict == "base" else
                  f"<span class='fig'>{escape(pair.figure)}</span>" if pair.figure else
                  f"<span class='none'>no ratio: {escape(pair.detail)}</span>" if pair.detail else
                  f"<span class='none'>{escape(pair.verdict)}</span>")
        passed = "-" if g.is_base or not g.judged else f"{g.passed} of {g.judged}"
        rows.append(f"<tr><th>{escape(defence_label(g.defence, g.is_base))}</th>"
                    f"{cells}<td title='{escape(pair.detail)}'>{paired}</td><td class='num'>{passed}</td></tr>")
    table = (f"<div style='overflow-x:auto'><table class='glance'><thead><tr>{head}</tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table></div>")
    shown = "".join(f"<h3 id='{f.name}'>{escape(f.title)}</h3>{_figure(f)}" for f in figs)
    return (f"<section id='conditions'><h2>{escape(title)}</h2>{table}<p class='meta'>{escape(legend)} "
            "Hover a cell for what its verdict rests on; the table below the figures spells it out.</p>"
            f"{shown}</section>")


def _verdict_cell(cell: Cell) -> str:
    cls = "b-" + cell.verdict.replace(" ", "-")
    badge = f"<span class='badge {cls}'>{escape(BADGES.get(cell.verdict, cell.verdict))}</span>"
    figure = f"<span class='fig'>{escape(cell.figure)}</span>" if cell.figure else ""
    return f"<td class='verdict v-{cls[2:]}' title='{escape(cell.detail)}'>{badge}{figure}</td>"


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


def _table(header: list[str], body: list[list[str]], heat: bool = False) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td{_cls(c)}{_heat(c) if heat and i else ''}>{escape(c)}</td>"
                                    for i, c in enumerate(b)) + "</tr>" for b in body)
    return f"<div style='overflow-x:auto'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"


def _cls(text: str) -> str:
    """Right-aligned as a number: a number, a bound or an interval, not words that start with one."""
    if len(text) > 24:
        return ""
    try:
        float(text.lstrip("> ").split(" ")[0])
    except ValueError:
        return ""
    return " class='num'"


def _heat(text: str) -> str:
    """A cell's background by its leading number in [0, 1] (harmfulness: redder is more harmful)."""
    try:
        v = float(text.split(" ")[0])
    except ValueError:
        return ""
    return f" style='background:rgba(214,39,40,{0.6 * v:.2f})'" if 0 <= v <= 1 else ""
