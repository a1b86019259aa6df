"""A sweep that cannot run says so before it starts: what one trial asks against what a cluster can
ever give (hand-written node lists), this machine counted as Ray counts it, a request no node of the
running Ray can hold refused in one line, and a request that only waits (every CPU held by other
work) shown as waiting, then ended by resources.pending_timeout with its records closed.

    .venv/bin/pytest -q tests/test_capacity.py
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import yaml
from conftest import sweep_dict
from test_progress import Clock

from orchestrator import capacity
from orchestrator.capacity import Ask, Cluster, shortfall, workers_that_fit
from orchestrator.spec.model import SpecError
from orchestrator.sweep.progress import Display

# --- the comparison, on hand-written clusters ----------------------------------------------------


def line(ask: Ask, nodes: list[dict], machine: str | None = None) -> str | None:
    short = shortfall(ask, nodes, machine)
    return None if short is None else short.line()


def test_a_gpu_request_on_a_machine_without_gpus_names_the_field_and_the_fix():
    assert line(Ask(1, 1), [{"CPU": 2.0}], "this machine") == (
        "resources.gpu: each trial asks for 1 GPU, and this machine has 0; set resources.gpu: 0 to train on CPU, "
        "or run on a cluster with GPUs (--address)")
    # the same on a cluster of CPU nodes: the fix is the cluster's
    assert line(Ask(1, 1), [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 0.0}]) == (
        "resources.gpu: each trial asks for 1 GPU, and the largest node has 0; set resources.gpu: 0 to train on "
        "CPU, or add GPU nodes to the cluster")
    assert line(Ask(1, 2), [{"CPU": 8.0, "GPU": 1.0}]) == \
        "resources.gpu: each trial asks for 2 GPUs, and the largest node has 1; lower resources.gpu to at most 1"


def test_a_trial_must_fit_on_one_node_whatever_the_total():
    assert line(Ask(64), [{"CPU": 2.0}], "this machine") == \
        "resources.cpu: each trial asks for 64 CPUs, and this machine has 2; lower resources.cpu to at most 2"
    # 4 CPUs in all, but 2 at most on one node
    assert line(Ask(4), [{"CPU": 2.0}, {"CPU": 2.0}]) == \
        "resources.cpu: each trial asks for 4 CPUs, and the largest node has 2; lower resources.cpu to at most 2"
    assert line(Ask(2), [{"CPU": 1.0}, {"CPU": 2.0}]) is None
    # enough CPUs on one node, a GPU on another, never both together
    assert line(Ask(16, 1), [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 32.0}]) == (
        "resources.cpu: each trial asks for 16 CPUs and 1 GPU on one node, and the nodes with 1 GPU have at most "
        "8 CPUs; lower resources.cpu to at most 8")


def test_fractional_cpus_add_up_as_ray_counts_them():
    assert line(Ask(0.5), [{"CPU": 1.0}]) is None
    assert line(Ask(1.5), [{"CPU": 1.0}]) == \
        "resources.cpu: each trial asks for 1.5 CPUs, and the largest node has 1; lower resources.cpu to at most 1"
    # three 0.1-CPU bundles on 0.3 CPUs (0.3 / 0.1 is 2.9999999999999996 in floats); 3 x 0.33 + 0.01 = 1
    assert workers_that_fit(Ask(0.1), [{"CPU": 0.3}]) == 3 and line(Ask(0.3), [{"CPU": 0.3}]) is None
    assert workers_that_fit(Ask(0.33, 0, 3), [{"CPU": 1.0}]) == 3
    assert workers_that_fit(Ask(0.34, 0, 3), [{"CPU": 1.0}]) == 2   # 0.99 / 0.34 = 2.9
    assert line(Ask(0.34, 0, 3), [{"CPU": 1.0}], "this machine") == (
        "resources.workers: each trial asks for 3 workers x 0.34 CPU and 0.01 for its driver, and this machine has "
        "1 CPU in all; lower resources.workers to at most 2")


def test_the_workers_of_a_trial_spread_over_nodes_beside_its_driver():
    # two 2-CPU workers fill two 2-CPU nodes; the driver's 0.01 CPU needs a third
    two = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert workers_that_fit(Ask(2, 0, 2), two) == 1
    assert line(Ask(2, 0, 2), two) == (
        "resources.workers: each trial asks for 2 workers x 2 CPUs and 0.01 for its driver, and the cluster has "
        "4 CPUs in all; lower resources.workers to at most 1")
    assert line(Ask(2, 0, 2), [*two, {"CPU": 0.5}]) is None
    # 1 GPU each on two 4-GPU nodes of 48 CPUs: 4 workers of 11 CPUs per node, the driver beside them;
    # workers of 12 CPUs fill a node, and the node that holds the driver then holds 3
    gpus = [{"CPU": 48.0, "GPU": 4.0}, {"CPU": 48.0, "GPU": 4.0}]
    assert workers_that_fit(Ask(11, 1, 8), gpus) == 8 and line(Ask(11, 1, 8), gpus) is None
    assert workers_that_fit(Ask(12, 1, 8), gpus) == 7
    # 3 workers of 3 CPUs and 1 GPU on two nodes of 4 CPUs and 2 GPUs: one worker per node (CPUs), though 4 GPUs
    odd = [{"CPU": 4.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 2.0}]
    assert workers_that_fit(Ask(3, 1, 3), odd) == 2
    assert line(Ask(3, 1, 3), odd) == (
        "resources.workers: each trial asks for 3 workers x 3 CPUs and 0.01 for its driver, and the cluster has "
        "8 CPUs in all; lower resources.workers to at most 2")
    # 7 CPUs in all would do, but 3 + 3 + 1 cannot hold a 3-CPU worker on the third node
    frag = [{"CPU": 3.5}, {"CPU": 3.5}, {"CPU": 1.0}]
    assert line(Ask(2.5, 0, 2), frag) is None
    assert line(Ask(2.5, 0, 3), frag) == (
        "resources.workers: each trial asks for 3 workers of 2.5 CPUs, and the nodes hold at most 2 of them at "
        "once (a worker cannot span nodes); lower resources.workers to at most 2")


def test_workers_times_gpus_beyond_the_cluster():
    assert line(Ask(1, 1, 4), [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]) == (
        "resources.workers: each trial asks for 4 workers x 1 GPU, and the cluster has 2 GPUs in all; lower "
        "resources.workers to at most 2")
    # on one machine: each worker fits, the driver too, but not all of them
    assert line(Ask(1, 0, 2), [{"CPU": 1.0}], "this machine") == (
        "resources.cpu: each trial asks for 2 workers x 1 CPU and 0.01 for its driver, and this machine has 1; "
        "lower resources.cpu to at most 0.49")


def test_a_cluster_that_may_grow_waits_with_a_note_one_that_cannot_refuses():
    notes: list[str] = []
    head_only = [{"CPU": 0.0, "memory": 1e9}]   # clusters/aws.yaml before its first GPU worker starts
    capacity.judge(Ask(12, 1), Cluster(head_only, grows=True), notes.append)
    assert notes == ["note: resources.gpu: each trial asks for 1 GPU, and no node of the cluster holds that now; "
                     "waiting for its autoscaler to add one (resources.pending_timeout bounds the wait)"]
    with pytest.raises(SpecError, match=r"^spec error: resources.gpu: each trial asks for 1 GPU, and the largest "
                                        r"node has 0; set resources.gpu: 0 .* add GPU nodes to the cluster$"):
        capacity.judge(Ask(12, 1), Cluster(head_only), notes.append)
    with pytest.raises(SpecError, match="the local Ray has 2; lower resources.cpu to at most 2$"):
        capacity.judge(Ask(3), Cluster([{"CPU": 2.0}], local=True), notes.append)
    capacity.judge(Ask(2), Cluster([{"CPU": 2.0}], local=True), notes.append)   # fits: nothing said
    assert len(notes) == 1


# --- this machine, counted as Ray counts it ------------------------------------------------------


def test_this_machine_is_counted_as_a_local_ray_counts_it(monkeypatch):
    """Through Ray's own resolver: Ray's override of a node's resources (which a local ray.init()
    obeys and os.cpu_count() would not see) is what the check before Ray starts sees."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_OVERRIDE_RESOURCES", json.dumps({"CPU": 3, "GPU": 1}))
    assert capacity.local_node() == {"CPU": 3.0, "GPU": 1.0}
    monkeypatch.setenv("RAY_OVERRIDE_RESOURCES", json.dumps({"CPU": 1}))
    assert capacity.local_node()["CPU"] == 1.0
    with pytest.raises(SpecError, match="this machine has 1; lower resources.cpu to at most 1$"):
        capacity.check_local(Ask(2), None)
    capacity.check_local(Ask(2), "ray://head:10001")   # joins a cluster: nothing to check here


# --- the display --------------------------------------------------------------------------------


def test_the_waiting_line_prints_once_then_at_the_heartbeat():
    clock, lines = Clock(), []
    d = Display(["base"], 1, "steps", lines.append, mode="plain", heartbeat_s=30.0, clock=clock).start()
    d.waiting("waiting for 1 CPU (0 of 2 free)")
    clock.now = 29
    d.waiting("waiting for 1 CPU (0 of 2 free)")
    assert lines == ["  waiting for 1 CPU (0 of 2 free)"]
    clock.now = 30
    d.waiting("waiting for 1 CPU (1 of 2 free)")
    assert lines[1:] == ["  waiting for 1 CPU (1 of 2 free)"]
    d.waiting(None)                      # a trial started
    clock.now = 31
    d.waiting("waiting for 1 CPU (0 of 2 free)")    # waiting again: said at once
    assert len(lines) == 3 and d.waiting_for == "waiting for 1 CPU (0 of 2 free)"


def test_the_live_region_shows_what_trials_wait_for():
    from test_progress import render

    clock = Clock()
    d = Display(["base"], 1, "steps", lambda _: None, mode="live", clock=clock)
    d.waiting("waiting for 1 GPU (0 of 0 free)")
    assert "waiting for 1 GPU (0 of 0 free)" in render(d)
    d.waiting(None)
    assert "waiting for" not in render(d)


# --- a real local Ray ----------------------------------------------------------------------------


def _runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_a_request_the_running_ray_cannot_hold_is_refused_before_any_trial(world, ray_local, tmp_path):
    """In a process whose Ray is already up (the CLI's check before Ray starts does not apply): the
    check once Ray is up refuses, and leaves no MLflow run RUNNING."""
    from orchestrator import spec as S
    from orchestrator import sweep

    # pending_timeout: were the check missing, the trial would wait, and end this test in 10 s
    raw = sweep_dict(world, "too-big", defences=("base",), resources={"cpu": 3, "pending_timeout": 10})
    start = time.monotonic()
    with pytest.raises(SpecError) as err:
        sweep.run(S.from_dict(raw), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                  storage_path=str(tmp_path / "ray"), echo=lambda _: None)
    assert str(err.value) == ("spec error: resources.cpu: each trial asks for 3 CPUs, and the local Ray has 2; "
                              "lower resources.cpu to at most 2")
    assert time.monotonic() - start < 30
    runs = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    assert not [r for r in runs if r.data.tags.get("kind") == "trial"]


def test_a_ray_without_an_autoscaler_is_told_apart(ray_local):
    """Ray's monitor on a cluster without an autoscaler (ray.init, `ray start` by hand) names each
    node's type after the node: such a cluster never grows, and what it cannot hold is refused."""
    deadline = time.monotonic() + 30
    while (found := capacity.autoscaled()) is None and time.monotonic() < deadline:
        time.sleep(0.5)   # the monitor writes its first status a few seconds after Ray starts
    assert found is False


@pytest.fixture
def cpus_held(ray_local):
    """Every CPU of the session's local Ray held by other work (a placement group): (their number,
    a function that frees them). Freed after the test in any case."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    total = ray.cluster_resources()["CPU"]
    group = placement_group([{"CPU": total}])
    ray.get(group.ready(), timeout=60)
    held = [group]

    def free() -> None:
        while held:
            remove_placement_group(held.pop())
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
            time.sleep(0.2)

    try:
        yield int(total), free
    finally:
        free()


def test_a_sweep_whose_cpus_are_held_says_it_waits_then_ends_and_a_rerun_resumes(world, cpus_held, tmp_path, capsys,
                                                                                 monkeypatch):
    import ray

    from orchestrator.cli import main

    cpus, free = cpus_held
    monkeypatch.setenv("ATTACK_SWEEP_PROGRESS", "plain")
    monkeypatch.chdir(tmp_path)
    raw = sweep_dict(world, "held", defences=("base",), max_steps=10, eval_every=5,
                     space={"dataset_size": 32, "learning_rate": 1e-6}, resources={"pending_timeout": 4})
    spec, uri = tmp_path / "spec.yaml", f"sqlite:///{tmp_path}/mlflow.db"
    spec.write_text(yaml.safe_dump(raw))
    argv = ["run", str(spec), "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray"),
            "--out", str(tmp_path / "report"), "--skip-checkpoint-checks"]
    start = time.monotonic()
    # were the wait never to end, freeing the CPUs after 60 s ends it (and fails the test) rather than the suite
    rescue = threading.Timer(60, free)
    rescue.start()
    try:
        rc = main(argv)
    finally:
        rescue.cancel()
    took = time.monotonic() - start
    cap = capsys.readouterr()
    errors = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert rc == 2 and errors == [
        f"error: resources.pending_timeout: no trial could start in 4 s: each asks for 1 CPU, and 0 of {cpus} CPUs "
        "are free (held by other work); free them, or raise resources.pending_timeout (0: wait for ever)"], cap.err
    assert 4 <= took < 40, took
    assert f"  waiting for 1 CPU (0 of {cpus} free)" in cap.out.splitlines(), cap.out
    runs = _runs(uri)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert [r.info.status for r in runs if r.data.tags.get("kind") == "sweep"] == ["KILLED"]
    assert not [r for r in runs if r.data.tags.get("kind") == "trial"]   # none started, none lost
    assert not [g for g in ray.util.placement_group_table().values() if g["state"] == "PENDING"]   # Tune's gone

    free()
    assert main(argv) == 0, capsys.readouterr().err
    runs = _runs(uri)
    trials = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert [(r.info.status, r.data.tags["status"]) for r in trials] == [("FINISHED", "resisted")]
    assert [r.info.status for r in runs if r.data.tags.get("kind") == "sweep"] == ["FINISHED"]
    assert "waiting for" not in capsys.readouterr().out
