"""Ctrl-C in the middle of `attack-sweep run` (a real subprocess, a real SIGINT): the
command exits 130 with the resume hint and nothing else, running it again records every trial
exactly once, the interrupted one superseded, and no process of its Ray outlives it. Ctrl-C
while the exit handlers run prints nothing (while a report is written: test_report_folder.py)."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import yaml
from conftest import sweep_dict
from mlflow.tracking import MlflowClient

INTERRUPTED = "interrupted: finished trials are in MLflow; rerun the same command to resume"


def running_trial(client: MlflowClient, experiment: str, past_step: int) -> str | None:
    """A trial run still RUNNING whose curve has reached past `past_step`: a trial mid-way."""
    exp = client.get_experiment_by_name(experiment)
    for run in client.search_runs([exp.experiment_id], "tags.kind = 'trial' and attributes.status = 'RUNNING'"):
        if max((m.step for m in client.get_metric_history(run.info.run_id, "harmfulness")), default=-1) > past_step:
            return run.info.run_id
    return None


def alive(p: psutil.Process) -> bool:
    """Running (psutil compares the pid's start time: a reused pid is not it) and not a zombie."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def outliving(procs: list[psutil.Process], seconds: float) -> list[str]:
    """Those of procs still alive after waiting up to `seconds` for them, as command lines."""
    deadline = time.time() + seconds
    while (left := [p for p in procs if alive(p)]) and time.time() < deadline:
        time.sleep(0.2)
    out = []
    for p in left:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
    return out


def quiet(err: str) -> bool:
    """Nothing on stderr but the one line of a Ctrl-C (no traceback, no 'Exception ignored')."""
    return [ln for ln in err.splitlines() if ln.strip()] == [INTERRUPTED]


class Lines:
    """A pipe's lines, read as they come by a thread (the test waits for one, then acts)."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(pipe), daemon=True)
        self.thread.start()

    def wait_for(self, start: str, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.time() + timeout
        while not any(ln.startswith(start) for ln in self.lines):
            assert proc.poll() is None and time.time() < deadline, f"no line {start!r}: {self.lines[-5:]}"
            time.sleep(0.02)

    def text(self) -> str:
        self.thread.join(10)
        return "".join(self.lines)


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
        ray_tree = psutil.Process(proc.pid).children(recursive=True)
        assert any(p.name() == "raylet" for p in ray_tree)   # premise: its local Ray, with a trial running
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        proc.send_signal(signal.SIGINT)
        err.wait_for(INTERRUPTED, proc, 120)
        proc.send_signal(signal.SIGINT)   # pressed again while it leaves (ray.shutdown): ignored
        proc.wait(60)
        exited = time.time()
        err = err.text()
        out.text()
    finally:
        if proc.poll() is None:  # a failed assertion above: stop the sweep (and its Ray) cleanly
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert quiet(err), err[-2000:]
    assert not outliving(ray_tree, exited + 5 - time.time())
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


def test_ctrl_c_while_its_ray_starts_leaves_no_process_behind(world, tmp_path):
    """Ctrl-C from a terminal (SIGINT to the whole process group) while `run` starts its local Ray,
    the first trial about to begin: ray.init never returns, so neither ray.shutdown nor the
    watchdog knows that Ray; left alone, its dashboard and runtime-env agents lived 60 s more."""
    raw = sweep_dict(world, "ray-starting", defences=("base",), max_steps=20, eval_every=5)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--tracking-uri",
           f"sqlite:///{tmp_path}/mlflow.db", "--storage-path", str(tmp_path / "ray"), "--out", str(tmp_path / "r")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    driver = psutil.Process(proc.pid)

    def command(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline()).strip()   # Ray's processes pad their titles with blanks
        except psutil.Error:
            return ""

    try:
        deadline = time.time() + 180
        while {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} - {command(p) for p in driver.children(recursive=True)}:
            assert proc.poll() is None and time.time() < deadline, "no Ray agents seen"
            time.sleep(0.02)
        ray_tree = driver.children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        exited = time.time()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # premise: the SIGINT came before ray.init returned (the watchdog is started once it has)
    assert not any(" -c " in command(p) for p in ray_tree), [command(p)[:60] for p in ray_tree]
    assert proc.returncode == 130 and quiet(err), err[-2000:]
    assert not outliving(ray_tree, exited + 5 - time.time())


EXITING = """
import atexit, sys, time
from orchestrator import cli

def slow():  # stands for ray.shutdown's and MLflow's handlers, which take seconds
    print("exit handler: begun", flush=True)
    time.sleep(5)
    print("exit handler: ended", flush=True)

atexit.register(slow)
sys.argv[0] = "attack-sweep"
cli.entry()
"""


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_while_the_exit_handlers_run_prints_nothing(world, tmp_path, presses):
    """A command that succeeded, then Ctrl-C while entry() runs the atexit handlers: the first is
    ignored (the handlers end), a second leaves at once; the exit status stays the command's, and
    nothing is printed (Python would print 'Exception ignored in atexit callback' and a traceback)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(sweep_dict(world, "exiting")))
    proc = subprocess.Popen([sys.executable, "-c", EXITING, "validate", str(spec), "--skip-checkpoint-checks"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = Lines(proc.stdout)
    try:
        out.wait_for("exit handler: begun", proc, 60)
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
        pressed = time.time()
        proc.wait(30)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and err == "", err[-2000:]
    assert out.text().startswith("spec OK: exiting")
    assert ("exit handler: ended" in out.text()) == (presses == 1)
    assert presses == 1 or time.time() - pressed < 3     # it did not wait for the handler's 5 s
