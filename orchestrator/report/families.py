"""The report by attack family: each defence's worst case, trials and breaks per value of an attacker
field that names a kind of attack (method: sft, dpo; the data and template attacks), and the
survival curve per method. Shown only where the sweep varied such a field."""

from __future__ import annotations

import math
from pathlib import Path

from orchestrator.report import figures as fig
from orchestrator.report.records import DefenceRow, Trial
from orchestrator.report.tables import Table, _number, median_cell, order_key, worst_cell

FAMILIES = ("method", "poison_ratio", "chat_template", "prompt_format", "system_prompt", "trigger")
"""Attacker fields that choose a kind of attack rather than tune one."""
NONE = "none"
"""How a trial without a data/template field reads: that attack was not applied."""

LEGEND = ("Per defence and value of the field: the trials run, how many broke the defence (succeeded), the worst "
          "case (cheapest successful attack; '> T' when every attack resisted) and the censoring-aware median, as "
          "in the table above but over that value's trials only.")


def family(trial: Trial, field: str) -> str:
    """The trial's value of an attack-family field."""
    return trial.params.get(field, NONE)  # records.load gives a trial recorded before `method` existed sft


def varied(rows: list[DefenceRow]) -> list[str]:
    """The family fields that take more than one value across the sweep (a trial without a data or
    template field reads NONE)."""
    everyone = [t for r in rows for t in r.trials]
    return [f for f in FAMILIES if len({family(t, f) for t in everyone}) > 1]


def split(row: DefenceRow, field: str) -> list[tuple[str, DefenceRow]]:
    """The defence's trials by the field's value, each as a DefenceRow of its own (values in order)."""
    groups: dict[str, list[Trial]] = {}
    for t in row.trials:
        groups.setdefault(family(t, field), []).append(t)
    return [(v, DefenceRow(row.defence, row.is_base, trials=groups[v])) for v in sorted(groups, key=order_key)]


def family_table(rows: list[DefenceRow], field: str, unit: str = "steps", numbers: bool = False) -> Table:
    """Per defence and value of `field`: trials, successes, worst case and median in `unit`
    (numbers: the rows of families.csv, the field's name in a column so several fields share it)."""
    body = []
    for r in rows:
        for value, sub in split(r, field):
            broke = str(len(sub.successes))
            if numbers:
                worst, median = sub.cheapest(unit), sub.median(unit)
                body.append([r.defence, field, value, str(len(sub.trials)), broke,
                             _number(worst.value(unit) if worst else None),
                             _number(sub.follow_up(unit) if math.isinf(median) else median),
                             "true" if math.isinf(median) else "false"])
            else:
                body.append([r.label, value, str(len(sub.trials)), broke, worst_cell(sub, unit),
                             median_cell(sub, unit)])
    if numbers:
        return ["defence", "field", "value", "trials", "successes", f"min_btf_{unit}", f"median_btf_{unit}",
                "median_censored"], body
    return ["defence", field, "trials", "broke it", f"worst case ({unit})", f"median ({unit})"], body


def csv_rows(rows: list[DefenceRow], unit: str) -> Table:
    """families.csv: family_table's numbers for every varied field."""
    header, body = family_table(rows, FAMILIES[0], unit, numbers=True)
    return header, [b for f in varied(rows) for b in family_table(rows, f, unit, numbers=True)[1]]


def sections(rows: list[DefenceRow], unit: str) -> list[tuple[str, str, Table]]:
    """The report's sections: one table per varied family field."""
    return [(f"Worst case ({unit}) by attack family: {f}", LEGEND, family_table(rows, f, unit)) for f in varied(rows)]


def survival(rows: list[DefenceRow], unit: str, field: str = "method"):
    """One panel per defence, one survival curve per value of `field` (the same estimate as the
    survival figure); None unless the field varies."""
    if field not in varied(rows):
        return None
    shown = [(r, [(v, c) for v, sub in split(r, field) if (c := sub.survival(unit)).n]) for r in rows]
    shown = [(r, curves) for r, curves in shown if curves]
    if not shown:
        return None
    cols = min(len(shown), 3)
    lines = -(-len(shown) // cols)
    figure, axes = fig.plt.subplots(lines, cols, figsize=(4.6 * cols, 3.6 * lines), squeeze=False, sharey=True)
    values = sorted({v for _, curves in shown for v, _ in curves}, key=order_key)  # a value's colour in every panel
    for ax, (r, curves) in zip(axes.flat, shown, strict=False):
        fig.survival_axes(ax, [(f"{field} {v}", c) for v, c in curves], unit, [values.index(v) for v, _ in curves])
        ax.set_title(r.label)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    figure.tight_layout()
    return figure, f"One panel per defence, one curve per {field}. " + fig.survival_caption(
        [c for _, curves in shown for _, c in curves])


def draw(rows: list[DefenceRow], unit: str, out_dir: Path) -> list[fig.Drawn]:
    """figures/survival_by_method.png where the sweep varied method."""
    made = survival(rows, unit)
    return [fig.save(*made, "survival_by_method", f"Survival against budget ({unit}) by method", out_dir)] \
        if made else []
