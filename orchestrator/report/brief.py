"""The few lines a run ends with: per defence its worst case and verdict, the four conditions in a
line each, the durability table where the sweep built defences or ran their papers' attackers, and
where the full report is (`attack-sweep report` prints every table)."""

from __future__ import annotations

from orchestrator.conditions import verdicts as V
from orchestrator.conditions.records import Records
from orchestrator.report import durability
from orchestrator.report.families import family
from orchestrator.report.records import DefenceRow
from orchestrator.report.tables import attacker_label, render_text, worst_cell


def brief(rows: list[DefenceRow], unit: str, conditions: Records | None = None) -> list[str]:
    """Per defence, the answer in one line; then, where the sweep asked for conditions, one line of
    verdicts per defence (the base is the reference the others are judged against)."""
    width = max(len(r.label) for r in rows)
    everyone = [t for r in rows for t in r.trials]
    lines = [f"Worst case per defence ({unit}; the cheapest successful attack):"]
    for r in rows:
        worst, value = r.cheapest(unit), worst_cell(r, unit)
        found = f"{value} {unit} by {attacker_label(everyone, worst)}" if worst else value
        lines.append(f"  {r.label:<{width}}  {found}: {r.verdict()}" if worst else f"  {r.label:<{width}}  "
                     f"{r.verdict()}")
    if conditions is not None and conditions.asked:
        lines.append("Conditions (" + " / ".join(V.Verdict.CONDITIONS) + "):")
        for v in V.judge(rows, conditions, unit):
            label = next(r.label for r in rows if r.defence == v.defence)
            cells = [_cell(getattr(v, c), c, unit) for c in V.Verdict.CONDITIONS]
            lines.append(f"  {label:<{width}}  " + " / ".join(cells))
    if durability.shown(conditions):
        lines.append(f"Durability ({unit}; (a) the defence's paper's attacker, (b) the adaptive search's worst case, "
                     "f and utility at release):")
        header, body = durability.table(rows, conditions, unit)
        keep = [header.index(h) for h in BRIEF_DURABILITY]   # the attacker is on the worst-case lines above
        cut = [[b[i] for i in keep] for b in body]
        for r, cells in zip(rows, cut, strict=True):   # and its attack family beside (b)
            worst = r.cheapest(unit)
            cells.insert(4, family(worst, "method") if worst is not None else "-")
        short = list(BRIEF_DURABILITY.values())
        lines += render_text(short[:4] + ["(b) by"] + short[4:], cut).splitlines()
    return lines


BRIEF_DURABILITY = {"defence": "defence", "method": "method", "(a) paper's attacker": "(a)",
                    "(b) adaptive worst case": "(b)", "f at release": "f", "utility at release": "utility",
                    "verdict": "verdict"}
"""The durability table's columns a run ends with, and their short headers (the line above says them);
the attack family of (b) goes beside it."""

FIGURES = {"resistance": "{} " + "{unit}", "stability": "Δ {}", "trainability": "{}x", "generalisation": "{}x"}
"""Each condition's figure with what it counts: the worst case's budget, the utility change from the
base, a ratio of budgets."""


def _cell(j: V.Judged, condition: str, unit: str) -> str:
    """A verdict and its figure in a few characters: 'fail (2.67x)', 'pass (Δ -0.01)', 'reference'."""
    if j.verdict == V.BASE:
        return V.BASE if condition == "resistance" else "reference"
    if j.figure is None or j.verdict not in (V.PASS, V.FAIL):
        return j.verdict
    value = f"{j.figure.value:+.2g}" if condition == "stability" else str(j.figure)
    return f"{j.verdict} ({FIGURES[condition].format(value, unit=unit)})"
