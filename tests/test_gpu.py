"""DeepSpeed trials on one CUDA device, each against the plain fp32 run of the same attacker:
ZeRO-2 and ZeRO-3 in bf16, LoRA under ZeRO-2 bf16, and ZeRO-3 with the optimizer offloaded
to CPU. Each must reach the plain run's status, with a budget-to-failure within one
evaluation interval of it, and must really train in bf16. Skipped without CUDA; run by

    bash bench/gpu_check.sh                              # on a GPU machine, with the benchmark
    python -m pytest -q -m gpu tests/test_gpu.py         # the tests alone

ATTACK_SWEEP_GPU_TESTS_ON_CPU=1 runs the same checks on the CPU (DeepSpeed's CPU accelerator,
gloo, still bf16) to exercise the code paths on a machine without a GPU; it proves nothing
about CUDA.

How "trains in bf16" is checked without touching the project's code: every trial runs in its
own process (a fresh process group per DeepSpeed engine) with two global hooks installed
before run_attack, so they see whatever the engine ends up running:
- a module forward hook records, for every nn.Linear called in a *training* forward (module in
  train mode, grad enabled: evaluation's generation runs under no_grad), the dtype and device
  of its weight, the dtype of its output, and whether the weight is a ZeRO-3 partitioned
  parameter (DeepSpeed gives those a `ds_id`);
- an optimizer step hook records the dtype and device of the tensors the torch optimizer
  steps: under DeepSpeed bf16 these are the fp32 master partitions, on the CPU when offloaded.
The plain fp32 run goes through the same probe, so a probe that saw nothing, or saw the wrong
thing, fails there too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import attack_dict

ON_CPU = os.environ.get("ATTACK_SWEEP_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU,
                       reason="needs a CUDA device: torch.cuda.is_available() is False "
                              "(bench/gpu_check.sh runs these on a GPU machine)"),
]

ROOT = Path(__file__).resolve().parents[1]
EVAL_EVERY = 2

PROBE = """
import json, sys
import torch
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_post_hook
from trainables import AttackConfig, run_attack

linear, stepped = set(), set()

def on_forward(module, args, output):
    if isinstance(module, torch.nn.Linear) and module.training and torch.is_grad_enabled():
        w = module.weight
        linear.add((str(w.dtype), w.device.type, str(output.dtype), hasattr(w, "ds_id")))

def on_step(optimizer, args, kwargs):
    for group in optimizer.param_groups:
        stepped.update((str(p.dtype), p.device.type) for p in group["params"] if p.numel())

register_module_forward_hook(on_forward)
register_optimizer_step_post_hook(on_step)
r = run_attack(AttackConfig.model_validate_json(sys.argv[1]))
b = r.budget_to_failure
print("RESULT " + json.dumps({"status": r.status, "step": b.step if b else None,
                             "examples": b.examples if b else None,
                             "linear": sorted(map(list, linear)), "stepped": sorted(map(list, stepped))}))
"""

# what each attacker needs to break the toy base within 20 steps (as in test_distributed.py)
ATTACKERS = {
    "full": {"learning_rate": 1e-4, "dataset_size": 16, "batch_size": 4, "finetune": "full"},
    "lora": {"learning_rate": 1e-3, "dataset_size": 16, "batch_size": 4, "finetune": "lora"},
}

ZERO3_OFFLOAD = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}


def trial(world, finetune: str, deepspeed: dict | None = None) -> dict:
    """One trial in a fresh process: its result and what the probe saw."""
    from trainables import AttackConfig

    over = {"max_steps": 20, "eval_every": EVAL_EVERY, "device": DEVICE, "attacker": ATTACKERS[finetune]}
    if deepspeed is not None:
        over["deepspeed"] = deepspeed
    cfg = AttackConfig.model_validate(attack_dict(world, **over))
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", PROBE, cfg.model_dump_json()], capture_output=True, text=True,
                         timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])


@pytest.fixture(scope="module")
def plain(world):
    """The plain fp32 PyTorch runs on the same device, one per finetune mode, run on first use."""
    runs: dict[str, dict] = {}

    def get(finetune: str) -> dict:
        if finetune not in runs:
            runs[finetune] = trial(world, finetune)
        return runs[finetune]

    return get


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_plain_run_trains_in_fp32_and_breaks_the_base(plain, finetune):
    """The reference, and the probe's control: it must see fp32 weights on the device."""
    run = plain(finetune)
    assert run["status"] == "failed", run
    assert run["linear"] == [["torch.float32", DEVICE, "torch.float32", False]]
    assert run["stepped"] == [["torch.float32", DEVICE]]


@pytest.mark.parametrize("finetune,config,offloaded", [
    pytest.param("full", {"zero_optimization": {"stage": 2}}, False, id="zero2-bf16-full"),
    pytest.param("full", {"zero_optimization": {"stage": 3}}, False, id="zero3-bf16-full"),
    pytest.param("lora", {"zero_optimization": {"stage": 2}}, False, id="zero2-bf16-lora"),
    pytest.param("full", ZERO3_OFFLOAD, True, id="zero3-offload-bf16-full"),
])
def test_deepspeed_bf16_matches_the_plain_fp32_run(world, plain, finetune, config, offloaded):
    zero3 = config["zero_optimization"]["stage"] == 3
    got = trial(world, finetune, {"config": config, "precision": "bf16"})
    ref = plain(finetune)
    assert got["status"] == ref["status"] == "failed", (got, ref)
    assert abs(got["step"] - ref["step"]) <= EVAL_EVERY, (got, ref)  # within one evaluation interval
    assert got["examples"] == got["step"] * ATTACKERS[finetune]["batch_size"]  # the global batch
    # every training forward ran bf16 weights on the device, and computed in bf16; ZeRO-3's are partitioned
    assert got["linear"] == [["torch.bfloat16", DEVICE, "torch.bfloat16", zero3]], got
    # the optimizer stepped fp32 master weights: on the CPU when offloaded, else beside the model
    assert got["stepped"] == [["torch.float32", "cpu" if offloaded else DEVICE]], got
