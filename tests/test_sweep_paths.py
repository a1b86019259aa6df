"""Paths the README promises, through a real sweep: a defence published as a PEFT adapter
(merged before the attack), refinement (budget at resolution 1, replays not counted as spent
compute), an attacker's seeds forming one group for the bootstrap; and what `trial_key`
digests (a trial reruns exactly when something that decides its result changes)."""

import pytest
import torch
from conftest import attack_dict, sweep_dict, trial_runs
from mlflow.tracking import MlflowClient

from orchestrator import report, sweep
from orchestrator import spec as S
from trainables import AttackConfig, run_attack

pytestmark = pytest.mark.usefixtures("one_thread")

LRS, SEEDS = [3e-3, 1e-3], [0, 1]
SCALE = 0.1  # of the adapter's random LoRA B: enough to move f, not to undo the refusals


@pytest.fixture(scope="module")
def adapter(world, tmp_path_factory):
    """A defender's LoRA adapter for the toy base: small random weights on q/v (a no-op LoRA,
    B = 0, could not show whether it was applied)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(world / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(SCALE)
    path = tmp_path_factory.mktemp("adapter") / "vaccine"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def swept(world, adapter, ray_local, tmp_path_factory):
    """One defence, the base model with the adapter; 2 attackers x 2 seeds; f checked every 4
    steps and each crossing bisected twice (to one step); nll scores beside the primary."""
    tmp = tmp_path_factory.mktemp("paths")
    raw = sweep_dict(world, "paths", defences=("base",), max_steps=12, eval_every=4, refine=2,
                     evaluators=[{"name": "refusal_keyword", "options": {"max_new_tokens": 4}, "primary": True},
                                 {"name": "nll"}],
                     space={"dataset_size": 32, "learning_rate": {"grid": LRS}, "seed": {"grid": SEEDS}})
    del raw["evaluator"]
    raw["defences"] = [{"name": "vaccine", "model": str(world / "base"), "adapter": str(adapter), "base": True}]
    spec = S.from_dict(raw)
    uri = f"sqlite:///{tmp}/mlflow.db"
    sweep.run(spec, tracking_uri=uri, storage_path=str(tmp / "ray"), echo=lambda line: None)
    return spec, uri


def curve(uri, run_id, key) -> dict[int, float]:
    """step -> value (a refined crossing is logged twice, as the bisection point and as the verdict)."""
    return {int(m.step): m.value for m in MlflowClient(uri).get_metric_history(run_id, key)}


def step0_nll(world, **checkpoint) -> float:
    cfg = attack_dict(world, checkpoint={"model": str(world / "base"), **checkpoint}, data={"eval_size": 16},
                      evaluator={"name": "nll", "options": {}}, max_steps=1, eval_every=1)
    return run_attack(AttackConfig.model_validate(cfg)).points[0].harmfulness


def test_a_defence_given_as_an_adapter_is_attacked_with_the_adapter_merged(swept, world, adapter):
    spec, uri = swept
    runs = trial_runs(uri, "paths")
    assert len(runs) == 4 and all(r.data.tags["status"] in ("failed", "resisted") for r in runs)
    at_release = {curve(uri, r.info.run_id, "harmfulness.nll")[0] for r in runs}
    assert len(at_release) == 1   # every attacker starts from the same released model
    (f0,) = at_release
    # ... the base model with the adapter merged, not the base model alone
    plain, merged = step0_nll(world), step0_nll(world, adapter=str(adapter))
    assert abs(merged - plain) > 1e-3 * plain
    assert f0 == pytest.approx(merged, rel=1e-5)
    assert all(curve(uri, r.info.run_id, "harmfulness")[0] == 0.0 for r in runs)  # and it still refuses


def test_refinement_in_a_sweep_records_the_refined_budget_and_spends_only_the_furthest_step(swept):
    spec, uri = swept
    failed = [r for r in trial_runs(uri, "paths") if r.data.tags["status"] == "failed"]
    assert failed
    replayed = 0
    for r in failed:
        m = r.data.metrics
        steps = sorted(curve(uri, r.info.run_id, "harmfulness"))
        hi = steps[-1]
        assert m["budget_resolution_steps"] == 1 and r.data.params["refine"] == "2"
        # the crossing was seen at a coarse step (every 4), then bisected inside its window
        assert hi % 4 == 0 and set(range(0, hi + 1, 4)) <= set(steps)
        assert hi - 4 < m["budget_to_failure_steps"] <= hi
        # spent compute is the furthest point reached, not the sum over the replays
        assert m["spent_steps"] == hi
        tokens = curve(uri, r.info.run_id, "tokens")
        assert m["spent_tokens"] == tokens[hi]
        assert m["budget_to_failure_tokens"] == tokens[int(m["budget_to_failure_steps"])]
        replayed += m["budget_to_failure_steps"] < hi
    assert replayed  # at least one crossing was pinned below the coarse step it was seen at


def test_an_attackers_seeds_form_one_group_for_the_bootstrap(swept):
    spec, uri = swept
    (row,) = report.load(uri, "paths")
    assert len(row.trials) == 4 and len({t.attacker_id for t in row.trials}) == 4
    groups: dict[str, set] = {}
    for t in row.trials:
        groups.setdefault(t.attacker_group, set()).add((t.params["learning_rate"], t.params["seed"]))
    assert sorted(groups.values(), key=sorted) == sorted(
        [{(str(lr), str(s)) for s in SEEDS} for lr in LRS], key=sorted)
    values = row.values("steps")
    assert set(values) == set(groups) and all(len(v) == len(SEEDS) for v in values.values())


def test_trial_key_changes_with_what_decides_the_result_and_not_with_resources(world):
    raw = sweep_dict(world, "keys", defences=("base",))

    def key(**over) -> str:
        spec = S.from_dict({**raw, **over})
        (trial,) = sweep.trials(spec)
        return sweep.trial_key(spec, trial)

    same = key()
    changed = {
        "checkpoint": key(defences=[{"name": "base", "model": str(world / "rescaled"), "base": True}]),
        "attack data": key(data={**raw["data"], "attack": {"source": str(world / "benign.jsonl")}}),
        "eval data": key(data={**raw["data"], "eval_size": 8}),
        "evaluator": key(evaluator={"name": "refusal_keyword", "options": {"max_new_tokens": 8}}),
        "phi": key(phi=0.6),
        "T": key(max_steps=30),
        "attacker": key(space={"dataset_size": 16}),
    }
    assert same == key()  # stable
    assert same not in changed.values() and len(set(changed.values())) == len(changed), changed
    # how a trial is run is not what it measures: other resources, the same key (and no rerun)
    assert key(resources={"cpu": 2}) == key(resources={"cpu": 0.5, "gpu": 1}) == same
