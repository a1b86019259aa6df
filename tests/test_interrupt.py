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


def running_trial(client: MlflowClient, experiment: str, past_step: int) -> str | None:
    """A trial run still RUNNING whose curve has reached past `past_step`: a trial mid-way."""
    exp = client.get_experiment_by_name(experiment)
    for run in client.search_runs([exp.experiment_id], "tags.kind = 'trial' and attributes.status = 'RUNNING'"):
        if max((m.step for m in client.get_metric_history(run.info.run_id, "harmfulness")), default=-1) > past_step:
            return run.info.run_id
    return None


def test_ctrl_c_then_rerun_loses_and_duplicates_nothing(world, tmp_path):
    # two attackers at once (2 CPUs, 1 each): lr 3e-3 breaks the toy base within ~10 steps, lr 1e-6
    # resists to T=200; Ctrl-C lands once the first is recorded and the second is seen mid-trial
    raw = sweep_dict(world, "interrupted", defences=("base",), max_steps=200, eval_every=10,
                     space={"dataset_size": 32, "learning_rate": {"grid": [3e-3, 1e-6]}})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--tracking-uri", uri,
           "--storage-path", str(tmp_path / "ray"), "--out", str(tmp_path / "report")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "ATTACK_SWEEP_FLUSH_S": "0"})
    client = MlflowClient(uri)
    try:
        deadline = time.time() + 240
        for line in proc.stdout:  # the first trial is recorded ...
            if line.startswith("[1/2]"):
                assert "lr 3e-3 -> failed" in line, line
                break
            assert time.time() < deadline, "no trial finished in time"
        mid = None
        while mid is None:  # ... and the other is mid-trial
            assert time.time() < deadline and proc.poll() is None, "no trial seen mid-way"
            mid = running_trial(client, "interrupted", past_step=0)
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # a failed assertion above: stop the sweep (and its Ray) cleanly
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "rerun the same command to resume" in err
    interrupted = client.get_run(mid)
    assert interrupted.info.status == "KILLED" and "status" not in interrupted.data.tags  # no outcome recorded

    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "1 trials already recorded, 1 to run" in rerun.stdout

    exp = client.get_experiment_by_name("interrupted")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'trial'", max_results=100)
    live = [r for r in runs if "superseded" not in r.data.tags]
    superseded = [r for r in runs if "superseded" in r.data.tags]
    assert len(live) == 2 and len({r.data.tags["trial_key"] for r in live}) == 2
    assert all(r.info.status == "FINISHED" for r in live)
    assert sorted(r.data.tags["status"] for r in live) == ["failed", "resisted"]
    # the run interrupted mid-trial is kept, superseded by a complete rerun of the same trial
    assert [r.info.run_id for r in superseded] == [mid]
    assert superseded[0].info.status == "KILLED"
    (retried,) = [r for r in live if r.data.tags["trial_key"] == superseded[0].data.tags["trial_key"]]
    assert retried.data.tags["status"] == "resisted" and retried.data.metrics["censored_at_steps"] == 200


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
