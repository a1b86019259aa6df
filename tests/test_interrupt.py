"""Ctrl-C in the middle of `attack-sweep run` (a real subprocess, a real SIGINT): the
command exits 130 with the resume hint, and running it again records every trial exactly
once, the interrupted one superseded."""

import os
import signal
import subprocess
import sys
import time

import pytest
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


def test_a_ctrl_c_lost_in_a_finalizer_still_stops_the_sweep(world, ray_local, tmp_path):
    """Python drops a KeyboardInterrupt raised while a __del__ runs ("Exception ignored in ...");
    a Ctrl-C that lands there must still end the sweep at the next step of Tune's loop, with
    the records closed, not let it run to the end."""
    from orchestrator import spec as S
    from orchestrator import sweep

    class SendsCtrlC:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)   # the handler runs, and raises, inside __del__

    def echo(line: str) -> None:
        if line.startswith("[1/"):
            SendsCtrlC()   # created and finalized at once

    raw = sweep_dict(world, "lost-ctrl-c", defences=("base",), max_steps=10, eval_every=5,
                     space={"dataset_size": 32, "learning_rate": {"grid": [1e-4, 2e-4, 3e-4]}})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(S.from_dict(raw), tracking_uri=uri, storage_path=str(tmp_path / "ray"), echo=echo)
    assert signal.getsignal(signal.SIGINT) is before   # the sweep's handler is gone again
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("lost-ctrl-c").experiment_id])
    finished = [r for r in runs if r.data.tags.get("kind") == "trial" and r.info.status == "FINISHED"]
    assert len(finished) < 3 and all(r.info.status != "RUNNING" for r in runs)
