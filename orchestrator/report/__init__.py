"""The budget-to-failure report, from MLflow records alone."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from orchestrator.conditions import verdicts as V
from orchestrator.conditions.records import Records
from orchestrator.report import conditions as C
from orchestrator.report import diagnostics as G
from orchestrator.report.records import DefenceRow, Progress, Trial, load
from orchestrator.report.tables import (
    LEGEND,
    attacker_label,
    attacker_table,
    coherence_table,
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
           "load", "notes", "owned", "progress_table", "ranking", "render_text", "summary", "table", "trial_table",
           "write"]

FILES = ("report.csv", "trials.csv", "evaluators.csv", "progress.csv", "survival.csv", "paired.csv", "report.md",
         "report.html")
CONDITION_FILES = ("verdicts.csv", "transfer.csv", "conditioning.csv", "durability.csv")
"""Written when the sweep asked for conditions (the verdicts, the transfer matrix) or measured its
defences' conditioning (conditioning.csv), or attacked a defence with its paper's attacker or built one
(durability.csv)."""


FAMILY_FILES = ("families.csv",)
"""Written when the sweep varied an attack family (method, a data or template attack)."""


def files(out_dir: Path) -> list[Path]:
    """What `write` put in out_dir (figures/ holds the PNGs)."""
    return [out_dir / name for name in FILES] + [p for name in (*CONDITION_FILES, *FAMILY_FILES)
                                                 if (p := out_dir / name).exists()] \
        + sorted((out_dir / "figures").glob("*.png"))


def owned(rel: Path) -> bool:
    """Whether a path in the report's folder (relative to it) is the report's: FILES,
    CONDITION_FILES, figures/ and the PNGs in it. Anything else there is the user's, kept."""
    return rel.as_posix() in (*FILES, *CONDITION_FILES, *FAMILY_FILES, "figures") or (
        rel.parent.as_posix() == "figures" and rel.suffix == ".png")


def write(rows: list[DefenceRow], experiment: str, out_dir: Path, unit: str = "steps", figures: bool = True,
          conditions: Records | None = None) -> str:
    """Write the report in `unit` into out_dir (FILES, and figures/*.png unless `figures` is
    False); return it as text for a terminal. With `conditions` (the sweep asked for some): the
    verdict table of the four conditions, verdicts.csv, and where attacks ran by domain the
    transfer matrix (transfer.csv); paired.csv compares each defence with the base per attacker."""
    header, body = table(rows, unit)
    a_header, a_body = attacker_table(rows, unit)
    p_header, p_body = progress_table(rows, unit)
    e_header, e_body = evaluator_table(rows, unit)
    several_evaluators = any(len(r.evaluator_labels()) > 1 for r in rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables_out = {"report.csv": csv_table(rows, unit), "trials.csv": trial_table(rows, unit),
                  "evaluators.csv": evaluator_table(rows, unit, numbers=True),
                  "progress.csv": progress_table(rows, unit, every=True), "survival.csv": survival_table(rows, unit)}
    if conditions is not None and conditions.asked:
        judged = V.judge(rows, conditions, unit)
        tables_out["verdicts.csv"] = C.verdict_csv(judged)
        tables_out["transfer.csv"] = C.transfer_csv(rows)
    from orchestrator.report import families

    if families.varied(rows):
        tables_out["families.csv"] = families.csv_rows(rows, unit)
    for name in (*CONDITION_FILES, *FAMILY_FILES):  # a folder reused for another sweep keeps no stale tables
        (out_dir / name).unlink(missing_ok=True)
    from orchestrator.report import durability

    if durability.shown(conditions):
        tables_out["durability.csv"] = durability.csv_rows(rows, conditions, unit)
    diagnosed = conditions.diagnostic if conditions is not None else {}
    if diagnosed:
        tables_out["conditioning.csv"] = G.conditioning_csv(diagnosed)
    tables_out["paired.csv"] = C.paired_csv(rows, unit)
    for name, (h, b) in tables_out.items():
        with open(out_dir / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(h)
            w.writerows(b)
    extra = notes(rows, unit)
    titles = {"attackers": f"Budget-to-failure ({unit}) per attacker",
              "evaluators": f"Worst case ({unit}) per evaluator, and disagreement with the primary",
              "progress": f"Adversary progress ({unit}): trials that improved the best budget-to-failure, then totals"}
    sections: list = []
    if durability.shown(conditions):   # the paper's attacker against the adaptive worst case
        sections.append((f"Durability ({unit}): each defence under its paper's attacker and under the adaptive "
                         "search", durability.LEGEND, durability.table(rows, conditions, unit)))
    block = None   # report.html shows the verdict table as its conditions block, near the top
    if conditions is not None and conditions.asked:
        verdicts = (f"Immunisation conditions ({unit})", C.CONDITIONS_LEGEND,
                    C.verdict_table(rows, judged, conditions, unit))
        block = (verdicts[0], C.CONDITIONS_LEGEND, C.glance(rows, judged, conditions, unit), C.requirements(conditions))
        sections.append(verdicts)
        sections.append(("What each verdict rests on", "", C.detail_table(judged)))
        for defence, tab in C.transfer_tables(rows):
            sections.append((f"Attack transfer against {defence}: mean f per held-out domain at each attack's end",
                             "Rows: the domain the attacker trained on; columns: the domain of the held-out "
                             "prompts. Not a verdict: it shows where attacks carry over.", tab, "heat"))
    if diagnosed:
        sections.append((f"Conditioning at release, beside the worst case ({unit})", G.CONDITIONING_LEGEND,
                         G.conditioning_table(rows, diagnosed, unit)))
    g_effect = G.g_effect_table(rows)
    if g_effect[1]:
        sections.append(("G-effect of the attacks' gradients, per defence", G.G_EFFECT_LEGEND, g_effect))
    paired = C.paired_table(rows, unit)
    if paired[1]:
        sections.append((f"Paired with the base ({unit}): each attacker against each defence and the base", "",
                         paired))
    sections += families.sections(rows, unit)
    sections.append((titles["attackers"], "", (a_header, a_body)))
    if (gated := coherence_table(rows))[1]:   # harmful means coherent: f beside its incoherent share
        sections.append(("Final f per attacker, beside the share of answers the coherence gate found incoherent",
                         "f counts coherent harmful answers only; incoherent answers (loops, fragments) are never "
                         "harmful. 'loops crossed at s': f without the gate crossed phi at step s while f did "
                         "not, a crossing by incoherent answers only, never a success.", gated))
    if several_evaluators:
        sections.append((titles["evaluators"], "", (e_header, e_body)))
    sections.append((titles["progress"], "", (p_header, p_body)))

    md = [f"# Budget-to-failure ({unit}): {experiment}", "", render_markdown(header, body), "", LEGEND]
    md += [f"\n{n}" for n in extra]
    md += [f"\n## {title}\n\n" + (f"{text}\n\n" if text else "") + render_markdown(*tab)
           for title, text, tab, *_ in sections]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")

    from orchestrator.report import figures as fig
    from orchestrator.report import html

    drawn = fig.draw(rows, unit, out_dir, conditions=conditions) if figures else []
    if figures:  # the survival curve by method right after the survival curves
        after = sum(f.group == "survival" for f in drawn)
        drawn[after:after] = families.draw(rows, unit, out_dir)
    brief, order = summary(rows, unit), ranking(rows, unit)
    (out_dir / "report.html").write_text(html.page(
        experiment, unit, _headline(rows, unit), order, brief, drawn,
        [*(s for s in sections if block is None or s[0] != block[0]),
         (f"Every column ({unit})", "The same table as report.md and, as numbers, report.csv.", (header, body))],
        extra, LEGEND, conditions=block))
    intro = wrap(f"Budget-to-failure in {unit} per defence: the worst case (cheapest successful attack) and the "
                 "censoring-aware median, each with its 95% interval; resolution: the crossing lies within that "
                 "many steps before it.")
    text = [wrap(order), f"{intro}\n{render_text(*brief)}", *map(wrap, extra)]
    text += [f"{wrap(title)}:\n{render_text(*tab)}" + (f"\n{wrap(intro)}" if intro and title.startswith("Immun")
                                                         else "") for title, intro, tab, *_ in sections]
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
        out.append((f"{r.label}: worst case",
                    value if value == "-" else f"{value} {unit}", detail))
    return out
