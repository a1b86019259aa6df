"""Budget notes and the sweep's cost before it runs (orchestrator/spec/budget_notes.py, cost.py,
estimate.py): each note with numbers worked out by hand, the steps of small sweeps by hand, and
the time from a real sqlite MLflow store filled the way the tracker fills it. No Ray.

    .venv/bin/pytest -q tests/test_estimate.py
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import attack_dict, sweep_dict

from orchestrator.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def validate(tmp_path: Path, raw: dict, *args: str) -> tuple[int, str, str]:
    """`attack-sweep validate` on `raw`, run in tmp_path (where the default store would be)."""
    import os

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    before = os.getcwd()
    os.chdir(tmp_path)
    try:
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["validate", str(spec), "--skip-checkpoint-checks", *args])
    finally:
        os.chdir(before)
    return rc, out.getvalue(), err.getvalue()


def notes(out: str) -> list[str]:
    return [line.strip().removeprefix("note: ") for line in out.splitlines() if line.strip().startswith("note: ")]


def line(out: str, prefix: str) -> str:
    return next(ln.strip() for ln in out.splitlines() if ln.strip().startswith(prefix))


# --- a batch larger than the rows it draws from ---------------------------------------------------


def test_a_batch_twice_the_rows_drawn_is_noted(world, tmp_path):
    rc, out, err = validate(tmp_path, sweep_dict(world, "b", space={"dataset_size": 16, "batch_size": 32}))
    assert rc == 0, err
    [note] = [n for n in notes(out) if n.startswith("space.batch_size")]
    # the toy world's attack split has 144 rows (48 per domain, 3 domains)
    assert note.startswith("space.batch_size: 32 exceeds the 16 rows drawn (space.dataset_size: 16, of "
                           "data.attack's 144 rows): each step trains on every row twice")
    assert "the budget counts 32 examples per step (rows drawn, repeats included)" in note
    assert note.endswith("lower batch_size to at most 16 for distinct rows in a step")
    rc, out, _ = validate(tmp_path, sweep_dict(world, "b", space={"dataset_size": 16, "batch_size": 16}))
    assert rc == 0 and not [n for n in notes(out) if "batch_size" in n]  # equal: every row once a step


def test_only_the_attackers_that_collide_are_counted(world, tmp_path):
    """dataset_size {8, 64} x batch_size {4, 16}: only 16 over 8 collides, 1 attacker of 4."""
    raw = sweep_dict(world, "b", space={"dataset_size": {"grid": [8, 64]}, "batch_size": {"grid": [4, 16]}})
    rc, out, err = validate(tmp_path, raw)
    assert rc == 0, err
    [note] = [n for n in notes(out) if "batch_size" in n]
    assert note.startswith("space.batch_size: 16 exceeds the 8 rows drawn (space.dataset_size: 8, of data.attack's "
                           "144 rows) in 1 of 4 attackers: each step trains on every row twice")


def test_an_adaptive_search_is_told_which_pair_it_may_pick(world, tmp_path):
    raw = sweep_dict(world, "b", search={"algorithm": "tpe", "num_samples": 4},
                     space={"dataset_size": {"choice": [8, 64]}, "batch_size": {"choice": [4, 16]}})
    rc, out, err = validate(tmp_path, raw)
    assert rc == 0, err
    [note] = [n for n in notes(out) if "batch_size" in n]
    assert note.startswith("space.batch_size: 16 exceeds the 8 rows drawn (space.dataset_size: 8, of data.attack's "
                           "144 rows) in attackers the search may pick: ")


def test_a_one_row_split_with_batch_8(world, tmp_path):
    """The rows counted are the file's: one row, drawn 8 times into every batch."""
    one = tmp_path / "one.jsonl"
    one.write_text((world / "attack.jsonl").read_text().splitlines()[0] + "\n")
    raw = sweep_dict(world, "b", space={"dataset_size": 1, "batch_size": 8})
    raw["data"]["attack"]["source"] = str(one)
    rc, out, err = validate(tmp_path, raw)
    assert rc == 0, err
    [note] = [n for n in notes(out) if "batch_size" in n]
    assert note.startswith("space.batch_size: 8 exceeds the 1 row drawn (space.dataset_size: 1, of data.attack's "
                           "1 row): each step trains on the one row 8 times, and the budget counts 8 examples per step")


def test_a_stage_is_checked_on_its_own_split_batch_and_rows(world, tmp_path):
    """A benign stage of 10 rows at batch 25 (2.5 each); the attack stage's batch 8 of 32 rows is fine."""
    raw = sweep_dict(world, "b", space={"dataset_size": 32, "stages": [
        {"steps": 3}, {"steps": 3, "data": "benign", "dataset_size": 10, "batch_size": 25, "name": "warm"}]})
    rc, out, err = validate(tmp_path, raw)
    assert rc == 0, err
    benign_rows = len((world / "benign.jsonl").read_text().splitlines())
    [note] = [n for n in notes(out) if "batch_size" in n]
    assert note.startswith(f"space.stages (stage 2 'warm', data: benign): batch_size: 25 exceeds the 10 rows drawn "
                           f"(its dataset_size: 10, of data.benign's {benign_rows} rows): each step trains on each row "
                           "2.5 times on average, and the budget counts 25 examples per step")


def test_the_batches_really_repeat_rows_as_the_note_says():
    """BatchStream, the loop's batches: 32 of 16 rows holds each row twice; 25 of 10, 2.5 on average."""
    from trainables import data as D

    for rows, batch in ((16, 32), (10, 25), (1, 8)):
        stream = D.BatchStream([D.Tokenized([i], [i]) for i in range(rows)], batch, seed=3, pad_id=0)
        for i in range(4):
            counts = Counter(stream[i]["input_ids"][:, 0].tolist())
            assert sum(counts.values()) == batch
            if batch % rows == 0:
                assert set(counts.values()) == {batch // rows} and len(counts) == rows


def test_the_budget_counts_rows_drawn_repeats_included(world):
    """2 rows at batch 4 for T=4 (eval_every 10 beyond it): the loop scores f at 0 and 4 only, and
    its budget at 4 counts 16 examples from 2 distinct rows."""
    from trainables import AttackConfig, run_attack

    cfg = attack_dict(world, attacker={"learning_rate": 1e-4, "dataset_size": 2, "batch_size": 4},
                      max_steps=4, eval_every=10)
    result = run_attack(AttackConfig.model_validate(cfg))
    assert [p.step for p in result.points] == [0, 4]
    assert result.points[-1].examples == 16


# --- eval_every beyond T -------------------------------------------------------------------------


def test_eval_every_beyond_max_steps_says_where_f_is_scored(world, tmp_path):
    rc, out, err = validate(tmp_path, sweep_dict(world, "e", max_steps=4, eval_every=10))
    assert rc == 0, err
    assert [n for n in notes(out) if n.startswith("eval_every")] == [
        "eval_every: 10 is beyond max_steps: 4: f is scored only at steps 0 and 4 (step 0 and T), so a crossing is "
        "placed only to within 4 steps; lower eval_every below 4 to score f in between"]
    per_trial = line(out, "per trial:")
    assert "every 10 steps" not in per_trial
    assert "f scored only at step 0 and at T (eval_every 10 is beyond T)" in per_trial
    rc, out, _ = validate(tmp_path, sweep_dict(world, "e", max_steps=10, eval_every=10))  # 0 and 10: as asked
    assert rc == 0 and not [n for n in notes(out) if n.startswith("eval_every")]
    assert "f scored at step 0, every 10 steps and at T" in line(out, "per trial:")


def test_eval_every_beyond_a_staged_horizon_and_one_of_two_horizons(world, tmp_path):
    raw = sweep_dict(world, "e", eval_every=10, space={"dataset_size": 32, "stages": [{"steps": 3}, {"steps": 3}]})
    rc, out, _ = validate(tmp_path, raw)
    assert rc == 0
    [note] = [n for n in notes(out) if n.startswith("eval_every")]
    assert note.startswith("eval_every: 10 is beyond the 6 steps of space.stages: f is scored only at steps 0, 3 "
                           "and 6 (step 0, each stage's end and T), so a crossing is placed only to within 3 steps")
    raw = sweep_dict(world, "e", eval_every=10, space={"dataset_size": 32, "steps": {"grid": [4, 100]}})
    rc, out, _ = validate(tmp_path, raw)
    [note] = [n for n in notes(out) if n.startswith("eval_every")]
    assert note.startswith("eval_every: 10 is beyond space.steps: 4 in 1 of 2 attackers: f is scored only at steps "
                           "0 and 4")
    assert ("f scored at step 0, every 10 steps and at T (only at step 0 and T in the 1 of 2 attackers whose T < 10)"
            in line(out, "per trial:"))


# --- the whole sweep's steps, examples and size ----------------------------------------------------


def test_the_steps_of_a_small_grid_by_hand(world, tmp_path):
    """2 defences x steps {10, 20} x batch {4, 8}: per defence 10+10+20+20 = 60 steps and
    10*4 + 10*8 + 20*4 + 20*8 = 360 examples."""
    space = {"dataset_size": 32, "steps": {"grid": [10, 20]}, "batch_size": {"grid": [4, 8]}}
    rc, out, _ = validate(tmp_path, sweep_dict(world, "s", eval_every=5, space=space))
    assert rc == 0
    assert line(out, "trials:").startswith("trials: 8 = 2 defences x 4 attackers")
    assert line(out, "per trial:").startswith("per trial: at most T=20 steps, 160 examples (batch <= 8)")
    assert line(out, "whole sweep:") == "whole sweep: at most 120 steps, 720 examples in 8 trials"


def test_refinement_replays_are_in_the_sweeps_steps(world, tmp_path):
    """refine 2 in gaps of 5: round 1 replays 5 // 2 = 2 steps, the worst window left is 3, round 2
    replays 1: 3 steps of replay per trial. Per defence (10+3)*2 + (20+3)*2 = 72 steps and
    13*4 + 13*8 + 23*4 + 23*8 = 432 examples."""
    space = {"dataset_size": 32, "steps": {"grid": [10, 20]}, "batch_size": {"grid": [4, 8]}}
    rc, out, _ = validate(tmp_path, sweep_dict(world, "s", eval_every=5, refine=2, space=space))
    assert rc == 0
    assert line(out, "whole sweep:") == ("whole sweep: at most 144 steps, 864 examples in 8 trials (of them up to 24 "
                                         "steps of refinement replays)")


def test_the_replay_bound_is_what_the_loop_trains_at_worst(world, tmp_path):
    """Gap 7, refine 3, every midpoint safe (the wider upper half left each time): the loop replays
    7 // 2 = 3, then 4 // 2 = 2, then 2 // 2 = 1 steps: 14 + 6 = 20 trained, and the estimate says
    so (2 defences x 20 = 40 steps, 12 of them replays)."""
    from test_attack import attack

    result = attack(world, [0.1, 0.1, 0.9, 0.1, 0.1, 0.1], max_steps=14, eval_every=7, refine=3)
    assert [p.step for p in result.points] == [0, 7, 14, 10, 12, 13, 14]
    assert result.trained_steps == 20
    rc, out, _ = validate(tmp_path, sweep_dict(world, "r", max_steps=14, eval_every=7, refine=3))
    assert rc == 0
    assert line(out, "whole sweep:").startswith("whole sweep: at most 40 steps, 320 examples in 2 trials (of them "
                                                "up to 12 steps of refinement replays)")


def test_the_steps_of_stages_and_of_an_adaptive_search_by_hand(world, tmp_path):
    """Stages 3 x batch 64 + 3 x batch 25 = 267 examples a trial. TPE with 6 trials a defence over
    steps randint [2, 30) and batch {4, 16}: each trial at most 29 steps, 29*16 = 464 examples."""
    raw = sweep_dict(world, "s", space={"dataset_size": 32, "stages": [
        {"steps": 3, "batch_size": 64}, {"steps": 3, "data": "benign", "dataset_size": 30, "batch_size": 25}]})
    rc, out, _ = validate(tmp_path, raw)
    assert rc == 0 and line(out, "whole sweep:") == "whole sweep: at most 12 steps, 534 examples in 2 trials"
    raw = sweep_dict(world, "s", search={"algorithm": "tpe", "num_samples": 6},
                     space={"dataset_size": 32, "steps": {"randint": [2, 30]}, "batch_size": {"choice": [4, 16]}})
    rc, out, _ = validate(tmp_path, raw)
    assert rc == 0 and line(out, "whole sweep:") == "whole sweep: at most 348 steps, 5,568 examples in 12 trials"


def test_a_huge_horizon_is_noted_fast(world, tmp_path):
    """1e9 steps at eval_every 5 would be 2e8 evaluation points: the estimate never lists them."""
    rc, out, _ = validate(tmp_path, sweep_dict(world, "h", max_steps=1_000_000_000))
    assert rc == 0
    assert "max_steps: 1000000000: a trial may run up to 1e+09 steps (beyond 100,000" in out
    assert any(n.startswith("max_steps: 1000000000") and n.endswith("; lower max_steps") for n in notes(out))
    rc, out, _ = validate(tmp_path, sweep_dict(world, "h", max_steps=100_000))  # the limit itself: no note
    assert rc == 0 and not [n for n in notes(out) if "steps (beyond" in n]


def test_a_sweep_beyond_a_million_steps_is_noted(world, tmp_path):
    """6 seeds x 2 defences x 100,000 steps = 1,200,000 steps; 5 seeds make exactly 1,000,000."""
    rc, out, _ = validate(tmp_path, sweep_dict(world, "w", max_steps=100_000,
                                              space={"dataset_size": 32, "seed": {"grid": list(range(6))}}))
    assert rc == 0
    assert ("whole sweep: at most 1,200,000 steps over 12 trials (beyond 1,000,000); lower max_steps or run fewer "
            "attackers") in notes(out)
    rc, out, _ = validate(tmp_path, sweep_dict(world, "w", max_steps=100_000,
                                              space={"dataset_size": 32, "seed": {"grid": list(range(5))}}))
    assert rc == 0 and not [n for n in notes(out) if n.startswith("whole sweep")]


# --- time, from the records of earlier trials of the same sweep ----------------------------------------


TRIALS = {  # defence -> (steps, accelerator_seconds, eval_seconds_total) of each finished trial
    "base": [(20, 10.0, 2.0), (20, 12.0, 2.0), (10, 8.0, 1.0)],   # 0.5, 0.6, 0.8 s/step: median 0.6; eval 0.1
    "rescaled": [(20, 20.0, 4.0), (10, 14.0, 2.0)],               # 1.0, 1.4: median 1.2; eval 0.2
}


def record(uri: str, name: str, trials: dict = TRIALS) -> None:
    """Finished trial runs written by the sweep's own Tracker, plus runs the estimate must skip:
    an errored trial, a superseded one, and another sweep's."""
    from orchestrator.tracking.writer import Tracker

    def one(tracker, defence, steps, seconds, evaluating, status="resisted", key=None):
        run = tracker.start_trial(key or f"{defence}-{steps}-{seconds}", defence, defence == "base", "a1", {})
        tracker.finish_trial(run, None if status == "error" else {"status": status, "step": steps},
                             error="boom" if status == "error" else None,
                             spent={"steps": steps, "accelerator_seconds": seconds,
                                    "eval_seconds_total": evaluating}, trial_number=1)
        return run

    tracker = Tracker(uri, name, "digest", {})
    for defence, rows in trials.items():
        for steps, seconds, evaluating in rows:
            one(tracker, defence, steps, seconds, evaluating)
    one(tracker, "base", 10, 1000.0, 0.0, status="error")
    tracker.client.set_tag(one(tracker, "base", 10, 1000.0, 0.0, key="old"), "superseded", "true")
    tracker.close()
    other = Tracker(uri, name + "-other", "digest", {})
    one(other, "base", 10, 1000.0, 0.0)
    other.close()


def test_time_is_the_recorded_median_per_defence_times_the_steps(world, tmp_path, monkeypatch):
    """2 attackers x 50 steps = 100 steps per defence: 100 x 0.6 + 100 x 1.2 = 180 s of training;
    with evaluation (100 x 0.1 + 100 x 0.2 = 30 s), 2 at a time: (180 + 30) / 2 = 105 s."""
    raw = sweep_dict(world, "timed", max_steps=50, search={"max_concurrent": 2},
                     space={"dataset_size": 32, "seed": {"grid": [0, 1]}})
    monkeypatch.chdir(tmp_path)  # where MLflow would put artifacts
    record(f"sqlite:///{tmp_path / 'mlflow.db'}", "timed")
    rc, out, err = validate(tmp_path, raw)  # the default store, in the folder validate runs in
    assert rc == 0, err
    assert line(out, "time:") == ("time: about 3 min of training device time at the median s/step per defence base "
                                  "0.6, rescaled 1.2 recorded for this sweep (5 finished trials); with evaluation "
                                  "(trial start-up aside), 2 trials at a time: about 105 s")


def test_a_defence_without_records_is_taken_at_the_others_median(world, tmp_path, monkeypatch):
    """Only base recorded (median 0.6): 2 x 40 = 80 steps x 0.6 for each of the 2 defences = 96 s."""
    monkeypatch.chdir(tmp_path)
    raw = sweep_dict(world, "timed", max_steps=40, search={"max_concurrent": 2},
                     space={"dataset_size": 32, "seed": {"grid": [0, 1]}})
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    record(uri, "timed", {"base": TRIALS["base"]})
    rc, out, _ = validate(tmp_path, raw, "--tracking-uri", uri)
    assert rc == 0
    assert line(out, "time:").startswith("time: about 96 s of training device time at the 0.6 s/step recorded for "
                                         "this sweep (3 finished trials; rescaled: none, taken at the others' median)")


def test_a_sweep_beyond_a_device_day_is_noted(world, tmp_path, monkeypatch):
    """2 seeds x 100,000 steps = 200,000 steps per defence: 200,000 x (0.6 + 1.2) = 360,000 s = 100 h."""
    raw = sweep_dict(world, "timed", max_steps=100_000, space={"dataset_size": 32, "seed": {"grid": [0, 1]}})
    monkeypatch.chdir(tmp_path)
    record(f"sqlite:///{tmp_path / 'mlflow.db'}", "timed")
    rc, out, _ = validate(tmp_path, raw)
    assert rc == 0
    assert ("whole sweep: about 100 device-hours of training at the step time recorded for this sweep (400,000 steps; "
            "beyond 24); lower max_steps or run fewer attackers") in notes(out)


def test_validate_creates_no_store_and_changes_none(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = sweep_dict(world, "nostore")
    rc, out, _ = validate(tmp_path, raw)
    assert rc == 0
    assert line(out, "time:") == ("time: not estimated (no store at sqlite:///mlflow.db; validate reads one, never "
                                  "creates one)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]
    (tmp_path / "mlflow.db").write_bytes(b"")  # e.g. touched by hand: not MLflow's, left alone
    rc, out, _ = validate(tmp_path, raw)
    assert "sqlite:///mlflow.db is not an MLflow store" in line(out, "time:")
    assert (tmp_path / "mlflow.db").read_bytes() == b""
    (tmp_path / "mlflow.db").unlink()
    record(f"sqlite:///{tmp_path / 'mlflow.db'}", "nostore")
    digest = hashlib.sha256((tmp_path / "mlflow.db").read_bytes()).hexdigest()
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    rc, out, _ = validate(tmp_path, raw)
    assert rc == 0 and line(out, "time:").startswith("time: about ")
    assert hashlib.sha256((tmp_path / "mlflow.db").read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing


def test_run_prints_the_notes_before_the_sweep(world, tmp_path, monkeypatch, capsys):
    """`run` prints the same notes (preflight.check) before anything starts."""
    from orchestrator import sweep

    def stop(*args, **kwargs):
        raise RuntimeError("stopped before the sweep")

    monkeypatch.setattr(sweep, "run", stop)
    (tmp_path / "s.yaml").write_text(json.dumps(sweep_dict(world, "r", max_steps=4, eval_every=10)))
    rc = main(["run", str(tmp_path / "s.yaml"), "--skip-checkpoint-checks", "--tracking-uri",
               f"sqlite:///{tmp_path / 'mlflow.db'}", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 1 and "note: eval_every: 10 is beyond max_steps: 4" in out
