"""Ctrl-C in the middle of `attack-sweep run` (a real subprocess, a real SIGINT): the
command exits 130 with the resume hint, and running it again records every trial exactly
once, the interrupted one superseded."""

import os
import signal
import subprocess
import sys
import time

import yaml
from conftest import sweep_dict
from mlflow.tracking import MlflowClient


def test_ctrl_c_then_rerun_loses_and_duplicates_nothing(world, tmp_path):
    raw = sweep_dict(world, "interrupted", max_steps=30, eval_every=5,
                     space={"dataset_size": 32, "learning_rate": {"grid": [1e-4, 2e-4, 3e-4]}})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--tracking-uri", uri,
           "--storage-path", str(tmp_path / "ray"), "--out", str(tmp_path / "report")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    for line in proc.stdout:  # interrupt as soon as the first trial is recorded
        if line.startswith("[1/3]") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "rerun the same command to resume" in err

    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "1 trials already recorded" in rerun.stdout or "2 trials already recorded" in rerun.stdout

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("interrupted")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'trial'", max_results=100)
    live = [r for r in runs if "superseded" not in r.data.tags]
    assert len(live) == 6 and len({r.data.tags["trial_key"] for r in live}) == 6
    assert all(r.info.status == "FINISHED" for r in live)
    assert all(r.info.status in ("KILLED", "FAILED") for r in runs if "superseded" in r.data.tags)
