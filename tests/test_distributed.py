"""Data-parallel trials: the global batch split across ranks, a single-process DeepSpeed
trial with no launcher variables, and a 2-worker CPU (gloo) Ray Train trial that agrees
with the single-process one. GPUs are not here: ZeRO-2/3 with bf16 on CUDA runs in
bench/gpu_check.sh, not in CI."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import attack_dict, sweep_dict, trial_runs
from mlflow.tracking import MlflowClient

from orchestrator import spec as S
from orchestrator import sweep
from trainables import AttackConfig, run_attack
from trainables.parallel import World, shard


def batch(n=8, length=5):
    ids = torch.arange(n * length).reshape(n, length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_each_rank_gets_its_own_rows_of_the_global_batch():
    b = batch(8)
    seen = []
    for rank in range(2):
        pieces = shard(b, World(rank, 2), accumulation=2)
        assert len(pieces) == 2 and all(p["input_ids"].shape[0] == 2 for p in pieces)
        seen.append({tuple(row.tolist()) for p in pieces for row in p["input_ids"]})
    assert not seen[0] & seen[1]  # no two ranks see the same example
    assert seen[0] | seen[1] == {tuple(row.tolist()) for row in b["input_ids"]}  # and none is dropped
    with pytest.raises(ValueError, match="batch_size=6 does not divide over 2 workers x 2"):
        shard(batch(6), World(0, 2), accumulation=2)


SINGLE = """
import json, sys
from trainables import AttackConfig, run_attack
from trainables import parallel

engines = []
wrap = parallel.DataParallel.wrap
def spy(self, *args, **kwargs):  # observes the engine the trainer trains through
    engine = wrap(self, *args, **kwargs)
    engines.append(engine)
    return engine
parallel.DataParallel.wrap = spy

r = run_attack(AttackConfig.model_validate_json(sys.argv[1]))
b = r.budget_to_failure
(engine,) = engines
print("RESULT " + json.dumps({"status": r.status, "step": b.step if b else None,
                             "examples": b.examples if b else None,
                             "world_size": [p.world_size for p in r.points],
                             "engine": type(engine).__name__,
                             "zero_stage": getattr(engine, "zero_optimization_stage", lambda: None)(),
                             "optimizer": type(getattr(engine, "optimizer", None)).__name__,
                             "engine_steps": getattr(engine, "global_steps", None),
                             "trained_steps": r.trained_steps}))
"""


@pytest.mark.parametrize("stage,finetune,lr,zero_optimizer", [
    # zero2-full is the slower one (~35 s on 2 cores): make test-slow runs it (CI runs it after make test)
    pytest.param(2, "full", 1e-4, "DeepSpeedZeroOptimizer", marks=pytest.mark.slow),
    (3, "lora", 1e-3, "DeepSpeedZeroOptimizer_Stage3")],
    ids=["zero2-full", "zero3-lora"])
def test_single_process_deepspeed_needs_no_launcher_variables(world, stage, finetune, lr, zero_optimizer):
    over = {"max_steps": 20, "eval_every": 2,
            "attacker": {"learning_rate": lr, "dataset_size": 16, "batch_size": 4, "finetune": finetune}}
    plain = run_attack(AttackConfig.model_validate(attack_dict(world, **over)))
    cfg = AttackConfig.model_validate(attack_dict(
        world, deepspeed={"config": {"zero_optimization": {"stage": stage}}}, **over))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", SINGLE, cfg.model_dump_json()], capture_output=True,
                         text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert got["status"] == plain.status == "failed"
    assert abs(got["step"] - plain.budget_to_failure.step) <= 2  # within one evaluation interval
    assert got["examples"] == got["step"] * 4
    # it trained under DeepSpeed: every step went through the engine, with the ZeRO stage
    # asked for and DeepSpeed's ZeRO optimizer around ours, in a world of one process
    assert (got["engine"], got["zero_stage"], got["optimizer"]) == ("DeepSpeedEngine", stage, zero_optimizer)
    assert got["engine_steps"] == got["trained_steps"] == got["step"]
    assert set(got["world_size"]) == {1}


def test_two_cpu_workers_agree_with_one_process(world, ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")  # Tune's result.json: what rank 0 reported
    space = {"dataset_size": 32, "learning_rate": 1e-4, "batch_size": 8}
    raw = sweep_dict(world, "two-workers", defences=("base",), max_steps=20, eval_every=2,
                     space=space, resources={"cpu": 0.5, "workers": 2})
    spec = S.from_dict(raw)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lines = []
    sweep.run(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"), echo=lines.append)
    (run,) = trial_runs(uri, "two-workers")
    assert run.data.tags["status"] == "failed", lines
    m = run.data.metrics

    torch.set_num_threads(1)
    one = run_attack(sweep.attack_config(S.from_dict({**raw, "resources": {"cpu": 1}}),
                                         {"defence": "base", **spec.attackers()[0]}))
    assert one.status == "failed"
    # The same attack, split over two processes: every step trains on the same global batch, and
    # every toy response has the same number of tokens, so the mean of the two ranks' token-mean
    # losses is the global batch's token-mean loss. The weights then differ from the single
    # process's only by float summation order (measured: train losses within 1e-7 relative), too
    # little to change a greedy answer: f is the same at every point, so is the budget.
    assert m["budget_to_failure_steps"] == one.budget_to_failure.step
    client = MlflowClient(uri)
    assert sorted((p.step, p.value) for p in client.get_metric_history(run.info.run_id, "harmfulness")) == \
        [(p.step, p.harmfulness) for p in one.points]
    # the loss every rank reports is the global batch's, whatever the number of ranks
    losses = sorted((p.step, p.value) for p in client.get_metric_history(run.info.run_id, "train_loss"))
    expected = [(p.step, p.train_loss) for p in one.points if p.step > 0]  # step 0 trained nothing: nan
    assert [s for s, _ in losses] == [s for s, _ in expected]
    assert [v for _, v in losses] == pytest.approx([v for _, v in expected], rel=1e-5)
    # budgets count the global batch, across both workers
    assert m["budget_to_failure_examples"] == m["budget_to_failure_steps"] * 8
    # one metric stream: one point per evaluation, not one per worker
    curve = client.get_metric_history(run.info.run_id, "harmfulness")
    assert [p.step for p in curve] == list(range(0, int(m["budget_to_failure_steps"]) + 1, 2))
    # two processes trained it: what Tune received from rank 0 (its result log) came from a
    # DeepSpeed world of two, and the single-process run is a world of one
    (log,) = (tmp_path / "ray").glob("two-workers/*/result.json")
    results = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in results] == [p.step for p in curve]
    assert {r["world_size"] for r in results} == {2} and {p.world_size for p in one.points} == {1}


@pytest.mark.filterwarnings("ignore:`get_trial_name` is meant to only be called inside")  # no Tune here
def test_a_trial_stopped_before_its_end_frees_its_workers(world, ray_local, tmp_path):
    """Tune stopping a multi-worker trial before its final result (pruned, or the sweep
    interrupted) raises SystemExit out of the trial's report: its worker group's placement group
    is removed then, so the workers, which would train on to their next evaluation and beyond,
    end with it at once instead of holding their CPUs after the trial (the sweep's local Ray has
    no dashboard, without which Ray Train never removes the group of a controller that died with
    its trial's process)."""
    import ray

    from orchestrator.sweep.loop import GROUP, attack_config, loop_config
    from orchestrator.sweep.train import train_workers

    # after step 0 the next evaluation is 5000 steps away: minutes of training
    raw = sweep_dict(world, "stopped", defences=("rescaled",), max_steps=5000, eval_every=5000,
                     space={"dataset_size": 32, "learning_rate": 1e-5, "batch_size": 8},
                     resources={"cpu": 0.5, "workers": 2})
    spec = S.from_dict(raw)
    (attacker,) = spec.attackers()
    loop = loop_config(spec, attack_config(spec, {"defence": "rescaled", **attacker}), "rescaled")

    def held() -> set[str]:
        return {k for k, v in ray.util.placement_group_table().items() if v["state"] == "CREATED"}

    def fitting() -> bool:
        return any(t.name == "trainer.fit" for t in threading.enumerate())

    before, seen = held(), []

    def report(result: dict) -> None:
        seen.append(result)
        raise SystemExit(0)  # what a Tune trial's report raises once Tune has stopped the trial

    with pytest.raises(SystemExit):
        train_workers(spec, loop, str(tmp_path), report)
    assert [r["step"] for r in seen] == [0] and GROUP not in seen[0]
    start = time.time()  # Ray Train notices dead workers within its 0.1 s health check
    while (held() - before or fitting()) and time.time() < start + 30:
        time.sleep(0.2)
    assert held() - before == set()  # nothing of the trial holds CPUs
    assert not fitting()  # and its fit() ended: its workers died with their group


def test_a_batch_that_does_not_split_over_the_workers_fails_before_ray(world, tmp_path, capsys):
    import yaml

    from orchestrator.cli import main

    raw = sweep_dict(world, "bad-split", space={"dataset_size": 32, "batch_size": {"grid": [8, 6]}},
                     resources={"cpu": 1, "workers": 2}, deepspeed={"gradient_accumulation_steps": 2})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("spec error: space.batch_size: 6 does not divide over 2 workers x 2 gradient-accumulation "
                   "steps; use multiples of 4")
    # refine under DeepSpeed, in a spec whose DeepSpeed config file exists: that alone is refused
    (tmp_path / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    raw = sweep_dict(world, "bad-refine", refine=2, deepspeed={"config": str(tmp_path / "zero2.json")})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spec error: ") and err.count("spec error") == 1, err
    assert "refine needs snapshots of the training state, which DeepSpeed" in err and "set refine: 0" in err, err
    # the same spec without refine validates: refine was the only problem
    raw["refine"] = 0
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0, capsys.readouterr().err
