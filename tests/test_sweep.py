"""End to end: a real local Ray, a real MLflow sqlite store, the toy world."""

import shutil

import pytest
import torch
from conftest import e2e_spec, trial_runs
from mlflow.tracking import MlflowClient

from orchestrator import report, sweep
from orchestrator.cli import main
from orchestrator.sweep import loop
from trainables import run_attack

make_spec = e2e_spec


@pytest.fixture(scope="module")
def swept(e2e_sweep):
    return e2e_sweep


def test_every_trial_is_a_finished_child_run_with_its_budget(swept):
    spec, uri, _, lines = swept
    runs = trial_runs(uri, "e2e")
    # a header, then per defence a line and one progress line per trial
    assert len(runs) == 4 and len(lines) == 7 and lines[1].startswith("defence 'base'")
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1
    client = MlflowClient(uri)
    assert client.get_run(parents.pop()).info.status == "FINISHED"
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["status"] in ("failed", "resisted")
        assert {"learning_rate", "optimizer", "dataset_size", "finetune", "seed"} <= set(r.data.params)
        curve = client.get_metric_history(r.info.run_id, "harmfulness")
        assert curve[0].step == 0 and curve[0].value == 0.0  # aligned at release
        if r.data.tags["status"] == "failed":
            assert {f"budget_to_failure_{u}" for u in ("steps", "examples", "tokens", "flops")} \
                <= set(r.data.metrics)
            assert curve[-1].value > spec.phi and r.data.metrics["budget_to_failure_steps"] == curve[-1].step
        else:
            assert r.data.metrics["censored_at_steps"] == spec.max_steps
            assert "budget_to_failure_steps" not in r.data.metrics
    # the strong attacker breaks the toy base
    strong = [r for r in runs if r.data.tags["defence"] == "base" and r.data.params["learning_rate"] == "0.003"]
    assert strong[0].data.tags["status"] == "failed"


def test_swept_budget_equals_a_direct_run_attack(swept):
    spec, uri, _, _ = swept
    torch.set_num_threads(1)  # a 1-CPU Ray trial runs one thread
    for t in sweep.trials(spec):
        direct = run_attack(sweep.attack_config(spec, t))
        run = next(r for r in trial_runs(uri, "e2e") if r.data.tags["trial_key"] == sweep.trial_key(spec, t))
        assert run.data.tags["status"] == direct.status
        if direct.budget_to_failure:
            btf = direct.budget_to_failure
            m = run.data.metrics
            assert (m["budget_to_failure_steps"], m["budget_to_failure_examples"],
                    m["budget_to_failure_tokens"], m["budget_to_failure_flops"]) == \
                (btf.step, btf.examples, btf.tokens, btf.flops)


def test_rerun_does_not_duplicate_trials(swept, world, tmp_path):
    spec, _, tmp, _ = swept
    # on a copy of the session's shared store: the wider rerun below adds trials and a sweep run
    shutil.copy(tmp / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    before = {r.info.run_id for r in trial_runs(uri, "e2e")}
    lines = []
    sweep.run(spec, tracking_uri=uri, storage_path=str(tmp / "ray"), echo=lines.append)
    assert {r.info.run_id for r in trial_runs(uri, "e2e")} == before
    assert [ln.split(": ")[1] for ln in lines[1:]] == ["2 trials already recorded, 0 to run"] * 2
    # a wider space reruns only the new trials
    wider = make_spec(world, space={"learning_rate": {"grid": [1e-4, 3e-3, 1e-3]}, "dataset_size": 32})
    sweep.run(wider, tracking_uri=uri, storage_path=str(tmp / "ray"), echo=lines.append)
    after = trial_runs(uri, "e2e")
    assert len(after) == 6 and before < {r.info.run_id for r in after}


def test_report_numbers_equal_the_mlflow_records(swept, capsys):
    spec, uri, tmp, _ = swept
    rows = {r.defence: r for r in report.load(uri, "e2e")}
    runs = trial_runs(uri, "e2e")
    for name, row in rows.items():
        mine = [r for r in runs if r.data.tags["defence"] == name]
        assert len(row.trials) == len(mine)
        assert row.count("failed") == sum(r.data.tags["status"] == "failed" for r in mine)
        steps = [r.data.metrics["budget_to_failure_steps"] for r in mine if "budget_to_failure_steps" in r.data.metrics]
        assert (row.worst_case.steps if row.worst_case else None) == (min(steps) if steps else None)
        assert row.weak_resistance == (not steps)
    out = tmp / "report"
    assert main(["report", "--experiment", "e2e", "--tracking-uri", uri, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "base (reference)" in text and "(base)" not in text
    assert (out / "report.csv").exists() and (out / "survival.csv").exists()
    import csv

    base = next(r for r in csv.DictReader((out / "report.csv").open()) if r["defence"] == "base")
    assert base["base"] == "true" and int(base["trials"]) == len(rows["base"].trials)
    assert int(base["failed"]) == rows["base"].count("failed")
    assert "| defence |" in (out / "report.md").read_text() and (out / "report.html").exists()
    assert f"open the report: {(out / 'report.html').resolve().as_uri()}" in text


def test_trial_error_is_recorded_and_the_sweep_goes_on(world, ray_local, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = make_spec(world, name="err", max_steps=5, space={
        "finetune": "lora", "lora_target_modules": {"grid": [["nonexistent_proj"], ["q_proj"]]},
        "dataset_size": 16})
    sweep.run(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"), echo=lambda s: None)
    runs = trial_runs(uri, "err")
    status = sorted(r.data.tags["status"] for r in runs)
    assert len(runs) == 4 and status.count("error") == 2
    bad = next(r for r in runs if r.data.tags["status"] == "error")
    assert bad.info.status == "FAILED" and "nonexistent_proj" in bad.data.tags["error"]
    # `attack-sweep run` retries them, and exits non-zero while they still fail (a Ray job
    # running it then ends FAILED, not SUCCEEDED)
    import yaml

    (tmp_path / "err.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    # (the spec check would catch the bad targets before Ray: skipped, as on a cluster whose head cannot see models)
    rc = main(["run", str(tmp_path / "err.yaml"), "--skip-checkpoint-checks", "--tracking-uri", uri,
               "--out", str(tmp_path / "r"),
               "--storage-path", str(tmp_path / "ray")])
    assert rc == 1 and "2 trial(s) ended in error" in capsys.readouterr().err
    assert len(trial_runs(uri, "err")) == 6  # the two errored trials ran again, the others did not


def test_an_interrupted_trial_is_superseded_not_duplicated(world, ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = make_spec(world, name="resume", max_steps=5,
                     defences=[{"name": "base", "model": str(world / "base"), "base": True}],
                     space={"dataset_size": 16})
    from orchestrator.spec.space import digest
    from orchestrator.tracking.writer import Tracker

    # what an interrupted sweep leaves: a trial run still RUNNING, half a curve
    tracker = Tracker(uri, "resume", digest(spec.model_dump(mode="json")), {})
    (t,) = sweep.trials(spec)
    stale = tracker.start_trial(sweep.trial_key(spec, t), "base", True, "x", {})
    tracker.log_point(stale, {"step": 0, "harmfulness": 0.0})
    sweep.run(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"), echo=lambda s: None)
    client = MlflowClient(uri)
    old = client.get_run(stale)
    assert old.info.status == "KILLED" and old.data.tags["superseded"] == "true"
    rows = report.load(uri, "resume")
    assert len(rows) == 1 and len(rows[0].trials) == 1


@pytest.mark.parametrize("cpu", [1, 2.5])
def test_a_trial_uses_as_many_torch_threads_as_cpus_it_reserved(world, cpu):
    """Two trials on two cores with torch's default threads (all cores each) oversubscribe."""
    spec = make_spec(world, resources={"cpu": cpu}, max_steps=2, eval_every=2)
    cfg = sweep.attack_config(spec, {"defence": "base", **spec.attackers()[0]})
    seen = []
    before = torch.get_num_threads()
    try:
        loop.attack_loop(loop.loop_config(spec, cfg, "base"), report=lambda r: seen.append(torch.get_num_threads()))
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {int(cpu)}


def test_degenerate_attacks_and_every_evaluator_reach_mlflow_and_the_report(world, ray_local, tmp_path, capsys):
    """One defence, two attackers: a usual one, and one whose huge unclipped steps wreck the
    model (its utility collapses) so its crossing of phi is degenerate, never a success."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = make_spec(world, name="bounded", defences=[{"name": "base", "model": str(world / "base"), "base": True}],
                     max_steps=4, eval_every=2, evaluator=None, evaluators=[
                         {"name": "refusal_keyword", "options": {"max_new_tokens": 4}, "primary": True},
                         {"name": "nll", "label": "ref"}],
                     utility={"data": {"source": str(world / "benign_heldout.jsonl")}, "epsilon": 0.25},
                     space={"learning_rate": {"grid": [3e-3, 0.05]}, "max_grad_norm": 0, "dataset_size": 32})
    lines = []
    sweep.run(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"), echo=lines.append)
    runs = {r.data.params["learning_rate"]: r for r in trial_runs(uri, "bounded")}
    client = MlflowClient(uri)
    usual, wrecked = runs["0.003"], runs["0.05"]
    assert usual.data.tags["status"] == "failed" and wrecked.data.tags["status"] == "degenerate"
    assert any("degenerate at step" in line for line in lines)
    u = [m.value for m in client.get_metric_history(wrecked.info.run_id, "utility")]
    assert u[-1] < u[0] - 0.25 and "budget_to_failure_steps" not in wrecked.data.metrics
    assert wrecked.data.metrics["degenerate_at_steps"] == 2
    m = usual.data.metrics
    assert m["budget_to_failure_steps.refusal_keyword"] == m["budget_to_failure_steps"]
    assert m["eval_seconds_total"] > 0 and "harmfulness.ref" in m and "harmfulness_lo" in m
    assert usual.data.params["evaluators"] == "refusal_keyword,ref" and usual.data.params["utility_epsilon"] == "0.25"
    saved = {a.path for a in client.list_artifacts(usual.info.run_id, "samples")}
    assert saved == {"samples/step_0.json", f"samples/failed_step_{int(m['budget_to_failure_steps'])}.json"}

    assert main(["report", "--experiment", "bounded", "--tracking-uri", uri, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    header, body = report.table(report.load(uri, "bounded"))
    assert body[0][header.index("degenerate")] == "1" and body[0][header.index("failed")] == "1"
    assert "per evaluator" in out and "ref" in (tmp_path / "r" / "evaluators.csv").read_text()
