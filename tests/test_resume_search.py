"""Resuming a search never reruns a recorded attacker: hyperopt and random sweeps on a real local
Ray against the toy world (N trials, then the same sweep with N+k), the searchers told what
earlier runs recorded, and the wrapper that drops repeated suggestions (no Ray needed)."""

import json

import pytest
from conftest import sweep_dict
from mlflow.tracking import MlflowClient
from ray.tune.search import Searcher

from orchestrator import spec as S
from orchestrator import sweep
from orchestrator.spec.space import attacker_id, decode
from orchestrator.sweep import searchers
from orchestrator.sweep.resume import prepare

SPACE = {"learning_rate": {"loguniform": [1e-4, 1e-2]}, "finetune": {"choice": ["lora", "full"]}}


def tiny(world, name, search, space=None):
    """A sweep of a few seconds a trial: one defence, T 4, evaluated every 2 steps."""
    raw = sweep_dict(world, name, defences=("rescaled",), search=search, max_steps=4, eval_every=2,
                     space={"dataset_size": 16, **(space or SPACE)})
    raw["data"] = {**raw["data"], "eval_size": 8}
    return S.from_dict(raw)


def trial_runs(uri, name):
    """Every trial run of the sweep, superseded ones too: a replayed attacker shows up twice."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], "tags.kind = 'trial'", max_results=1000)


def go(spec, tmp_path):
    uri, lines = f"sqlite:///{tmp_path}/mlflow.db", []
    sweep.run(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"), echo=lines.append)
    return uri, lines


def attackers(runs):
    """The attackers of `runs` in trial order, as recorded (seed and every other field)."""
    ordered = sorted(runs, key=lambda r: (int(r.data.tags["trial_number"]), r.info.start_time))
    return [json.loads(r.data.tags["attacker"]) for r in ordered]


def assert_extended_without_duplicates(spec_of, n, k, tmp_path):
    """Run the sweep with n samples, then with n + k: k new attackers, none recorded twice."""
    uri, _ = go(spec_of(n), tmp_path)
    first = attackers(trial_runs(uri, spec_of(n).name))
    assert len(first) == n
    _, lines = go(spec_of(n + k), tmp_path)
    assert f"{n} trials already recorded, {k} to run" in " ".join(lines)
    runs = trial_runs(uri, spec_of(n).name)
    every = attackers(runs)
    ids = [json.dumps(a, sort_keys=True) for a in every]
    replayed = [a for a in every[n:] if json.dumps(a, sort_keys=True) in ids[:n]]
    assert not replayed, f"the resumed search reran recorded attackers: {replayed}"
    assert len(set(ids)) == len(ids) == n + k
    assert len({r.data.tags["trial_key"] for r in runs}) == n + k
    assert every[:n] == first and all("seed" in a for a in every)
    assert not [r for r in runs if r.data.tags.get("superseded")]
    return first, every


@pytest.mark.slow  # make test-slow (CI runs it after make test)
def test_a_resumed_hyperopt_search_never_reruns_a_recorded_attacker(world, ray_local, tmp_path):
    def spec_of(n):
        return tiny(world, "resume-hyperopt", {"algorithm": "hyperopt", "num_samples": n, "n_initial": 4,
                                               "max_concurrent": 1})
    assert_extended_without_duplicates(spec_of, 3, 2, tmp_path)


@pytest.mark.slow  # make test-slow (CI runs it after make test)
def test_a_resumed_random_search_runs_only_the_new_draws(world, ray_local, tmp_path):
    """A random search's list is seeded draws in order: N + k samples begin with the N already
    drawn, so the recorded ones are filtered out by their trial keys and the k new ones run."""
    def spec_of(n):
        return tiny(world, "resume-random", {"algorithm": "random", "num_samples": n, "max_concurrent": 1})
    assert spec_of(5).attackers()[:3] == spec_of(3).attackers()
    _, every = assert_extended_without_duplicates(spec_of, 3, 2, tmp_path)
    assert every == spec_of(5).attackers()


@pytest.mark.slow  # make test-slow (CI runs it after make test)
def test_a_search_that_has_run_every_attacker_ends_with_a_note(world, ray_local, tmp_path):
    """Two attackers in the space, both recorded: asked for two more, the resumed searcher can
    only repeat them, and its search ends with one line instead of rerunning or looping."""
    def spec_of(n):
        return tiny(world, "exhausted", {"algorithm": "hyperopt", "num_samples": n, "n_initial": 4,
                                         "max_concurrent": 1}, space={"finetune": {"choice": ["lora", "full"]}})
    uri, _ = go(spec_of(2), tmp_path)
    assert sorted(a["finetune"] for a in attackers(trial_runs(uri, "exhausted"))) == ["full", "lora"]
    _, lines = go(spec_of(4), tmp_path)
    assert "defence 'rescaled': 2 trials already recorded, 2 to run" in lines
    assert "defence 'rescaled': the searcher proposed only attackers already run (20 in a row); " \
           "its search ends here, after 0 new trials" in lines
    assert len(trial_runs(uri, "exhausted")) == 2


# --- the searchers, without Ray running ---------------------------------------------------


class Repeating(Searcher):
    """A searcher that suggests from a script, and records what it was told."""

    def __init__(self, script):
        super().__init__(metric="objective", mode="min")
        self.script, self.asked, self.closed = list(script), [], []

    def suggest(self, trial_id):
        self.asked.append(trial_id)
        return self.script.pop(0) if self.script else {"x": "last"}

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.closed.append((trial_id, result, error))


def test_deduped_skips_recorded_and_repeated_attackers_then_ends_with_a_note():
    notes = []
    inner = Repeating([{"x": "a"}, {"x": "old"}, {"x": "a"}, {"x": "b"}, None, {"x": "c"}]
                      + [{"x": "b"}] * 3)
    d = searchers.Deduped(inner, lambda c: c["x"], seen={"old"}, tries=3, note=notes.append)
    assert d.suggest("t1") == {"x": "a"}
    assert d.suggest("t2") == {"x": "b"}  # the recorded one and the repeat skipped
    assert inner.asked == ["t1", "t2", "t2~1", "t2~2"]
    # each skipped suggestion is closed at once as an error: the model learns nothing from it
    assert inner.closed == [("t2", None, True), ("t2~1", None, True)]
    assert d.suggest("t3") is None  # not ready: passed on, nothing counted
    assert d.suggest("t4") == {"x": "c"}
    d.on_trial_complete("t2", {"objective": 1.0})  # reaches the inner searcher under its own id
    assert inner.closed[-1] == ("t2~2", {"objective": 1.0}, False)
    assert d.suggest("t5") is Searcher.FINISHED  # only repeats, `tries` times: the search ends
    assert inner.asked[-3:] == ["t5", "t5~1", "t5~2"]
    assert d.suggest("t6") is Searcher.FINISHED and len(inner.asked) == 9
    assert notes == ["the searcher proposed only attackers already run (3 in a row); "
                     "its search ends here, after 3 new trials"]


def model_based(tmp_path, algorithm, n_initial=4):
    return tiny(tmp_path, "unit", {"algorithm": algorithm, "num_samples": 8, "n_initial": n_initial})


def suggestions(searcher, n, value=1.0):
    out = []
    for i in range(n):
        config = searcher.suggest(f"t{i}")
        out.append(config)
        searcher.on_trial_complete(f"t{i}", {"objective": value})
    return out


@pytest.mark.parametrize("algorithm", ["hyperopt", "tpe"])
def test_a_resumed_searcher_is_told_the_records_and_draws_afresh(algorithm, tmp_path):
    """With the first run's seed both searchers' random start would propose the recorded
    attackers again; told them (objective and all) and seeded by (seed, trials told), they
    continue instead. A fresh search is seeded as before."""
    spec = model_based(tmp_path, algorithm)
    first = suggestions(searchers.make(spec, None, []), 3)
    assert first == suggestions(searchers.make(spec, None, []), 3)  # a fresh search: the seed alone
    priors = [(c, float(i)) for i, c in enumerate(first)]
    recorded = {attacker_id(decode(spec.space, c)) for c in first}
    resumed = searchers.make(spec, None, priors, recorded)
    after = suggestions(resumed, 3)
    assert not [c for c in after if c in first] and len({json.dumps(c, sort_keys=True) for c in after}) == 3
    assert resumed.skipped == 0  # the fresh seed, not the dedupe, kept it off the recorded ones
    if algorithm == "hyperopt":
        docs = resumed.inner.get_state()["hyperopt_trials"].trials
        told = [(d["misc"]["vals"], d["state"], d["result"]) for d in docs[:3]]
        assert told == [({k: [v] for k, v in c.items()}, 2, {"loss": float(i), "status": "ok"})
                        for i, c in enumerate(first)]
        assert [d["tid"] for d in docs] == list(range(6))
    else:
        study = resumed.inner._ot_study.trials
        assert [(t.params, t.value, t.state.name) for t in study[:3]] == \
            [(c, float(i), "COMPLETE") for i, c in enumerate(first)]


@pytest.mark.parametrize("algorithm", ["hyperopt", "tpe"])
def test_a_resumed_model_learns_from_the_records(algorithm, tmp_path):
    """Twelve recorded trials in which only full fine-tuning broke the defence cheaply: past its
    random start, the resumed model proposes full fine-tuning."""
    spec = model_based(tmp_path, algorithm, n_initial=4)
    priors = [({"learning_rate": 10 ** (-4 + i / 6), "finetune": i % 2}, 5.0 if i % 2 else 80.0)
              for i in range(12)]
    after = suggestions(searchers.make(spec, None, priors), 4, value=80.0)
    assert [c["finetune"] for c in after] == [1, 1, 1, 1]


def test_a_random_list_runs_each_attacker_once(tmp_path):
    """Draws of discrete dimensions repeat attackers; the same attacker (seed included) is the
    same trial, so a random search runs it once, and counts it once."""
    spec = tiny(tmp_path, "dups", {"algorithm": "random", "num_samples": 8},
                space={"finetune": {"choice": ["lora", "full"]}, "optimizer": {"choice": ["adamw", "sgd_momentum"]}})
    drawn = [json.dumps(a, sort_keys=True) for a in spec.attackers()]
    assert len(drawn) == 8 and len(set(drawn)) == 4

    class Records:
        def finished_trials(self, defence, search_key):
            return []

        def adversary_run(self, defence, search_key, params):
            return "adversary"

    lines = []
    x = prepare(spec, spec.defences[0], Records(), set(), lines.append)
    assert [json.dumps(a, sort_keys=True) for a in x.configs] == list(dict.fromkeys(drawn))
    assert x.pending == 4 and lines == ["defence 'rescaled': 0 trials already recorded, 4 to run"]
    done = {sweep.trial_key(spec, {"defence": "rescaled", **a}) for a in x.configs[:3]}
    assert prepare(spec, spec.defences[0], Records(), done, lines.append).configs == x.configs[3:]
    assert lines[-1] == "defence 'rescaled': 3 trials already recorded, 1 to run"
