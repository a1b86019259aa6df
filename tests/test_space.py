import math

from orchestrator.spec.space import AttackerSpace, attacker_id, attackers
from trainables.config import Attacker


def space(**fields):
    return AttackerSpace.model_validate(fields)


def test_grid_crosses_grid_and_choice_dimensions_with_constants():
    sp = space(learning_rate={"grid": [1e-4, 1e-3]}, optimizer={"choice": ["adamw", "sgd"]},
               batch_size=4)
    got = attackers(sp, "grid", 1, 0)
    assert len(got) == 4
    assert {(a["learning_rate"], a["optimizer"]) for a in got} == {
        (1e-4, "adamw"), (1e-4, "sgd"), (1e-3, "adamw"), (1e-3, "sgd")}
    assert all(a["batch_size"] == 4 and a["finetune"] == "full" for a in got)
    assert all(Attacker.model_validate(a) for a in got)  # every field present and valid


def test_random_draws_are_seeded_and_within_bounds():
    sp = space(learning_rate={"loguniform": [1e-5, 1e-2]}, dataset_size={"grid": [8, 16]},
               optimizer={"choice": ["adamw", "sgd"]}, seed={"randint": [0, 1000]})
    a = attackers(sp, "random", 5, seed=1)
    assert len(a) == 10 and a == attackers(sp, "random", 5, seed=1)
    assert a != attackers(sp, "random", 5, seed=2)
    assert all(1e-5 <= x["learning_rate"] <= 1e-2 for x in a)
    assert all(0 <= x["seed"] < 1000 for x in a)
    # loguniform spreads over decades: the draws are not all in the top decade
    assert min(math.log10(x["learning_rate"]) for x in a) < -3
    # each grid value is paired with the same draws
    by_size = {s: [x["learning_rate"] for x in a if x["dataset_size"] == s] for s in (8, 16)}
    assert by_size[8] == by_size[16]


def test_attacker_id_is_stable_and_distinguishes_configs():
    a = attackers(space(learning_rate={"grid": [1e-4, 1e-3]}), "grid", 1, 0)
    assert attacker_id(a[0]) == attacker_id(dict(reversed(list(a[0].items()))))
    assert attacker_id(a[0]) != attacker_id(a[1])
