"""The MLflow UI answers at a glance, checked in a real browser: a real `mlflow server` over the
session's e2e sweep (conftest.e2e_sweep, whose end wrote the summary onto its sweep run), pages
rendered by headless chromium (tests/browser.py).

  - the link attack-sweep prints (orchestrator.tracking.readers.ui_link) opens the experiment on its trial runs, not
    on MLflow 3.17's GenAI overview, with the saved view: trials only, named by their attack;
  - the sweep run's page shows the summary table, the worst-case metrics and the report/ artifacts;
  - MLflow's REST API hands out the worst case of each defence.

Skips where chromium is not installed (`apt-get install chromium`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from browser import chromium, nonblank, render
from conftest import trial_runs

from orchestrator.tracking import readers
from trainables.names import Kind, Summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(request, tmp_path_factory):
    """(server URL, the e2e sweep's tracking URI): `mlflow server` over the e2e store."""
    chromium()  # skips before the sweep or the server is started
    _, uri, _, _ = request.getfixturevalue("e2e_sweep")
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", uri, "--artifacts-destination", str(root / "artifacts")],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.2)
        yield url, uri
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # it only read; SIGTERM costs 2.5 s of uvicorn's shutdown
        proc.wait(10)


def rest(url: str, endpoint: str, **query: str) -> dict:
    from urllib.parse import urlencode

    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{urlencode(query)}", timeout=10) as r:
        return json.loads(r.read())


def test_the_printed_link_opens_on_the_trial_runs_named_by_their_attack(ui, tmp_path):
    url, uri = ui
    runs = trial_runs(uri, "e2e")
    experiment_id = runs[0].info.experiment_id
    png = tmp_path / "runs.png"
    dom = render(readers.ui_link(url, experiment_id), png=png)
    # the runs table in Model training mode, not the GenAI overview a fresh browser gets by default
    assert re.search(r"<h2[^>]*>Runs<", dom) and not re.search(r"<h2[^>]*>Overview<", dom)
    assert "workflowType=machine_learning" in dom and "workflowType=genai" not in dom
    assert 'col-id="attributes.`Run Name`"' in dom and "matching runs" in dom
    assert "trials, cheapest attack first" in dom  # the saved view is the one open
    for run in runs:  # every trial, by its readable name, and nothing else
        name = run.info.run_name
        assert "·" in name and name.startswith(run.data.tags["defence"]) and name in dom
    assert "adversary ·" not in dom and "sweep · e2e" not in dom
    for column in ("tags.`defence`", "tags.`status`", "metrics.`budget_to_failure_steps`"):
        assert f'col-id="{column}"' in dom
    assert nonblank(png, box=(200, 300, 1000, 500))  # the table's rows are drawn


def test_the_sweep_run_shows_its_summary_and_report(ui):
    url, uri = ui
    (parent,) = trial_runs(uri, "e2e", kind=Kind.SWEEP)
    experiment_id, run_id = parent.info.experiment_id, parent.info.run_id
    page = f"{url}/#/experiments/{experiment_id}/runs/{run_id}"
    dom = render(f"{page}?workflowType=machine_learning", size=(1400, 1400))
    assert "sweep · e2e" in dom
    assert "Worst case" in dom and "worst case (steps)" in dom and "rescaled" in dom  # the description
    assert Summary.worst("steps", "base") in dom and Summary.worst("steps", "rescaled") in dom  # its metrics
    dom = render(f"{page}/artifacts/report/report.html?workflowType=machine_learning")
    assert "spec.yaml" in dom and "report.html" in dom and "<iframe" in dom  # the report, shown in the page

    got = rest(url, "runs/get", run_id=run_id)["run"]["data"]
    metrics = {m["key"]: m["value"] for m in got["metrics"]}
    for defence in ("base", "rescaled"):
        steps = [r.data.metrics["budget_to_failure_steps"] for r in trial_runs(uri, "e2e")
                 if r.data.tags["defence"] == defence and "budget_to_failure_steps" in r.data.metrics]
        assert metrics[Summary.worst("steps", defence)] == min(steps)
    listed = {f["path"] for f in rest(url, "artifacts/list", run_id=run_id, path="report")["files"]}
    assert {"report/report.html", "report/report.md", "report/report.csv", "report/figures"} <= listed
