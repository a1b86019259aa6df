"""How a sweep's records are read back: which of one trial's runs is kept, and the MLflow UI's
saved view of the trial runs."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

from trainables.names import TRIALS_VIEW, Kind, Metric, Tag

RUN_NAME = "attributes.`Run Name`"
"""The runs table's column of run names."""


def trials_view(unit: str, columns: Sequence[str] = ()) -> dict[str, Any]:
    """A saved view of the runs table (MLflow 3.17's envelope: name, times, and the view state as
    a JSON string): the trial runs only, flat (a filter that leaves out their parent shows
    children as rows of their own, not folded under the sweep run with the adversary runs), the
    cheapest success first, and as columns, in this order, what answers "which attack broke which
    defence, at what cost": defence, status, budget-to-failure, compute spent, where a resisted
    attack stopped, and the attacker fields in `columns`."""
    now = int(time.time() * 1000)
    selected = [f"tags.`{Tag.DEFENCE}`", f"tags.`{Tag.STATUS}`", f"metrics.`{Metric.btf(unit)}`",
                f"metrics.`{Metric.spent(unit)}`", f"metrics.`{Metric.ended_at('resisted')}`",
                *(f"params.`{c}`" for c in columns)]
    state = {
        "searchFilter": f"tags.{Tag.KIND} = '{Kind.TRIAL}'",
        "orderByKey": f"metrics.`{Metric.btf(unit)}`", "orderByAsc": True,
        "selectedColumns": selected, "columnOrder": [RUN_NAME, *selected],
        # wide enough for a run name ('rescaled · lr 3e-3 sgd_momentum n128 lora') and for the metric
        # headers (budget_to_failure_accelerator_seconds is 36 characters); the UI applies a width
        # only to a column named in columnOrder
        "columnWidths": {RUN_NAME: 300,
                         **{c: max(110, 8 * len(c.split("`")[1]) + 24) for c in selected if c.startswith("metrics.")}},
    }
    return {"name": f"trials, cheapest attack first ({unit})", "createdAt": now, "updatedAt": now,
            "state": json.dumps(state)}


def ui_link(tracking_uri: str, experiment_id: str) -> str:
    """The MLflow UI's page of this experiment's trial runs (see ui_path). A store that is not a
    server (sqlite, a folder) gets the address of a local `mlflow ui`. Credentials in the URI
    (https://user:token@host) are left out: the link is printed."""
    from urllib.parse import urlsplit, urlunsplit

    if not tracking_uri.startswith(("http://", "https://")):
        return f"http://127.0.0.1:5000/{ui_path(experiment_id)}"
    parts = urlsplit(tracking_uri)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return f"{base}/{ui_path(experiment_id)}"


def ui_path(experiment_id: str) -> str:
    """The UI route of the saved view of the trial runs, in the UI's Model training mode (MLflow
    3.17 opens a browser that has not chosen a mode on its GenAI overview, whatever the
    experiment's kind)."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={TRIALS_VIEW}"


def kept_first(run) -> tuple[bool, bool, float, float]:
    """Sort key among one trial's records: a measured one before a pruned one before an error,
    then the one that finished first."""
    status = run.data.tags.get(Tag.STATUS)
    return (status == "error", status == "pruned", *finished_first(run))


def finished_first(run) -> tuple[float, float]:
    """Sort key: the run that finished first (then started first; unfinished ones last)."""
    return (run.info.end_time or math.inf, run.info.start_time or math.inf)

