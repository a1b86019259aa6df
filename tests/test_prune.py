"""Defences searched side by side, and attacks pruned once they cannot lower the worst case
(search.prune): the stopper and the side-by-side searcher on their own, then a real sweep on a
real local Ray and MLflow store, pruned, then rerun without pruning."""

import math

import pytest
from conftest import e2e_spec, trial_runs
from mlflow.tracking import MlflowClient

from orchestrator import report, sweep
from orchestrator.report import figures, tables
from orchestrator.sweep.adversary import Progress
from orchestrator.sweep.resume import DefenceSearch
from orchestrator.sweep.searchers import FixedTrials, SideBySide
from orchestrator.sweep.stopper import Stopper


def _searches(spec, best: dict[str, float]):
    out = []
    for d in spec.defences:
        p = Progress("steps")
        if math.isfinite(best.get(d.name, math.inf)):
            p.add("failed", best[d.name], best[d.name])
        out.append(DefenceSearch(d, p, [], 1, [], ""))
    return out


def _point(defence, step, safe=True, status="running"):
    return {"defence": defence, "step": step, "safe": safe, "status": status}


def test_the_stopper_prunes_only_safe_trials_that_reached_the_best(world):
    spec = e2e_spec(world, search={"algorithm": "grid", "prune": True})
    stop = Stopper(spec, _searches(spec, {"base": 10}))
    assert not stop("a", _point("base", 5))                 # cheaper than the best so far: it may win
    assert not stop("b", _point("base", 10, safe=False))    # crossed, being refined: may land below 10
    assert not stop("c", _point("rescaled", 15))            # no success against rescaled yet
    assert stop("d", _point("base", 10)) and stop("e", _point("base", 15))  # a tie cannot lower it either
    assert stop.pruned == {"d", "e"}
    # a success lowers its own defence's best, as soon as it is reported
    assert stop("f", _point("rescaled", 5, safe=False, status="failed")) and stop.best == {"base": 10, "rescaled": 5}
    assert stop("g", _point("rescaled", 5)) and not stop("h", _point("base", 5))
    assert stop("i", _point("base", 20, status="resisted")) and "i" not in stop.pruned   # final anyway
    # without search.prune nothing is pruned, whatever the budget
    plain = Stopper(e2e_spec(world), _searches(spec, {"base": 10}))
    assert not plain("x", _point("base", 40)) and plain("y", _point("base", 40, status="resisted"))
    assert plain.pruned == set()


def test_side_by_side_hands_each_slot_to_the_defence_with_fewest_in_flight():
    a, b = FixedTrials([{"lr": 1}, {"lr": 2}, {"lr": 3}]), FixedTrials([{"lr": 1}])
    told = []
    b.on_trial_complete = lambda trial_id, result=None, error=False: told.append((trial_id, result))
    s = SideBySide({"base": (a, 3), "defended": (b, 1)})
    assert s.suggest("t1") == {"lr": 1, "defence": "base"}
    assert s.suggest("t2") == {"lr": 1, "defence": "defended"}   # base has one in flight
    assert s.suggest("t3") == {"lr": 2, "defence": "base"}       # defended has nothing left
    s.on_trial_complete("t2", {"objective": 4.0})
    assert told == [("t2", {"objective": 4.0})]                  # only its own searcher hears of it
    s.on_trial_complete("t1", {"objective": 5.0})
    assert told == [("t2", {"objective": 4.0})]
    assert s.suggest("t4") == {"lr": 3, "defence": "base"}
    assert s.suggest("t5") == "FINISHED"


def test_side_by_side_alternates_when_one_trial_runs_at_a_time():
    s = SideBySide({"base": (FixedTrials([{"i": 0}, {"i": 1}]), 2), "other": (FixedTrials([{"i": 0}, {"i": 1}]), 2)})
    order = []
    for n in range(4):
        order.append(s.suggest(f"t{n}")["defence"])
        s.on_trial_complete(f"t{n}", {})
    assert order == ["base", "other", "base", "other"]


@pytest.fixture(scope="module")
def pruned_sweep(world, ray_local, tmp_path_factory):
    """The toy base and rescaled against three learning rates, the one that breaks both at step 5
    listed first, two trials at a time: once with search.prune, then again without it. The other
    two are too low to break either within T, so each is pruned at its first evaluation after the
    best is known, however the trials' reports interleave (with 1e-4, a trial whose step-5 report
    beat the crossing's could break the base at step 10 and never be pruned)."""
    tmp = tmp_path_factory.mktemp("prune")
    uri = f"sqlite:///{tmp}/mlflow.db"
    space = {"learning_rate": {"grid": [3e-3, 1e-6, 3e-6]}, "dataset_size": 32}
    # half a CPU each: two trials at once even where an earlier test's dead worker left a CPU reserved
    half = {"cpu": 0.5}
    pruned = e2e_spec(world, "prune", space=space, resources=half,
                      search={"algorithm": "grid", "prune": True, "max_concurrent": 2})
    lines: list[str] = []
    sweep.run(pruned, tracking_uri=uri, storage_path=str(tmp / "ray"), echo=lines.append)
    first = {r.info.run_id: r for r in trial_runs(uri, "prune")}
    rows_pruned = {r.defence: r for r in report.load(uri, "prune")}
    full = e2e_spec(world, "prune", space=space, resources=half, search={"algorithm": "grid", "max_concurrent": 2})
    sweep.run(full, tracking_uri=uri, storage_path=str(tmp / "ray"), echo=lines.append)
    return uri, first, rows_pruned, {r.defence: r for r in report.load(uri, "prune")}, lines


def test_pruned_trials_stop_safe_at_the_best_budget_and_are_recorded_once(pruned_sweep):
    uri, first, rows, _, lines = pruned_sweep
    runs = list(first.values())
    assert len(runs) == 6 and len({r.data.tags["trial_key"] for r in runs}) == 6
    client = MlflowClient(uri)
    pruned = [r for r in runs if r.data.tags["status"] == "pruned"]
    assert {r.data.tags["defence"] for r in pruned} == {"base", "rescaled"}
    for r in pruned:
        best = rows[r.data.tags["defence"]].cheapest("steps").btf["steps"]
        m = r.data.metrics
        assert m["pruned_at_steps"] == m["spent_steps"] >= best and r.info.status == "FINISHED"
        assert "budget_to_failure_steps" not in m
        assert all(p.value <= 0.5 for p in client.get_metric_history(r.info.run_id, "harmfulness"))
    assert sum("-> pruned at step" in ln for ln in lines) == len(pruned)
    # the step-0 reading is measured once per defence (or by an earlier test of the session) and
    # read back by its later trials (the tracker records the flag as a curve)
    for defence in ("base", "rescaled"):
        flags = [client.get_metric_history(r.info.run_id, "step0_cached") for r in runs
                 if r.data.tags["defence"] == defence]
        assert all(len(f) == 1 and f[0].step == 0 for f in flags)
        assert {f[0].value for f in flags} <= {0.0, 1.0} and 1.0 in {f[0].value for f in flags}
    for row in rows.values():
        assert row.count("pruned") >= 1 and row.pruned_in == "steps"


def test_pruning_keeps_the_worst_case_and_a_rerun_without_it_measures_the_rest(pruned_sweep):
    uri, first, pruned_rows, full_rows, lines = pruned_sweep
    for name, row in full_rows.items():
        assert row.cheapest("steps").btf["steps"] == pruned_rows[name].cheapest("steps").btf["steps"]
        assert row.count("pruned") == 0 and len(row.trials) == 3
        assert sum(t.spent["steps"] for t in row.trials) > sum(t.spent["steps"] for t in pruned_rows[name].trials)
    # the rerun ran exactly the pruned trials; their pruned records are kept, superseded
    live = {r.info.run_id: r for r in trial_runs(uri, "prune") if "superseded" not in r.data.tags}
    rerun = set(live) - set(first)
    gone = {i for i, r in first.items() if r.data.tags["status"] == "pruned"}
    assert len(live) == 6 and len(rerun) == len(gone) and gone.isdisjoint(live)
    assert {live[i].data.tags["trial_key"] for i in rerun} == {first[i].data.tags["trial_key"] for i in gone}
    client = MlflowClient(uri)
    assert all(client.get_run(i).data.tags.get("superseded") == "true" for i in gone)


def test_defences_ran_side_by_side(pruned_sweep):
    """With two slots, a trial against one defence ran while one against the other did: one
    Tune run for every defence, not a search per defence one after another."""
    _, first, *_ = pruned_sweep
    spans = {d: [(r.info.start_time, r.info.end_time) for r in first.values() if r.data.tags["defence"] == d]
             for d in ("base", "rescaled")}
    assert any(a0 < b1 and b0 < a1 for a0, a1 in spans["base"] for b0, b1 in spans["rescaled"])


def test_the_report_says_what_pruning_leaves_as_bounds(pruned_sweep, tmp_path):
    _, _, rows, _, _ = pruned_sweep
    rows = list(rows.values())
    notes = tables.notes(rows, "steps")
    assert sum("pruned (search.prune)" in n for n in notes) == 2
    assert all(tables.worst_cell(r, "tokens").startswith("≤ ") for r in rows)
    assert not any(tables.worst_cell(r, "steps").startswith("≤") for r in rows)
    cells = [tables.cell(t) for r in rows for t in r.trials if t.status == "pruned"]
    assert cells and all(c.startswith("> ") and c.endswith("(pruned)") for c in cells)
    # the heatmap: a cell of pruned attacks only is unbroken up to where they stopped, not up to T
    t = next(t for r in rows for t in r.trials if t.status == "pruned")
    xs = figures._levels([t], "learning_rate")
    assert figures._cell([t], "learning_rate", xs, 0, None, None, None, None, None, "steps") == \
        (math.inf, f"> {t.spent['steps']:g}")
    # survival: a pruned trial is censored where it stopped, never an event
    for r in rows:
        assert all(t.outcome("steps").kind == "censored" for t in r.trials if t.status == "pruned")
