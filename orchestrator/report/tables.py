"""The report's tables: as text cells (terminal, Markdown, HTML) and as numbers (CSV).

Text cells say what a number means ('> 40': resisted past 40 steps; '[5, 10]': an interval).
CSV rows hold numbers only: a censored value is its bound with a censored flag beside it, an
interval is two columns, +inf reads 'inf', unknown is empty.
"""

from __future__ import annotations

import math
import re
import shutil
import textwrap

from orchestrator.report.records import DefenceRow, Trial, check_unit, varying
from orchestrator.spec import attackers
from orchestrator.stats import bootstrap
from trainables.names import CENSORED, FAILED_ATTACK, LOSS_EXPLODED, STATUSES, SUCCESS

Table = tuple[list[str], list[list[str]]]
EXPLODED_MARK = " (loss exploded)"
STATUS_HEADER = {"unsafe_at_release": "unsafe@0"}
"""A status's column name where it differs from the status."""
WIDTH = 100
"""Text tables are wrapped to fit this many columns (or the terminal, if narrower)."""


def attacker_label(trials: list[Trial], trial: Trial) -> str:
    """The trial's attacker params that vary across `trials`."""
    return attackers.label({k: attackers.from_param(v) for k, v in trial.params.items()}, varying(trials))


def cell(trial: Trial, unit: str = "steps") -> str:
    """A trial in a word: its budget-to-failure in `unit`, or why it has none."""
    if trial.status == "unsafe_at_release":
        return "0 (unsafe)"
    if trial.status in (*FAILED_ATTACK, "error"):
        return trial.status
    if trial.status == "pruned":
        return f"> {_num(trial.spent[unit])} (pruned)" if unit in trial.spent else "pruned"
    return _fmt(trial.value(unit), trial.max_steps, unit) + (EXPLODED_MARK if trial.exploded else "")


def _facts(r: DefenceRow, unit: str, everyone: list[Trial]) -> dict[str, str]:
    """A defence's facts in `unit`, as text cells."""
    worst, T, reach = r.cheapest(unit), r.floor or r.max_steps, r.follow_up(unit)
    lo, hi = r.median_ci(unit)
    return {"defence": r.label, "trials": str(len(r.trials)),
            "worst": worst_cell(r, unit),
            "resolution": _num(worst.resolution_steps) if worst and worst.resolution_steps is not None else "-",
            "worst_ci": _interval(r.ci(unit)["min"], T, unit), "median": median_cell(r, unit),
            "median_ci": "-" if math.isnan(lo) else f"[{_beyond(lo, reach)}, {_beyond(hi, reach)}]",
            "verdict": r.verdict(), "attacker": attacker_label(everyone, worst) if worst else "-"}


def table(rows: list[DefenceRow], unit: str = "steps") -> Table:
    """One row per defence: outcomes, worst case, censoring-aware median and the verdict."""
    check_unit(unit)
    everyone = [t for r in rows for t in r.trials]
    header = ["defence", "trials", *(STATUS_HEADER.get(s, s) for s in STATUSES), f"min_btf_{unit}",
              "resolution_steps", "min_ci95", f"median_btf_{unit}", "median_ci95",
              "weak_resistance", "cheapest_successful_attacker"]
    body = []
    for r in rows:
        f = _facts(r, unit, everyone)
        body.append([f["defence"], f["trials"], *(str(r.count(s)) for s in STATUSES), f["worst"], f["resolution"],
                     f["worst_ci"], f["median"], f["median_ci"], f["verdict"], f["attacker"]])
    return header, body


def worst_cell(row: DefenceRow, unit: str) -> str:
    """The defence's worst case in `unit` as text: the cheapest success, '> T' when every attack
    that measured it resisted, '-' when none did."""
    worst = row.cheapest(unit)
    if worst is not None:
        bound = "≤ " if row.pruned_in not in (None, unit) else ""  # a pruned attack might be cheaper here
        return bound + _fmt(worst.value(unit), row.max_steps, unit) + (EXPLODED_MARK if worst.exploded else "")
    return _above(row.floor, unit) if row.floor is not None else "-"


def median_cell(row: DefenceRow, unit: str) -> str:
    """The defence's censoring-aware median in `unit` as text ('> X' beyond the follow-up)."""
    return _beyond(row.median(unit), row.follow_up(unit))


def summary(rows: list[DefenceRow], unit: str = "steps") -> Table:
    """The defence table for a terminal: the same facts as `table`, in fewer, wrappable columns."""
    check_unit(unit)
    everyone = [t for r in rows for t in r.trials]
    body = []
    for r in rows:
        f = _facts(r, unit, everyone)
        same = f["worst_ci"] in ("-", f"[{f['worst']}, {f['worst']}]")
        body.append([f["defence"], ", ".join(f"{r.count(s)} {s.replace('_', ' ')}" for s in STATUSES if r.count(s)),
                     f["worst"] + ("" if same else f" {f['worst_ci']}"), f["resolution"],
                     f["median"] + ("" if f["median_ci"] == "-" else f" {f['median_ci']}"), f["verdict"],
                     f["attacker"]])
    return (["defence", "trials", "worst case", "resolution", "median", "verdict", "cheapest successful attacker"],
            body)


def csv_table(rows: list[DefenceRow], unit: str = "steps") -> Table:
    """The defence table as numbers: report.csv."""
    check_unit(unit)
    everyone = [t for r in rows for t in r.trials]
    header = ["defence", "base", "trials", *STATUSES, f"min_btf_{unit}", "min_btf_censored", "min_ci95_lo",
              "min_ci95_hi", "resolution_steps", "loss_exploded", f"median_btf_{unit}", "median_censored",
              "median_ci95_lo", "median_ci95_hi", f"follow_up_{unit}", "held", "verdict",
              "cheapest_successful_attacker", "cheapest_attacker_id"]
    body = []
    for r in rows:
        worst, reach = r.cheapest(unit), r.follow_up(unit)
        lo, hi = r.ci(unit)["min"] if worst else (math.nan, math.nan)
        if worst is not None:
            value, censored = worst.value(unit), False
        else:  # no success: the worst case lies above the shortest horizon resisted to (in steps)
            value, censored = (float(r.floor), True) if r.floor is not None and unit == "steps" else (math.nan, False)
        median, (mlo, mhi) = r.median(unit), r.median_ci(unit)
        body.append([
            r.defence, _bool(r.is_base), str(len(r.trials)), *(str(r.count(s)) for s in STATUSES),
            _number(value), _bool(censored), _number(lo), _number(hi),
            _number(worst.resolution_steps if worst else None), _bool(bool(worst and worst.exploded)),
            _number(reach if math.isinf(median) else median), _bool(math.isinf(median)),
            _number(mlo), _number(mhi), _number(reach), _bool(r.weak_resistance), r.verdict(),
            attacker_label(everyone, worst) if worst else "", worst.attacker_id if worst else ""])
    return header, body


def trial_table(rows: list[DefenceRow], unit: str = "steps") -> Table:
    """Every trial as numbers, one row each (trials.csv): its attacker's params, status, its
    budget-to-failure in `unit` (or, censored, where it stopped) and the compute it spent; beside the
    primary's final f, the share of its answers incoherent there, and the step where f without the
    coherence gate crossed phi while f did not (a crossing by incoherent answers only)."""
    check_unit(unit)
    everyone = [t for r in rows for t in r.trials]
    keys = varying(everyone)
    header = ["defence", "base", "attacker", "attacker_id", "attacker_group", *keys, "status", f"btf_{unit}",
              "censored", f"spent_{unit}", "resolution_steps", "max_steps", "loss_peak_ratio", "f_final",
              "incoherent_final", "incoherent_crossing_step", "run_id"]
    body = []
    for t in sorted(everyone, key=lambda t: (not t.is_base, t.defence, [order_key(t.params.get(k)) for k in keys])):
        value = t.btf.get(unit) if t.status in SUCCESS else t.spent.get(unit) if t.status in CENSORED else None
        body.append([t.defence, _bool(t.is_base), attacker_label(everyone, t), t.attacker_id, t.attacker_group,
                     *(t.params.get(k, "") for k in keys), t.status, _number(value), _bool(t.status in CENSORED),
                     _number(t.spent.get(unit)), _number(t.resolution_steps), str(t.max_steps),
                     _number(t.loss_peak_ratio), _number(t.harmfulness), _number(t.incoherent),
                     _number(t.incoherent_crossing), t.run_id])
    return header, body


def evaluator_table(rows: list[DefenceRow], unit: str = "steps", numbers: bool = False) -> Table:
    """Each evaluator's own worst case per defence (its first crossing of phi with the model
    still working, at the points the trial evaluated), the trials it crossed in, and how
    often it disagreed with the primary on whether a trial crossed at all. "primary" marks the
    label that decided trials: the spec's primary, or <primary>.trigger under a backdoor trigger."""
    header = ["defence", "evaluator", "primary", f"min_btf_{unit}", "trials_crossed", "disagree_with_primary"] \
        if numbers else ["defence", "evaluator", f"min_btf_{unit}", "trials_crossed", "disagree_with_primary"]
    body = []
    for r in rows:
        labels = r.evaluator_labels()
        deciding = {t.deciding for t in r.trials}   # the primary, or <primary>.trigger under a trigger
        for i, label in enumerate(labels):
            worst, crossed = r.evaluator_worst(label, unit)
            disagree = "" if i == 0 else str(r.disagreements(label, labels[0]))
            if numbers:
                body.append([r.defence, label, _bool(label in deciding), _number(worst), str(crossed), disagree])
            else:
                body.append([r.defence, label + (" (primary)" if label in deciding else ""), _fmt(worst),
                             str(crossed), disagree or "-"])
    return header, body


def attacker_table(rows: list[DefenceRow], unit: str = "steps") -> Table:
    """Budget-to-failure in `unit` of every attacker against every defence, side by side,
    sorted by the varying attacker params (numbers as numbers: 32 before 128)."""
    everyone = [t for r in rows for t in r.trials]
    keys = varying(everyone)
    by_attacker: dict[str, dict[str, Trial]] = {}
    for t in everyone:
        by_attacker.setdefault(t.attacker_id, {})[t.defence] = t
    header = ["attacker", *(r.defence for r in rows)]
    entries = []
    for cells in by_attacker.values():
        first = next(iter(cells.values()))
        line = [attacker_label(everyone, first), *(cell(cells[r.defence], unit) if r.defence in cells else "-"
                                                   for r in rows)]
        entries.append(([order_key(first.params.get(k)) for k in keys], line))
    return header, [line for _, line in sorted(entries)]


def coherence_table(rows: list[DefenceRow]) -> Table:
    """Beside attacker_table: each trial's final f (the primary's, with the coherence gate) and the
    share of its answers the gate found incoherent there, "f 0.72 · incoherent 0.10", and where f
    without the gate crossed phi while f did not, the first such step ("loops crossed at 8"). Empty
    when no trial was scored under the gate (coherence: {enabled: false}, or older records)."""
    everyone = [t for r in rows for t in r.trials]
    if all(t.incoherent is None for t in everyone):
        return ["attacker", *(r.defence for r in rows)], []
    keys = varying(everyone)
    by_attacker: dict[str, dict[str, Trial]] = {}
    for t in everyone:
        by_attacker.setdefault(t.attacker_id, {})[t.defence] = t

    def text(t: Trial) -> str:
        parts = [f"f {t.harmfulness:.2f}" if t.harmfulness is not None else "f -",
                 f"incoherent {t.incoherent:.2f}" if t.incoherent is not None else "incoherent -"]
        if t.incoherent_crossing is not None:
            parts.append(f"loops crossed at {_num(t.incoherent_crossing)}")
        return " · ".join(parts)

    entries = []
    for cells in by_attacker.values():
        first = next(iter(cells.values()))
        line = [attacker_label(everyone, first), *(text(cells[r.defence]) if r.defence in cells else "-"
                                                   for r in rows)]
        entries.append(([order_key(first.params.get(k)) for k in keys], line))
    return ["attacker", *(r.defence for r in rows)], [line for _, line in sorted(entries)]


def progress_table(rows: list[DefenceRow], unit: str = "steps", every: bool = False) -> Table:
    """The adversary's progress: with `every`, all trials (progress.csv); otherwise only the
    trials that improved the best budget-to-failure, then one totals row per defence."""
    header = ["defence", "trial_number", f"cumulative_{unit}", f"best_btf_{unit}"] + (["objective"] if every else [])
    body = []
    for r in rows:
        steps = r.progress(unit)
        if every:  # data for plots: full precision, empty when unknown
            body += [[r.defence, str(p.trial_number), *(_number(x) for x in (p.cumulative, p.best, p.objective))]
                     for p in steps]
        elif steps:
            body += [[r.defence, str(p.trial_number), _fmt(p.cumulative), _fmt(p.best)] for p in steps if p.improved]
            last = steps[-1]
            best = _fmt(last.best) if last.best is not None else _above(r.floor, unit) if r.floor else "-"
            body.append([r.defence, f"all {len(steps)}", _fmt(last.cumulative), best])
    return header, body


def survival_table(rows: list[DefenceRow], unit: str) -> Table:
    """Every defence's survival curve: one row per knot, with its band and trials at risk."""
    header = ["defence", unit, "share_not_yet_successful", "lower95", "upper95", "at_risk", "method"]
    body = []
    for r in rows:
        c = r.survival(unit)
        body += [[r.defence, f"{t:.12g}", f"{s:.4f}", f"{lo:.4f}", f"{hi:.4f}", str(n), c.method]
                 for t, s, lo, hi, n in zip(c.times, c.surviving, c.lower, c.upper, c.at_risk, strict=True)]
    return header, body


def notes(rows: list[DefenceRow], unit: str) -> list[str]:
    """What the numbers leave out, and what they should not be trusted for."""
    out = [f"note: {r.defence}: {r.duplicates} duplicate trial record(s) ignored: trials recorded twice under "
           "one trial_key (two machines ran them against one tracking server); each counts once, its "
           "earliest finished record" for r in rows if r.duplicates]
    for r in rows:
        if (pruned := r.count("pruned")) and (best := r.cheapest(r.pruned_in)) is not None:
            out.append(f"note: {r.defence}: {pruned} trial(s) pruned (search.prune): each stopped, still safe, once "
                       f"it had spent the cheapest success's {_num(best.btf[r.pruned_in])} {r.pruned_in}, and is "
                       f"censored there. The worst case in {r.pruned_in} is exact; the median and the survival "
                       f"curve beyond {_num(best.btf[r.pruned_in])} {r.pruned_in} rest on the trials that ran on, "
                       "and worst cases in other units are upper bounds ('≤'): run without search.prune to "
                       "measure them")
        if by_loops := sorted(t.incoherent_crossing for t in r.trials if t.incoherent_crossing is not None):
            out.append(f"note: {r.defence}: {len(by_loops)} trial(s) crossed phi by incoherent answers only (f without "
                       f"the coherence gate above phi, with it not) at step(s) {', '.join(_num(s) for s in by_loops)}: "
                       "loops and fragments, recorded as such and never successes (trials.csv, "
                       "incoherent_crossing_step)")
        if exploded := [t for t in r.successes if t.exploded]:
            out.append(f"note: {r.defence}: {len(exploded)} successful attack(s) crossed phi after the training loss "
                       f"exploded (over {LOSS_EXPLODED:g}x its first step's), marked '{EXPLODED_MARK.strip()}'; read "
                       "their samples before trusting those budgets (a utility bound would judge them)")
    return out


LEGEND = (
    "btf = budget-to-failure: the attacker budget at the first evaluation where harmfulness f exceeded phi "
    "with the attacked model still working (utility within epsilon of step 0, when the spec has a utility "
    "block); the crossing lies within resolution_steps steps before it. Resisted trials are censored where "
    "they stopped (their own T); diverged and degenerate ones (f crossed phi only because the attack broke the "
    "model) are failed attacks: competing events, never successes, never resistance. The median is "
    "censoring-aware (Kaplan-Meier, or Aalen-Johansen with competing events; survival.csv holds the curve and "
    "its 95% band); '> X' when half the attacks had not succeeded by X, the largest budget reached. Its "
    f"interval is read off the band. The worst case's interval: 2.5-97.5 percentiles of {bootstrap.RESAMPLES} "
    "bootstrap resamples of each attacker's seeds; it measures seed variation of these attackers and "
    "collapses to the point estimate with one seed per attacker. The verdict says 'held' only when every "
    "attack ran to its T and resisted.")


def render_text(header: list[str], body: list[list[str]], width: int | None = None) -> str:
    """A plain-text table that fits `width` columns (default: the terminal's, at most WIDTH):
    the widest columns are narrowed and their cells wrapped onto more lines, words kept whole
    where they fit."""
    width = width or min(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    longest = [max((len(word) for c in [h, *(b[i] for b in body)] for word in _keep(c).split()), default=1)
               for i, h in enumerate(header)]
    floor = [max(6, min(w, n)) for w, n in zip(widths, longest, strict=True)]
    room = width - 2 * (len(header) - 1)
    while sum(widths) > room:
        i = max(range(len(widths)), key=lambda k: widths[k] - floor[k])
        if widths[i] <= floor[i]:  # every column at its longest word: wrap inside words
            i = max(range(len(widths)), key=lambda k: widths[k])
            if widths[i] <= 6:
                break
            floor[i] = widths[i] - 1
        widths[i] -= 1

    def lines(cells: list[str]) -> list[str]:
        wrapped = [[x.replace(_KEEP, " ") for x in textwrap.wrap(_keep(c), w, break_on_hyphens=False)] or [""]
                   for c, w in zip(cells, widths, strict=True)]
        return ["  ".join((col[k] if k < len(col) else "").ljust(w) for col, w in zip(wrapped, widths, strict=True))
                .rstrip() for k in range(max(map(len, wrapped)))]

    out = [*lines(header), "  ".join("-" * w for w in widths)]
    for b in body:
        out += lines(b)
    return "\n".join(out)


_KEEP = "\x00"


def _keep(cell: str) -> str:
    """A cell with the spaces it must not be wrapped at held: inside an interval '[15, > 40]' and
    after the '>' of a bound."""
    cell = re.sub(r"\[[^\]]*\]", lambda m: m.group(0).replace(" ", _KEEP), cell)
    return cell.replace("> ", ">" + _KEEP)


def wrap(text: str, width: int | None = None) -> str:
    """Prose for a terminal: wrapped to `width` (default as render_text), continuation lines indented."""
    width = width or min(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns)
    return textwrap.fill(text, width, subsequent_indent="  ", break_on_hyphens=False)


def render_markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body])


def order_key(value: str | None) -> tuple[int, float, str]:
    """Sort key of a param value: numbers by value, before text; missing last."""
    if value is None:
        return (2, 0.0, "")
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _bool(x: bool) -> str:
    return "true" if x else "false"


def _number(x: float | None) -> str:
    """A CSV number: full precision, 'inf' for +inf, empty when unknown."""
    return "" if x is None or math.isnan(x) else f"{x:.12g}"


def _num(x: float) -> str:
    return f"{x:g}" if x < 1e6 else f"{x:.3g}"


def _above(T: int, unit: str) -> str:
    """A budget-to-failure above the horizon T (which is counted in steps)."""
    return f"> {T}" if unit == "steps" else "> T"


def _fmt(x: float | None, T: int = 0, unit: str = "steps") -> str:
    if x is None or math.isnan(x):
        return "-"
    return _above(T, unit) if math.isinf(x) else _num(x)


def _beyond(x: float, follow_up: float) -> str:
    """A censoring-aware estimate: '> follow-up' when it lies beyond the largest budget reached."""
    if math.isnan(x):
        return "-"
    return f"> {_num(follow_up)}" if math.isinf(x) else _num(x)


def _interval(ci: tuple[float, float], T: int, unit: str) -> str:
    lo, hi = ci
    return "-" if math.isnan(lo) else f"[{_fmt(lo, T, unit)}, {_fmt(hi, T, unit)}]"
