"""What a sweep leaves in MLflow besides the trial curves: readable run names, only the params
that apply, the sweep run's schema tag, provenance and spec, the experiment's kind and saved view
of its trials, and after the sweep the summary on the sweep run (orchestrator/report/publish.py).

Reads the session's shared e2e sweep (conftest.e2e_sweep: base and rescaled against two
learning rates); one test resumes it (nothing left to run) to see the records written again.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from conftest import trial_runs
from mlflow.tracking import MlflowClient

from orchestrator import report, sweep
from orchestrator.report import publish
from orchestrator.spec import attackers
from orchestrator.tracking import provenance, readers, store, writer
from trainables.names import (
    EXPERIMENT_KIND,
    PROVENANCE,
    SCHEMA_VERSION,
    STATUSES,
    TRIALS_VIEW,
    ExperimentTag,
    Kind,
    Metric,
    Summary,
    Tag,
)


def sweep_run(uri: str):
    (run,) = trial_runs(uri, "e2e", kind=Kind.SWEEP)
    return run


def test_trial_runs_read_as_their_attack_and_log_only_params_that_apply(e2e_sweep):
    _, uri, _, _ = e2e_sweep
    runs = trial_runs(uri, "e2e")
    names = {r.info.run_name for r in runs}
    assert {"base · lr 1e-4", "base · lr 3e-3", "rescaled · lr 1e-4", "rescaled · lr 3e-3"} <= names
    for r in runs:
        assert r.info.run_name.startswith(r.data.tags[Tag.DEFENCE] + " · ")
        params = r.data.params
        assert params["finetune"] == "full" and not [k for k in params if k.startswith("lora_")]
        assert "None" not in params.values() and "steps" not in params and "stages" not in params
        assert {"learning_rate", "optimizer", "dataset_size", "seed", "max_steps"} <= set(params)
    adversaries = trial_runs(uri, "e2e", kind=Kind.ADVERSARY)
    assert sorted(r.info.run_name for r in adversaries) == ["adversary · base (grid)", "adversary · rescaled (grid)"]
    parent = sweep_run(uri).info.run_id
    assert {r.data.tags[Tag.PARENT] for r in runs + adversaries} == {parent}


@pytest.mark.parametrize(("attacker", "varying", "name"), [
    ({"learning_rate": 0.003, "optimizer": "adamw", "finetune": "full", "dataset_size": 32, "lora_r": 8}, [],
     "base · lr 3e-3 adamw full n32"),
    ({"learning_rate": 0.00327, "finetune": "full", "lora_r": 8, "seed": 2}, ["learning_rate", "lora_r", "seed"],
     "base · lr 3.27e-3 seed 2"),
    ({"learning_rate": 0.05, "finetune": "lora", "lora_r": 16, "lora_target_modules": ["q_proj", "v_proj"]},
     ["learning_rate", "lora_r", "lora_target_modules"], "base · lr 0.05 r16 q_proj+v_proj"),
    ({"stages": [{"name": "warm", "steps": 5}, {"data": "attack", "steps": 10}], "weight_decay": 0.0}, ["stages"],
     "base · warm+attackx10"),
])
def test_a_run_name_is_the_defence_and_the_varying_fields_in_short(attacker, varying, name):
    assert attackers.run_name("base", attacker, varying) == name


def test_the_sweep_run_keeps_schema_provenance_and_spec(e2e_sweep):
    spec, uri, _, _ = e2e_sweep
    client = MlflowClient(uri)
    run = sweep_run(uri)
    tags = run.data.tags
    assert tags[Tag.SCHEMA] == str(SCHEMA_VERSION)
    here = provenance.gather()
    for key in ("version", "python", "mlflow", "torch", "ray", "cpus"):
        assert tags[PROVENANCE + key] == here[key]
    if "git_commit" in here:  # a source checkout (this one): its commit, and whether it was edited
        assert len(tags[PROVENANCE + "git_commit"]) == 40 and tags[PROVENANCE + "git_dirty"] in ("true", "false")
    saved = client.download_artifacts(run.info.run_id, "spec.yaml")
    with open(saved) as fh:
        assert yaml.safe_load(fh) == spec.model_dump(mode="json")
    stamped = client.list_artifacts(run.info.run_id, "provenance")
    assert stamped and all(a.path.endswith("Z.json") for a in stamped)

    exp = client.get_experiment_by_name("e2e")
    assert exp.tags[ExperimentTag.KIND] == EXPERIMENT_KIND
    view = json.loads(exp.tags[ExperimentTag.VIEW + TRIALS_VIEW])
    state = json.loads(view["state"])
    assert view["name"] and isinstance(view["createdAt"], int)
    assert state["searchFilter"] == "tags.kind = 'trial'" and state["orderByAsc"] is True
    assert state["orderByKey"] == "metrics.`budget_to_failure_steps`"
    assert state["selectedColumns"][:2] == ["tags.`defence`", "tags.`status`"]
    assert "params.`learning_rate`" in state["selectedColumns"]
    # the view's filter is one MLflow accepts, and it finds exactly the trial runs
    found = client.search_runs([exp.experiment_id], state["searchFilter"])
    assert {r.info.run_id for r in found} == {r.info.run_id for r in trial_runs(uri, "e2e")}


def km_median(runs, unit: str) -> float | None:
    """The Kaplan-Meier median budget-to-failure from the raw runs, by hand: successes at their
    budget, resisted attacks censored at what they spent (at risk at that budget); the smallest
    budget where the share not yet broken is at most 1/2, None when it never gets there."""
    ends = []
    for r in runs:
        status = r.data.tags[Tag.STATUS]
        assert status in ("failed", "resisted"), status   # premise: no competing events in this sweep
        ends.append((r.data.metrics[Metric.btf(unit)] if status == "failed" else r.data.metrics[Metric.spent(unit)],
                     status == "failed"))
    share = 1.0
    for t in sorted({t for t, _ in ends}):
        at_risk = sum(u >= t for u, _ in ends)
        share *= 1 - sum(u == t and broke for u, broke in ends) / at_risk
        if share <= 0.5:
            return t
    return None


def test_the_sweep_run_holds_the_summary_of_the_report(e2e_sweep):
    _, uri, _, _ = e2e_sweep
    client = MlflowClient(uri)
    run = sweep_run(uri)
    m = run.data.metrics
    rows = report.load(uri, "e2e")
    assert len(rows) == 2 and m[Summary.TRIALS] == sum(len(r.trials) for r in rows)
    runs = trial_runs(uri, "e2e")
    for row in rows:
        mine = [r for r in runs if r.data.tags[Tag.DEFENCE] == row.defence]
        steps = [r.data.metrics[Metric.btf("steps")] for r in mine if Metric.btf("steps") in r.data.metrics]
        assert m[Summary.worst("steps", row.defence)] == min(steps)  # premise: both defences broke
        tokens = [r.data.metrics[Metric.btf("tokens")] for r in mine if Metric.btf("tokens") in r.data.metrics]
        assert m[Summary.worst("tokens", row.defence)] == min(tokens)
        assert m.get(Summary.median("steps", row.defence)) == km_median(mine, "steps")
        for status in STATUSES:
            assert m[Summary.count(status, row.defence)] == sum(r.data.tags[Tag.STATUS] == status for r in mine)
    note = run.data.tags[Tag.NOTE]
    worst = {d: f"{m[Summary.worst('steps', d)]:g}" for d in ("base", "rescaled")}
    # the answer in the first line (the run page folds the rest away)
    assert note.splitlines()[0] == ("**Worst case** (the cheapest successful attack, steps): "
                                    f"**base {worst['base']}** · **rescaled {worst['rescaled']}**  ")
    table = [line for line in note.splitlines() if line.startswith("| ")]
    assert table[0] == "| defence | worst case (steps) | median (steps) | verdict | failed / resisted / other " \
                       "| cheapest attack |"
    base = next(line for line in table if line.startswith("| base |"))
    cells = [c.strip() for c in base.strip("|").split("|")]
    assert cells[1] == worst["base"] and cells[3] == rows[0].verdict() and cells[5].startswith("base · lr ")
    assert cells[4] == f"{rows[0].count('failed')} / {rows[0].count('resisted')} / 0"
    assert readers.ui_path(run.info.experiment_id) in note
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.html", "report/report.csv", "report/report.md", "report/figures"} <= listed
    assert client.list_artifacts(run.info.run_id, "report/figures")


def test_a_resumed_sweep_writes_its_records_and_summary_again(e2e_sweep):
    spec, uri, tmp, _ = e2e_sweep
    client = MlflowClient(uri)
    parent = sweep_run(uri).info.run_id
    stamps = len(client.list_artifacts(parent, "provenance"))
    published = len(client.get_metric_history(parent, Summary.TRIALS))
    client.set_tag(parent, Tag.SCHEMA, "1")  # as if an older attack-sweep had begun it
    client.set_tag(parent, Tag.NOTE, "stale")
    lines: list[str] = []
    sweep.run(spec, tracking_uri=uri, storage_path=str(tmp / "ray"), echo=lines.append)
    assert all(": 2 trials already recorded, 0 to run" in ln for ln in lines if ln.startswith("defence "))
    run = client.get_run(parent)
    assert run.data.tags[Tag.SCHEMA] == str(SCHEMA_VERSION) and run.data.tags[Tag.NOTE].startswith("**Worst case**")
    assert len(client.list_artifacts(parent, "provenance")) == stamps + 1  # one file per run of the sweep
    assert len(client.get_metric_history(parent, Summary.TRIALS)) == published + 1
    assert not any(ln.startswith("note:") for ln in lines)


def test_a_summary_that_cannot_be_written_costs_one_line_not_the_sweep(e2e_sweep):
    _, uri, _, _ = e2e_sweep
    lines: list[str] = []
    assert publish.publish(uri, "no-such-sweep", "0" * 32, "steps", echo=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("note: the sweep's summary was not written")
    assert "attack-sweep report --experiment no-such-sweep" in lines[0]


def test_provenance_names_the_commit_only_of_a_checkout_that_tracks_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTACK_SWEEP_TEST_SECRET", "s3cr3t-value")
    assert "s3cr3t-value" not in json.dumps(provenance.gather())  # no environment variable is recorded

    def git(*args: str, cwd=tmp_path) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                       capture_output=True)

    pkg = tmp_path / "orchestrator"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    assert provenance.git(pkg) == {}  # no checkout
    git("init", "-q")
    (tmp_path / "other.txt").write_text("x")
    git("add", "other.txt")
    git("commit", "-q", "-m", "other")
    assert provenance.git(pkg) == {}  # a checkout that does not track the source (a venv inside one)
    git("add", ".")
    git("commit", "-q", "-m", "x")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert provenance.git(pkg) == {"git_commit": head, "git_dirty": "false"}
    (pkg / "__init__.py").write_text("edited = True\n")
    assert provenance.git(pkg) == {"git_commit": head, "git_dirty": "true"}


def test_the_printed_link_is_the_saved_view_in_model_training_mode(capsys):
    """(test_mlflow_ui.py opens it in a browser.)"""
    view = "#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=trials"
    assert readers.ui_link("http://mlflow.internal:5000/", "7") == f"http://mlflow.internal:5000/{view}"
    # printed, so without the credentials a tracking URI may carry
    assert readers.ui_link("https://bob:s3cret@mlflow.example.com:8443/ml/", "7") == \
        f"https://mlflow.example.com:8443/ml/{view}"
    from orchestrator.cli import _mlflow_link

    _mlflow_link("sqlite:///mlflow.db", "7")
    assert capsys.readouterr().out == (f"trial runs in MLflow: http://127.0.0.1:5000/{view} "
                                       "(once `mlflow ui --backend-store-uri sqlite:///mlflow.db` runs)\n")


def test_a_new_sqlite_store_starts_as_a_copy_of_one_migrated_once(tmp_path, monkeypatch):
    """New stores are copied from an empty one MLflow migrated (cached per MLflow version); each
    is then MLflow's own: its experiments, runs and artifact root are separate, and an existing
    store is never replaced."""
    monkeypatch.setenv("ATTACK_SWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    ids = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        t = writer.Tracker(f"sqlite:///{tmp_path / name / 'mlflow.db'}", f"sweep-{name}", "digest", {"x": 1})
        t.client.log_text(t.parent_id, name, "note.txt")
        ids[name] = t.parent_id
    (template,) = (tmp_path / "cache" / "mlflow-stores").glob("empty-*.db")
    for name, other in (("a", "b"), ("b", "a")):
        client = MlflowClient(f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        assert {e.name for e in client.search_experiments()} == {"Default", f"sweep-{name}"}
        assert client.download_artifacts(ids[name], "note.txt", str(tmp_path)) and \
            (tmp_path / "note.txt").read_text() == name
        with pytest.raises(Exception):  # noqa: B017 - MLflow's own error for an unknown run
            client.get_run(ids[other])
    before = (tmp_path / "a" / "mlflow.db").read_bytes()
    store.seed_sqlite(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    assert (tmp_path / "a" / "mlflow.db").read_bytes() == before and template.stat().st_size > 0


def test_buffered_evaluations_reach_mlflow_together_when_due_and_at_close(tmp_path, monkeypatch):
    """The sweep's recorder buffers each trial's evaluations: one log_batch per FLUSH_S, and
    nothing left behind when a run ends or the sweep closes."""
    monkeypatch.setattr(writer, "FLUSH_S", 3600.0)
    t = writer.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "buffered", "digest", {"x": 1})
    run = t.start_trial("k", "base", True, "a", {})
    for step in (0, 5, 10):
        t.log_point(run, {"step": step, "harmfulness": step / 10, "status": "running"}, buffered=True)
    t.flush(due=True)
    history = lambda: [(m.step, m.value) for m in t.client.get_metric_history(run, "harmfulness")]  # noqa: E731
    assert history() == []                                   # not due yet
    monkeypatch.setattr(writer, "FLUSH_S", 0.0)
    t.flush(due=True)
    assert sorted(history()) == [(0, 0.0), (5, 0.5), (10, 1.0)]
    t.log_point(run, {"step": 15, "harmfulness": 0.2, "status": "running"}, buffered=True)
    t.close()
    assert sorted(history())[-1] == (15, 0.2) and len(history()) == 4
