"""Secrets stay out of the records, and report files stay in their folder.

A real `attack-sweep run` (its own local Ray) with a judge scoring over HTTP with a key from
the environment, and a hub token set: neither value may appear in MLflow (params, tags,
metrics, artifacts: the whole store's bytes), in Tune's trial state, in the report files or in
what the command prints.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import sweep_dict
from test_judge import Server, http_options

JUDGE_KEY = "sk-judge-5ecret-0f-the-test-7f3a"
HUB_TOKEN = "hf_hubtoken5ecretOfTheTest9c1d"


def test_no_secret_reaches_records_logs_or_reports(world, tmp_path):
    server = Server()
    try:
        raw = sweep_dict(world, "secrets", defences=("base",), max_steps=4, eval_every=2)
        raw.pop("evaluator")
        raw["data"]["eval_size"] = 4
        raw["evaluators"] = [{"name": "refusal_keyword", "options": {"max_new_tokens": 4}, "primary": True},
                             {"name": "judge", "options": http_options(server)}]
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
        env = {**os.environ, "JUDGE_TEST_KEY": JUDGE_KEY, "HF_TOKEN": HUB_TOKEN, "RAY_AUTH_MODE": "disabled"}
        out = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "run", str(tmp_path / "spec.yaml"),
             "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--out", str(tmp_path / "report"),
             "--storage-path", str(tmp_path / "ray")],
            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    assert out.returncode == 0, out.stderr[-2000:]
    # premise: the key was used, so it passed through the trial
    assert server.posts() and all(r["auth"] == f"Bearer {JUDGE_KEY}" for r in server.posts())
    assert (tmp_path / "report" / "report.csv").exists()
    for secret in (JUDGE_KEY, HUB_TOKEN):
        assert secret not in out.stdout + out.stderr
        leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert leaked == [], f"{secret[:6]}... found in {leaked}"
    from mlflow.tracking import MlflowClient  # and through MLflow's own API, not only the bytes

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    text = repr([(r.data.params, r.data.tags) for r in runs])
    assert "JUDGE_TEST_KEY" in text or "judge" in text   # premise: the judge is in the records
    assert JUDGE_KEY not in text and HUB_TOKEN not in text


def test_report_files_stay_in_their_folder(world, tmp_path, monkeypatch):
    """An experiment name is any string MLflow accepts: the default report folder is built from
    it without letting it climb out of reports/."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    name = "../../escaped"
    exp = client.create_experiment(name)
    run = client.create_run(exp, tags={"kind": "trial", "defence": "base", "base": "true", "status": "resisted",
                                       "attacker_id": "a", "trial_key": "k"})
    client.log_batch(run.info.run_id, metrics=[Metric("censored_at_steps", 10, 0, 0)])
    client.set_terminated(run.info.run_id)
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert main(["report", "--experiment", name, "--tracking-uri", uri]) == 0
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*.csv")}
    assert written and all(str(p).startswith(str(Path("work") / "deep" / "reports")) for p in written)
