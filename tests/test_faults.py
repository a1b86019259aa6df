"""Faults a sweep survives, each one caused for real: a trial's Ray worker SIGKILLed mid-trial,
the MLflow tracking server killed and restarted mid-sweep, a second `attack-sweep run` of the
same sweep started beside the first, the same trial recorded twice by two machines sharing a
tracking server, and the driver SIGKILLed while its local Ray runs trials."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import sweep_dict, trial_runs
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from orchestrator import report, sweep
from orchestrator import spec as S
from orchestrator.tracking import writer
from orchestrator.tracking.store import Patient, seed_sqlite
from orchestrator.tracking.writer import Tracker
from trainables.names import SCHEMA_VERSION

T = 30
EVERY = 5


def resisting(world, name: str, lrs: list[float], **over) -> dict:
    """One defence (the rescaled toy model, as the sweep's base) against attackers too weak to
    break it within T: every trial runs its whole horizon, evaluated every EVERY steps."""
    return sweep_dict(world, name, defences=("rescaled",), **{
        "max_steps": T, "eval_every": EVERY, "space": {"dataset_size": 32, "learning_rate": {"grid": lrs}}, **over})


def steps_of(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "harmfulness"))


def alive(p: psutil.Process) -> bool:
    """Running, and not a zombie (an orphan nobody reaps stays in the table, dead)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def trial_workers(root: psutil.Process) -> list[psutil.Process]:
    """The Ray workers running a Tune trial among `root`'s descendants."""
    out = []
    for p in root.children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::ImplicitFunc") and alive(p):
                out.append(p)
        except psutil.Error:
            pass
    return out


def running_trial(client: MlflowClient, experiment: str, past_step: int) -> str | None:
    """A trial run still RUNNING whose curve has gone past `past_step`: a trial mid-way."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    for run in client.search_runs([exp.experiment_id], "tags.kind = 'trial' and attributes.status = 'RUNNING'"):
        if max(steps_of(client, run.info.run_id), default=-1) > past_step:
            return run.info.run_id
    return None


def test_a_trial_whose_process_is_killed_is_rerun_and_recorded_once(world, ray_local, tmp_path, monkeypatch):
    """SIGKILL of the Ray worker running a trial, mid-trial: Tune reruns the trial; the dead
    attempt's run is kept superseded and KILLED, and the trial has one finished run, whose
    curve holds each evaluation once (nothing of the dead attempt)."""
    spec = S.from_dict(resisting(world, "killed-worker", [1e-5, 2e-5], search={"max_concurrent": 1}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    killed: dict = {}
    done = threading.Event()

    def killer() -> None:
        client, deadline = MlflowClient(uri), time.time() + 180
        while not done.is_set() and time.time() < deadline:
            run_id = running_trial(client, "killed-worker", past_step=0)
            workers = trial_workers(psutil.Process())
            if run_id and len(workers) == 1:
                killed.update(run=run_id, steps=steps_of(client, run_id), pid=workers[0].pid)
                workers[0].kill()
                return
            time.sleep(0.1)

    seed_sqlite(uri)  # the store exists before two threads open it (neither migrates it then)
    monkeypatch.setattr(writer, "FLUSH_S", 0.0)  # each evaluation in MLflow at once: seen mid-trial
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    lines: list[str] = []
    try:
        sweep.run(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"), echo=lines.append)
    finally:
        done.set()
        thread.join(10)
    assert killed, "no trial was seen mid-way"
    assert killed["steps"][-1] < T  # it was killed mid-trial, after recording part of its curve

    client = MlflowClient(uri)
    runs = trial_runs(uri, "killed-worker")
    keys = {sweep.trial_key(spec, t) for t in sweep.trials(spec)}
    dead = client.get_run(killed["run"])
    assert dead.data.tags.get("superseded") == "true" and dead.info.status == "KILLED"
    assert "status" not in dead.data.tags and "rerun" in dead.data.tags["error"]
    assert dead.data.tags["trial_key"] in keys
    live = [r for r in runs if "superseded" not in r.data.tags]
    assert len(runs) == 3 and sorted(r.data.tags["trial_key"] for r in live) == sorted(keys)
    for r in live:
        assert r.info.status == "FINISHED" and r.data.tags["status"] == "resisted"
        assert steps_of(client, r.info.run_id) == list(range(0, T + 1, EVERY))  # each point once
        assert r.data.metrics["spent_steps"] == T and r.data.metrics["censored_at_steps"] == T
    assert sum(line.startswith("[retry]") for line in lines) == 1, lines
    assert [line for line in lines if line.startswith("[")][-1].startswith("[2/2]"), lines
    (row,) = report.load(uri, "killed-worker")
    assert len(row.trials) == 2 and row.count("resisted") == 2 and row.duplicates == 0


# A sweep in a process of its own, on a local Ray of 2 CPUs (a CI runner's): a trial that hangs
# there is ended with the process (the watchdog takes its Ray along), not left in the session's
# Ray for the next test. It prints the placement groups its Ray still holds once the sweep is over.
SWEEP = r"""
import json, sys, time
import ray
from orchestrator import spec as S
from orchestrator import cluster, sweep

raw, uri, storage = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
before = cluster._children()
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
cluster._watch_local_ray(before)
sweep.run(S.from_dict(raw), tracking_uri=uri, storage_path=storage, echo=lambda line: print(line, flush=True))
def held():
    return {k: v["bundles"] for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"}
deadline = time.time() + 10  # Tune removes its trials' own groups as it closes
while held() and time.time() < deadline:
    time.sleep(0.5)
print("HELD " + json.dumps(held()), flush=True)
"""


def ray_train_workers(root: psutil.Process) -> list[psutil.Process]:
    """The Ray Train workers among `root`'s descendants."""
    out = []
    for p in root.children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::RayTrainWorker") and alive(p):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.mark.slow  # make test-slow (CI runs it after make test)
def test_a_dead_train_worker_errs_its_trial_and_the_next_trial_runs(world, tmp_path):
    """SIGKILL of one Ray Train worker of a 2-worker trial, mid-trial, with the trials run one
    after the other on 2 CPUs: that trial ends as error, naming the dead worker; the next
    2-worker trial runs to its end; and no placement group is left holding CPUs after the sweep.
    (Before train_workers, the dead trial or the last one could hang the sweep in Tune's report
    queues, and the last trial's worker group outlived it, CREATED.)"""
    raw = resisting(world, "dead-train-worker", [1e-5, 2e-5], search={"max_concurrent": 1},
                    resources={"cpu": 0.5, "workers": 2})
    raw["space"]["batch_size"] = 8  # the global batch, split over both workers
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    seed_sqlite(uri)  # before the sweep and this test's reader open it
    proc = subprocess.Popen([sys.executable, "-c", SWEEP, json.dumps(raw), uri, str(tmp_path / "ray")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "ATTACK_SWEEP_FLUSH_S": "0"})  # each point in MLflow at once
    killed: dict = {}

    def killer() -> None:
        client, deadline = MlflowClient(uri), time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            workers = ray_train_workers(psutil.Process(proc.pid))
            run_id = running_trial(client, "dead-train-worker", past_step=0)
            if run_id and len(workers) == 2:
                killed.update(run=run_id, steps=steps_of(client, run_id))
                workers[-1].kill()
                return
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=30)
        pytest.fail("the sweep did not end within 300 s:\n" + out[-3000:])
    finally:
        thread.join(10)
    assert proc.returncode == 0, out[-3000:]
    assert killed, "no trial was seen mid-way"
    assert killed["steps"][-1] < T  # killed mid-trial

    client = MlflowClient(uri)
    runs = {r.info.run_id: r for r in trial_runs(uri, "dead-train-worker")}
    assert len(runs) == 2, out[-3000:]  # one attempt each: a dead worker is not retried
    dead = runs.pop(killed["run"])
    assert dead.data.tags["status"] == "error" and dead.info.status == "FAILED"
    # its tag holds the traceback's last line, from whichever rank Ray Train lists last (the other
    # one may fail too, its collective cut short); the whole traceback holds the dead worker's
    text = Path(client.download_artifacts(dead.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert "WorkerGroupError" in text and "worker process has died" in text, text[-3000:]
    (after,) = runs.values()
    assert after.info.start_time > dead.info.end_time  # it ran after the dead one, one at a time
    assert after.data.tags["status"] == "resisted" and after.info.status == "FINISHED"
    assert steps_of(client, after.info.run_id) == list(range(0, T + 1, EVERY))
    held = json.loads(next(ln for ln in out.splitlines() if ln.startswith("HELD "))[5:])
    assert held == {}, held


def test_an_exception_in_the_trial_is_its_error_and_not_retried(world, ray_local, tmp_path):
    """Retrying is for dead processes: a trial whose own code raises runs once, and ends in
    error with the exception's line as tag and its traceback as artifact."""
    raw = resisting(world, "raises", [1e-5], max_steps=10)
    raw["space"] |= {"finetune": "lora", "lora_target_modules": ["nonexistent_proj"]}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lines: list[str] = []
    sweep.run(S.from_dict(raw), tracking_uri=uri, storage_path=str(tmp_path / "ray"), echo=lines.append)
    (bad,) = trial_runs(uri, "raises")  # one attempt
    assert bad.data.tags["status"] == "error" and bad.info.status == "FAILED" and "superseded" not in bad.data.tags
    assert "nonexistent_proj" in bad.data.tags["error"] and "\n" not in bad.data.tags["error"]
    assert not any(line.startswith("[retry]") for line in lines)
    assert any(line.startswith("[1/1]") and "-> error: " in line and "nonexistent_proj" in line for line in lines)
    text = MlflowClient(uri).download_artifacts(bad.info.run_id, "error.txt", str(tmp_path))
    assert "Traceback (most recent call last)" in Path(text).read_text()


# --- the tracking server going away ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1:port over a sqlite store in `root`, in a process group of its
    own (it starts uvicorn as a child): killed as a whole, started again on the same port."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 90) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/db"],
            cwd=self.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import urllib.request

        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                assert self.proc.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.2)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path, free_port())
    s.start()
    yield s
    s.kill()


class OnFirstRecord:
    """An echo for sweep.run that keeps the lines and, once the first trial is recorded, runs
    `action` in a thread. Tune pickles its callbacks, this echo with them: the action (and the
    server it holds) stays out of the pickle."""

    def __init__(self, action):
        self.lines: list[str] = []
        self.action = action

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith("[1/") and self.action:
            threading.Thread(target=self.action, daemon=True).start()

    def __getstate__(self) -> dict:
        return {"lines": [], "action": None}


def test_a_tracking_server_restarted_mid_sweep_loses_no_record(world, ray_local, server, tmp_path):
    """The server is SIGKILLed as the first trial is recorded and started again 3 s later: the
    sweep waits (one line says so), and every trial ends with one finished record holding its
    whole curve, each point once."""
    spec = S.from_dict(resisting(world, "server-restart", [1e-5, 2e-5, 3e-5]))
    bounced = threading.Event()

    def bounce() -> None:
        server.kill()
        time.sleep(3)
        server.start()
        bounced.set()

    echo = OnFirstRecord(bounce)
    sweep.run(spec, tracking_uri=server.uri, storage_path=str(tmp_path / "ray"), echo=echo)
    lines = echo.lines
    assert bounced.is_set()
    assert sum("unreachable; retrying writes for up to 300 s" in line for line in lines) == 1, lines
    assert any(line.startswith(f"tracking server {server.uri} reachable again") for line in lines), lines

    client = MlflowClient(server.uri)
    runs = trial_runs(server.uri, "server-restart")
    assert len(runs) == 3 and len({r.data.tags["trial_key"] for r in runs}) == 3
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["status"] == "resisted" and "superseded" not in r.data.tags
        assert steps_of(client, r.info.run_id) == list(range(0, T + 1, EVERY))
        assert r.data.metrics["spent_steps"] == T
    (parent,) = trial_runs(server.uri, "server-restart", kind="sweep")
    assert parent.info.status == "FINISHED"


class Flaky:
    """Stands in for MlflowClient: `calls` fails `fails` times with `error`, then answers."""

    def __init__(self, fails: int, error: Exception):
        self.fails, self.error, self.n = fails, error, 0

    def calls(self) -> str:
        self.n += 1
        if self.n <= self.fails:
            raise self.error
        return "ok"


DOWN = MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/create failed with exception "
                       "HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded")


def test_patience_is_bounded_and_a_refusal_is_never_retried():
    lines: list[str] = []
    client = Flaky(2, DOWN)
    assert Patient(client, "http://x", lines.append, patience_s=30).calls() == "ok" and client.n == 3
    assert len(lines) == 2 and "unreachable" in lines[0] and "reachable again" in lines[1]

    lines.clear()
    patient, start = Patient(Flaky(10**6, DOWN), "http://x", lines.append, patience_s=1.2), time.monotonic()
    with pytest.raises(MlflowException, match="failed with exception"):
        patient.calls()
    assert 1.0 < time.monotonic() - start < 5 and len(lines) == 1
    start = time.monotonic()
    with pytest.raises(MlflowException):  # given up: later calls get one try, not another wait
        patient.calls()
    assert time.monotonic() - start < 0.5

    refused = Flaky(1, RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "no"}))
    with pytest.raises(RestException):
        Patient(refused, "http://x", lines.append, patience_s=30).calls()
    assert refused.n == 1


# --- two runs of one sweep at once ---------------------------------------------------------------


@pytest.mark.slow  # make test-slow (CI runs it after make test)
def test_a_second_run_of_the_same_sweep_is_refused_while_the_first_runs(world, tmp_path):
    """Two real `attack-sweep run` of one spec: the second, started from another directory with
    the store spelled as a relative path, exits 2 at once with one line naming the first, whose
    sweep records every trial once."""
    raw = resisting(world, "locked", [1e-5, 2e-5], eval_every=10)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    (tmp_path / "elsewhere").mkdir()
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--storage-path", str(tmp_path / "ray"),
           "--out", str(tmp_path / "report")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([*cmd, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path / "elsewhere",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in first.stdout:  # the header: the first holds the lock
            if line.startswith("sweep 'locked'"):
                break
        second = subprocess.run([*cmd, "--tracking-uri", "sqlite:///mlflow.db"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300, env=env)
        overlapped = first.poll() is None
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr[-2000:]
    assert overlapped, "the first run ended before the second was refused"
    errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "another `attack-sweep run` of sweep 'locked'" in errors[0], second.stderr
    assert f"pid {first.pid} " in errors[0]
    assert "sweep 'locked'" not in second.stdout  # refused before MLflow and Ray
    assert first.returncode == 0, err[-2000:]
    runs = trial_runs(f"sqlite:///{tmp_path}/mlflow.db", "locked")
    assert len(runs) == 2 and len({r.data.tags["trial_key"] for r in runs}) == 2
    assert all(r.info.status == "FINISHED" for r in runs)


def test_the_lock_names_the_store_not_the_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with sweep.sweep_lock("s", f"sqlite:///{tmp_path}/m.db"):
        with pytest.raises(sweep.SweepLocked, match="another `attack-sweep run` of sweep 's'"), \
                sweep.sweep_lock("s", "sqlite:///m.db"):
            pass
        with sweep.sweep_lock("t", "sqlite:///m.db"), sweep.sweep_lock("s", "sqlite:///other.db"):
            pass  # another sweep, or another store: no conflict
    with sweep.sweep_lock("s", "sqlite:///m.db"):  # released on exit
        pass


# --- two machines, one tracking server -------------------------------------------------------------


def test_a_trial_recorded_twice_counts_once_in_the_report(tmp_path):
    """Two machines sharing a tracking server each ran some trials (a lock guards one machine):
    the report counts each trial_key once, its earliest finished record, and says how many it
    ignored; the next run of the sweep supersedes the same records."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("two-machines")
    parent = client.create_run(exp, tags={"kind": "sweep", "records_schema": str(SCHEMA_VERSION)}).info.run_id

    def record(key: str, status: str, start: int, end: int, btf: float | None = None, **tags) -> str:
        run_id = client.create_run(exp, start_time=start, tags={
            "mlflow.parentRunId": parent, "kind": "trial", "defence": "d", "base": "true", "trial_key": key,
            "attacker_id": key, "attacker_group": key, "status": status, **tags}).info.run_id
        metrics = {"spent_steps": btf or T}
        metrics |= {"budget_to_failure_steps": btf, "budget_resolution_steps": 5} if btf else {"censored_at_steps": T}
        client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                         params=[Param(k, str(v)) for k, v in {
                             "learning_rate": key, "defence": "d", "phi": 0.5, "eval_every": 5, "max_steps": T,
                             "evaluator": "kw", "search": "grid", "unit": "steps"}.items()])
        client.set_terminated(run_id, "FAILED" if status == "error" else "FINISHED", end_time=end)
        return run_id

    late = record("k1", "failed", start=1000, end=9000, btf=10)    # machine A: started first, finished last
    early = record("k1", "failed", start=2000, end=3000, btf=20)   # machine B: the earliest finished
    record("k2", "resisted", start=1000, end=4000)
    record("k2", "resisted", start=500, end=800, superseded="true")  # interrupted earlier: no duplicate
    errored = record("k3", "error", start=1000, end=1500, error="CUDA out of memory")  # machine A
    record("k3", "failed", start=1200, end=5000, btf=15)                                # machine B

    (row,) = report.load(uri, "two-machines")
    assert len(row.trials) == 3 and row.duplicates == 2
    assert sorted(t.status for t in row.trials) == ["failed", "failed", "resisted"]
    assert row.cheapest("steps").steps == 15 and sorted(t.steps or 0 for t in row.trials) == [0, 15, 20]
    assert any("2 duplicate trial record(s) ignored" in n for n in report.notes([row], "steps"))

    tracker = Tracker(uri, "two-machines", "digest", {})
    assert tracker.completed_keys() == {"k1", "k2", "k3"}
    tags = {r.info.run_id: r.data.tags for r in trial_runs(uri, "two-machines")}
    assert "superseded" in tags[late] and "superseded" in tags[errored] and "superseded" not in tags[early]
    (row,) = report.load(uri, "two-machines")
    assert len(row.trials) == 3 and row.duplicates == 0 and not report.notes([row], "steps")
    assert sorted(t.steps or 0 for t in row.trials) == [0, 15, 20]


# --- the driver killed ------------------------------------------------------------------------------


@pytest.mark.slow  # make test-slow (CI runs it after make test)
def test_a_killed_driver_leaves_no_process_of_its_ray_behind(world, tmp_path):
    """`attack-sweep run` SIGKILLed while its local Ray runs a trial: within 30 s no process the
    run started (raylet, GCS, agents, trial workers) is left, and the sweep's lock is free."""
    # T long enough that a fast machine is still mid-trial when the test looks (it is killed there),
    # and each evaluation sent to MLflow at once rather than in FLUSH_S batches
    raw = resisting(world, "killed-driver", [1e-5, 2e-5], max_steps=2000, eval_every=10)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--tracking-uri", uri,
                             "--storage-path", str(tmp_path / "ray"), "--out", str(tmp_path / "report")],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "ATTACK_SWEEP_FLUSH_S": "0"})
    driver = psutil.Process(proc.pid)
    try:
        client, deadline = MlflowClient(uri), time.time() + 180
        while not (running_trial(client, "killed-driver", past_step=0) and trial_workers(driver)):
            assert proc.poll() is None and time.time() < deadline, "no trial seen mid-way"
            time.sleep(0.2)
        started = driver.children(recursive=True)
        assert any(p.name() == "raylet" for p in started) and trial_workers(driver)
        proc.kill()
        proc.wait(10)
        deadline = time.time() + 30
        while (left := [p for p in started if alive(p)]) and time.time() < deadline:
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert not left, [" ".join(p.cmdline())[:80] for p in left if alive(p)]
    with sweep.sweep_lock("killed-driver", uri):  # the kernel released the dead driver's lock
        pass
