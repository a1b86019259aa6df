"""The sweep's answer on its MLflow sweep run, written when the sweep ends: open that run and
read each defence's worst case without running `attack-sweep report`."""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlflow import entities
from mlflow.tracking import MlflowClient

from orchestrator.conditions import verdicts as V
from orchestrator.conditions.records import rirs
from orchestrator.echo import say
from orchestrator.report.folder import replaced
from orchestrator.report.tables import median_cell, worst_cell
from orchestrator.tracking.readers import ui_path
from trainables.conditioning import TASKS
from trainables.names import STATUSES, Kind, Summary, Tag


@dataclass(frozen=True)
class Published:
    """What publish read and wrote: every defence's row (report.DefenceRow; empty while no trial
    has finished) and the report as text for a terminal ('' without rows)."""

    rows: list
    text: str


def publish(tracking_uri: str, experiment: str, parent_run_id: str, unit: str = "steps",
            echo: Callable[[str], None] = say, out_dir: Path | None = None) -> Published | None:
    """Write the summary, the description and the report onto the sweep run, the report written
    into `out_dir` whole (folder.replaced; a temporary folder if None) and logged from there; None
    (after one printed line) when that failed."""
    try:
        return _publish(tracking_uri, experiment, parent_run_id, unit, out_dir)
    except Exception as err:  # noqa: BLE001 - the trials are recorded; the summary is a convenience
        text = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        echo(f"note: the sweep's summary was not written to its MLflow run ({text}); the trial records are "
             f"complete: `attack-sweep report --experiment {experiment}` reads them")
        return None


def _publish(tracking_uri: str, experiment: str, parent_run_id: str, unit: str, out_dir: Path | None) -> Published:
    from orchestrator import report
    from orchestrator.conditions import records as conditions

    client = MlflowClient(tracking_uri)
    rows = report.load(tracking_uri, experiment)
    cond = conditions.load(tracking_uri, experiment)
    n = sum(len(row.trials) for row in rows)
    now = int(time.time() * 1000)
    metrics = [entities.Metric(Summary.TRIALS, n, now, n)]
    # in the order the run page lists them: the sweep's unit first, worst cases before medians
    for u in [unit, *(u for u in report.UNITS if u != unit)]:
        for name, value in [(Summary.worst(u, row.defence), _worst(row, u)) for row in rows] + \
                [(Summary.median(u, row.defence), row.median(u)) for row in rows]:
            if value is not None and math.isfinite(value):
                metrics.append(entities.Metric(name, value, now, n))
    metrics += [entities.Metric(Summary.count(s, row.defence), row.count(s), now, n) for row in rows for s in STATUSES]
    judged = V.judge(rows, cond, unit) if cond.asked else []
    metrics += [entities.Metric(name, value, now, n) for name, value in _condition_metrics(judged, unit)]
    metrics += [entities.Metric(name, value, now, n) for name, value in _diagnostic_metrics(cond.diagnostic)]
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(parent_run_id, metrics=metrics[i:i + 1000])
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    client.set_tag(parent_run_id, Tag.NOTE, description(client, experiment_id, experiment, rows, unit, judged,
                                                         cond.diagnostic))
    if not rows:
        return Published(rows, "")
    with contextlib.ExitStack() as stack:
        if out_dir is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="attack-sweep-report-")))
            text = report.write(rows, experiment, folder, unit, conditions=cond)
        else:  # written beside out_dir, then renamed into place (folder.py)
            with replaced(out_dir, report.owned) as staged:
                text = report.write(rows, experiment, staged, unit, conditions=cond)
            folder = out_dir
        for path in report.files(folder):  # what write wrote, never whatever else the folder holds
            client.log_artifact(parent_run_id, str(path), (Path("report") / path.relative_to(folder).parent).as_posix())
    return Published(rows, text)


def description(client: MlflowClient, experiment_id: str, experiment: str, rows: list, unit: str,
                judged: list | None = None, diagnostic: dict | None = None) -> str:
    """The sweep run's description, in Markdown: each defence's worst case and median in a line
    each, the four conditions' verdicts when the sweep judged them, where the trials and the report
    are, then the summary table."""
    units = ["steps"] + ([unit] if unit != "steps" else [])
    header = ["defence", *(f"worst case ({u})" for u in units), f"median ({unit})", "verdict",
              "failed / resisted / other", "cheapest attack"]
    # the run page folds a description to its first lines: the answer first, in words
    lines = [f"**Worst case** (the cheapest successful attack, {unit}): "
             + " · ".join(f"**{row.defence} {worst_cell(row, unit)}**" for row in rows) + "  ",
             f"Median ({unit}): " + " · ".join(f"{row.defence} {median_cell(row, unit)}" for row in rows) + "  ",
             *_conditions_line(judged or []),
             *_conditioning_line(diagnostic or {}),
             f"Trial runs, cheapest attack first: [the saved view]({ui_path(experiment_id)}); the whole "
             "report: Artifacts, report/report.html.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        worst = row.cheapest(unit) or row.cheapest("steps")
        other = len(row.trials) - row.count("failed") - row.count("resisted")
        cells = [row.defence, *(worst_cell(row, u) for u in units), median_cell(row, unit), row.verdict(),
                 f"{row.count('failed')} / {row.count('resisted')} / {other}",
                 _run_name(client, experiment_id, row.defence, worst.attacker_id) if worst else "-"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    if not rows:
        lines.append("| (no finished trials yet) |" + " |" * (len(header) - 1))
    base = next((row.defence for row in rows if row.is_base), None)
    lines += ["", f"**{experiment}**: budget-to-failure per defence" + (f" ({base}: the undefended base)" if base
                                                                        else "") +
              ". Worst case: the cheapest successful attack; median: censoring-aware (attacks that resisted count "
              "up to where they stopped); other: diverged, degenerate, unsafe at release, error. The same numbers "
              "are this run's metrics (`worst_btf_<unit>.<defence>`, `median_btf_<unit>.<defence>`, "
              "`n_<status>.<defence>`). The saved view of the trial runs is also in the Runs page's Views menu; "
              "the report's figures are in report/figures/."]
    return "\n".join(lines)


def _run_name(client: MlflowClient, experiment_id: str, defence: str, attacker_id: str) -> str:
    """The run name of a defence's trial by one attacker (what the runs table shows)."""
    runs = client.search_runs([experiment_id], f"tags.{Tag.KIND} = '{Kind.TRIAL}' and tags.{Tag.DEFENCE} = "
                              f"'{defence}' and tags.{Tag.ATTACKER_ID} = '{attacker_id}'", max_results=10)
    live = [r for r in runs if Tag.SUPERSEDED not in r.data.tags] or runs
    return live[0].info.run_name if live else attacker_id


def _worst(row, unit: str) -> float | None:
    """The defence's worst case in `unit`: the cheapest successful attack's budget (None: none, or
    not recorded in this unit)."""
    trial = row.cheapest(unit)
    return trial.value(unit) if trial else None


def _condition_metrics(judged: list, unit: str) -> list[tuple[str, float]]:
    """Per defence: each condition's figure (stability_delta, trainability_ratio, generalisation_ratio,
    in/out-of-domain worst cases, paired_ratio) and conditions_passed, so the compare view ranks them."""
    out = []
    for v in judged:
        figures = {"stability_delta": v.stability, "trainability_ratio": v.trainability,
                   "generalisation_ratio": v.generalisation, "paired_ratio": v.paired}
        for name, j in figures.items():
            if j.figure is not None and j.verdict not in (V.BASE,) and math.isfinite(j.figure.value):
                out.append((Summary.condition(name, v.defence), j.figure.value))
        for key in ("in_domain_worst", "out_of_domain_worst"):
            if (x := v.generalisation.extra.get(key)) is not None and math.isfinite(x):
                out.append((Summary.condition(f"{key}_btf_{unit}", v.defence), x))
        passed, judged = v.passed
        if judged:
            out.append((Summary.condition("conditions_passed", v.defence), float(passed)))
    return out


def _conditions_line(judged: list) -> list[str]:
    """'**Conditions** (resistance / stability / trainability / generalisation): rescaled fail / pass /
    fail / pass (2 of 4)', one defence after another; nothing when the sweep judged none."""
    if not judged:
        return []
    parts = []
    for v in judged:
        if v.is_base:
            continue
        passed, judged = v.passed
        parts.append(f"**{v.defence}** " + " / ".join(getattr(v, c).verdict for c in V.Verdict.CONDITIONS)
                     + (f" ({passed} of {judged})" if judged else ""))
    return ["**Conditions** (resistance / stability / trainability / generalisation): " + " · ".join(parts) + "  "]


def _diagnostic_metrics(diagnostic: dict) -> list[tuple[str, float]]:
    """Per defence: kappa_<task> where measured, and rir against the base's (names.Summary.condition)."""
    ratios = rirs(diagnostic)
    out = []
    for d in diagnostic.values():
        out += [(Summary.condition(f"kappa_{task}", d.defence), k) for task, k in d.kappa().items()]
        if math.isfinite(ratio := ratios.get(d.defence, math.nan)):
            out.append((Summary.condition("rir", d.defence), ratio))
    return out


def _conditioning_line(diagnostic: dict) -> list[str]:
    """'**Conditioning** (RIR vs the base; κ harmful / benign): deep 2.22 (6.3e+05 / 8.67e+04) · ...'."""
    ratios = rirs(diagnostic)
    if not ratios:
        return []
    parts = []
    for d in diagnostic.values():
        k, ratio = d.kappa(), ratios[d.defence]
        kappas = " / ".join(f"{k[t]:.3g}" if t in k else d.verdict.get(t, "-") for t in TASKS)
        parts.append(f"**{d.defence}** " + ("reference" if d.is_base else f"{ratio:.3g}" if math.isfinite(ratio)
                                             else "-") + f" ({kappas})")
    return ["**Conditioning** (RIR vs the base; κ harmful / benign): " + " · ".join(parts) + "  "]
