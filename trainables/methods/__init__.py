"""Attack methods, one module each: a method turns a batch into a loss and says what the budget
counts (methods/base.py). Adding one: a module here, its name in METHODS and in
attacker.Method, and its knobs on the Attacker."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainables.methods.base import Method, Rates, Spent
from trainables.methods.dpo import DPO
from trainables.methods.grpo import GRPO
from trainables.methods.sft import SFT

if TYPE_CHECKING:
    import torch

    from trainables.config import Attacker, Stage
    from trainables.evaluators import Evaluator

METHODS: dict[str, type] = {"sft": SFT, "dpo": DPO, "grpo": GRPO}

__all__ = ["METHODS", "Method", "Rates", "Spent", "build", "method_of"]


def method_of(stage: Stage, attacker: Attacker) -> str:
    """The method a stage trains with: the attacker's on the attack split, SFT on benign data."""
    return "sft" if stage.data == "benign" else attacker.method


def build(attacker: Attacker, stages: list[Stage], model: torch.nn.Module, rates: Rates,
          reward: Evaluator | None = None) -> list[Method]:
    """Each stage's method, one instance per method (a DPO reference copy is made once);
    `reward`: GRPO's reward evaluator."""
    made: dict[str, Method] = {}
    for stage in stages:
        name = method_of(stage, attacker)
        if name not in made:
            extra = {"reward": reward} if name == "grpo" else {}
            made[name] = METHODS[name](stage.resolved(attacker), model, rates, **extra)
    return [made[method_of(s, attacker)] for s in stages]
