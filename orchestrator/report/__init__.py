"""The budget-to-failure report, from MLflow records alone.

    attack-sweep report --experiment quickstart --out reports/quickstart
    report.write(report.load("sqlite:///mlflow.db", "quickstart"), "quickstart", out_dir, unit="tokens")

Per defence, in one budget unit (steps, examples, tokens, flops or accelerator_seconds):
trials; how many attacks failed (crossed phi with the model still working), resisted
(censored at their own T), diverged, degenerate (crossed phi only by breaking the model),
were unsafe at release or errored; the minimum budget-to-failure over attackers, the step
resolution of its crossing and the attacker that reached it, with a bootstrap interval; the
median budget-to-failure and survival against budget, censoring-aware; a verdict that says
"held" only when every attack ran to its horizon and resisted; and each evaluator's own worst
case, with how often the evaluators disagree. Then every attacker against every defence, and
the adversary's progress: the best budget-to-failure found so far against the compute spent.

    records.py  the trials read back from MLflow, and what follows per defence
    tables.py   the tables, as text (terminal, Markdown, HTML) and as numbers (CSV)
    figures.py  survival, harmfulness, heatmap and convergence figures (PNG)
    html.py     report.html, self-contained
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from orchestrator.report.records import DefenceRow, Progress, Trial, load
from orchestrator.report.tables import (
    LEGEND,
    attacker_label,
    attacker_table,
    csv_table,
    evaluator_table,
    median_cell,
    notes,
    progress_table,
    render_markdown,
    render_text,
    summary,
    survival_table,
    table,
    trial_table,
    worst_cell,
    wrap,
)
from trainables.names import UNITS

__all__ = ["UNITS", "DefenceRow", "Progress", "Trial", "attacker_table", "csv_table", "evaluator_table", "files",
           "load", "notes", "progress_table", "ranking", "render_text", "summary", "table", "trial_table", "write"]

FILES = ("report.csv", "trials.csv", "evaluators.csv", "progress.csv", "survival.csv", "report.md", "report.html")


def files(out_dir: Path) -> list[Path]:
    """What `write` puts in out_dir (figures/ holds the PNGs)."""
    return [out_dir / name for name in FILES] + sorted((out_dir / "figures").glob("*.png"))


def write(rows: list[DefenceRow], experiment: str, out_dir: Path, unit: str = "steps", figures: bool = True) -> str:
    """Write the report in `unit` into out_dir (FILES, and figures/*.png unless `figures` is
    False); return it as text for a terminal."""
    header, body = table(rows, unit)
    a_header, a_body = attacker_table(rows, unit)
    p_header, p_body = progress_table(rows, unit)
    e_header, e_body = evaluator_table(rows, unit)
    several_evaluators = any(len(r.evaluator_labels()) > 1 for r in rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (h, b) in {"report.csv": csv_table(rows, unit), "trials.csv": trial_table(rows, unit),
                         "evaluators.csv": evaluator_table(rows, unit, numbers=True),
                         "progress.csv": progress_table(rows, unit, every=True),
                         "survival.csv": survival_table(rows, unit)}.items():
        with open(out_dir / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(h)
            w.writerows(b)
    extra = notes(rows, unit)
    titles = {"attackers": f"Budget-to-failure ({unit}) per attacker",
              "evaluators": f"Worst case ({unit}) per evaluator, and disagreement with the primary",
              "progress": f"Adversary progress ({unit}): trials that improved the best budget-to-failure, then totals"}
    sections = [(titles["attackers"], "", (a_header, a_body))]
    if several_evaluators:
        sections.append((titles["evaluators"], "", (e_header, e_body)))
    sections.append((titles["progress"], "", (p_header, p_body)))

    md = [f"# Budget-to-failure ({unit}): {experiment}", "", render_markdown(header, body), "", LEGEND]
    md += [f"\n{n}" for n in extra]
    md += [f"\n## {title}\n\n{render_markdown(*tab)}" for title, _, tab in sections]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")

    from orchestrator.report import figures as fig
    from orchestrator.report import html

    drawn = fig.draw(rows, unit, out_dir) if figures else []
    brief, order = summary(rows, unit), ranking(rows, unit)
    (out_dir / "report.html").write_text(html.page(
        experiment, unit, _headline(rows, unit), order, brief, drawn,
        [*sections, (f"Every column ({unit})", "The same table as report.md and, as numbers, report.csv.",
                     (header, body))], extra, LEGEND))
    intro = wrap(f"Budget-to-failure in {unit} per defence: the worst case (cheapest successful attack) and the "
                 "censoring-aware median, each with its 95% interval; resolution: the crossing lies within that "
                 "many steps before it.")
    text = [wrap(order), f"{intro}\n{render_text(*brief)}", *map(wrap, extra)]
    text += [f"{wrap(title)}:\n{render_text(*tab)}" for title, _, tab in sections]
    return "\n\n".join(text)


def ranking(rows: list[DefenceRow], unit: str) -> str:
    """The defences in words, most robust first: by worst case, then by the censoring-aware median
    (defences that no attack measured are left out)."""
    def key(r: DefenceRow) -> tuple[float, float]:
        worst, median = r.cheapest(unit), r.median(unit)
        return (-worst.value(unit) if worst else -math.inf, 0.0 if math.isnan(median) else -median)

    ordered = sorted((r for r in rows if r.cheapest(unit) or r.floor is not None), key=key)
    text = "Most robust first (by worst case, then median): " + ", ".join(
        f"{r.defence} (worst case {worst_cell(r, unit)}, median {median_cell(r, unit)})" for r in ordered)
    tied = [r.defence for r in ordered if key(r)[0] == key(ordered[0])[0]]
    if len(tied) > 1:
        text += f". {' and '.join(tied)} share the worst case; the median orders them"
    return text + "."


def _headline(rows: list[DefenceRow], unit: str) -> list[tuple[str, str, str]]:
    """Per defence: its name, its worst case, and what reached it (or the verdict)."""
    everyone = [t for r in rows for t in r.trials]
    out = []
    for r in rows:
        worst = r.cheapest(unit)
        value = worst_cell(r, unit)
        detail = f"by {attacker_label(everyone, worst)}; {r.verdict()}" if worst else r.verdict()
        out.append((f"{r.defence}{' (base)' if r.is_base else ''}: worst case",
                    value if value == "-" else f"{value} {unit}", detail))
    return out
