"""The attack side of attack-sweep: plain PyTorch, no Ray, no MLflow.

    from trainables import AttackConfig, run_attack
    result = run_attack(AttackConfig.model_validate(cfg_dict), on_eval=print)
"""

from trainables.attack import AttackResult, run_attack
from trainables.budget import Budget, EvalPoint
from trainables.config import AttackConfig, Attacker, Stage
from trainables.names import Status

__all__ = ["AttackConfig", "AttackResult", "Attacker", "Budget", "EvalPoint", "Stage", "Status", "run_attack"]
