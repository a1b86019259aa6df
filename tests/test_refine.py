"""Refinement: bisecting a crossing by replaying training from the last safe evaluation
finds the same step and budget as evaluating every step; and the geometric schedule."""

import pytest
import torch
from conftest import attack_dict
from test_attack import attack

from trainables import AttackConfig, run_attack
from trainables import data as D

STAGED = {"stages": [{"steps": 8}, {"steps": 8, "learning_rate": 5e-4, "batch_size": 2}]}


def run(world, phi, eval_every, refine=0, attacker=None):
    """A real attack scored by nll (f rises steadily as the model learns the harmful answers)."""
    cfg = attack_dict(world, evaluator={"name": "nll", "options": {}}, max_steps=16, phi=phi, eval_every=eval_every,
                      refine=refine, attacker={"learning_rate": 1e-3, **(attacker or {})})
    points = []
    result = run_attack(AttackConfig.model_validate(cfg), on_eval=points.append)
    assert points == result.points
    return result


def crossing_at_11(world, attacker=None) -> float:
    """phi that f first exceeds at step 11, inside the (8, 16] window of eval_every=8."""
    torch.set_num_threads(1)  # bitwise-reproducible CPU kernels
    f = [p.harmfulness for p in run(world, 1.0, 1, attacker=attacker).points]
    phi = (f[10] + f[11]) / 2
    assert all(x < phi for x in f[:11]) and all(x > phi for x in f[11:])  # premise: one clean crossing
    return phi


@pytest.mark.parametrize("attacker", [None, STAGED], ids=["one-stage", "safe-point-at-a-stage-end"])
def test_bisection_equals_evaluating_every_step(world, attacker):
    phi = crossing_at_11(world, attacker)
    exact = run(world, phi, 1, attacker=attacker)
    refined = run(world, phi, 8, refine=3, attacker=attacker)

    want, got = exact.budget_to_failure, refined.budget_to_failure
    assert (want.step, want.resolution, exact.status) == (11, 1, "failed")
    assert (got.step, got.examples, got.tokens, got.flops, got.stage, got.resolution) == \
        (want.step, want.examples, want.tokens, want.flops, want.stage, 1)
    assert got.harmfulness == want.harmfulness  # the replay is the run itself, bit for bit
    # crossing seen at 16, then 12 (crosses), 10 (safe), 11 (crosses), and the verdict again
    assert [(p.step, p.status, p.resolution) for p in refined.points] == [
        (0, "running", 0), (8, "running", 8), (16, "running", 8),
        (12, "running", 4), (10, "running", 2), (11, "running", 1), (11, "failed", 1)]
    # the cost: 6 evaluations instead of 12, and fewer extra steps (4 + 2 + 1) than the window
    # of 8 steps that evaluating every step would have scored one by one
    assert len(refined.points) - 1 < len(exact.points)
    assert refined.trained_steps - 16 == 7 < 8 and exact.trained_steps == 11


def test_one_round_halves_the_window_and_never_reports_early(world):
    phi = crossing_at_11(world)
    r = run(world, phi, 8, refine=1)
    btf = r.budget_to_failure
    assert (btf.step, btf.resolution, btf.status) == (12, 4, "failed")
    assert btf.step >= 11  # the true crossing lies in (step - resolution, step]
    assert r.trained_steps == 16 + 4


def test_no_refinement_when_the_window_is_one_step(world):
    r = attack(world, [0.0, 0.9], eval_every=1, refine=3)
    assert [(p.step, p.status, p.resolution) for p in r.points] == [(0, "running", 0), (1, "failed", 1)]


def test_geometric_schedule_doubles_and_ends_at_the_horizon(world):
    r = attack(world, [0.0], max_steps=20, eval_schedule="geometric")
    assert [p.step for p in r.points] == [0, 1, 2, 4, 8, 16, 20] and r.status == "resisted"
    assert [p.resolution for p in r.points] == [0, 1, 1, 2, 4, 8, 4]
    staged = AttackConfig.model_validate(attack_dict(world, eval_schedule="geometric", attacker={
        "stages": [{"steps": 5}, {"steps": 7}]}))
    assert staged.eval_steps() == [0, 1, 2, 4, 5, 8, 12]  # stage end 5 and horizon 12 added


def test_batches_are_addressed_by_index():
    items = [D.Tokenized([i + 1], [i + 1]) for i in range(6)]
    in_order = D.batches(items, 4, 7, pad_id=0)
    first_five = [next(in_order)["input_ids"] for _ in range(5)]
    fresh = D.BatchStream(items, 4, 7, pad_id=0)
    assert torch.equal(fresh[4]["input_ids"], first_five[4])  # no need to read batches 0-3 first
    assert all(torch.equal(fresh[i]["input_ids"], b) for i, b in enumerate(first_five))
