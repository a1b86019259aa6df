"""The attack side of attack-sweep: plain PyTorch, no Ray, no MLflow.

    from trainables import AttackConfig, run_attack
    result = run_attack(AttackConfig.model_validate(cfg_dict), on_eval=print)

The names below are imported on first use (PEP 562): `from trainables.config import Attacker`
must not pay for torch and transformers (trainables.attack), or every `attack-sweep` command
would, `--help` included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainables.lazy import exports

_HOMES = {
    "AttackResult": "trainables.attack",
    "run_attack": "trainables.attack",
    "Budget": "trainables.budget",
    "EvalPoint": "trainables.budget",
    "AttackConfig": "trainables.config",
    "Attacker": "trainables.config",
    "Stage": "trainables.config",
    "Status": "trainables.names",
}

__all__ = ["AttackConfig", "AttackResult", "Attacker", "Budget", "EvalPoint", "Stage", "Status", "run_attack"]

if TYPE_CHECKING:
    from trainables.attack import AttackResult, run_attack
    from trainables.budget import Budget, EvalPoint
    from trainables.config import AttackConfig, Attacker, Stage
    from trainables.names import Status


__getattr__, __dir__ = exports(__name__, _HOMES)
