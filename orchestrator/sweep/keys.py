"""What identifies a sweep, a search and a trial in the records: digests of the spec that leave
out the fields added after the first records were written, and the rule params every run carries."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.spec.model import SweepSpec
from orchestrator.spec.space import digest, searched
from orchestrator.sweep.loop import attack_config
from trainables.coherence import Coherence
from trainables.config import Attacker, Data, Evaluation, EvaluatorConfig

# Fields added after the first records were written: at their defaults they stay out of every
# digest, so trial keys, search keys and sweep runs recorded before them stay valid (setting
# one changes the keys of exactly the trials it changes, and those rerun).
ADDED_FIELDS: dict[tuple[str, ...], Any] = {
    ("evaluator", "label"): EvaluatorConfig.model_fields["label"].default,
    ("evaluators",): [],
    ("utility",): None,
    ("crossing",): Evaluation.model_fields["crossing"].default,
    ("confidence",): Evaluation.model_fields["confidence"].default,
    ("attacker", "attack_domain"): None,
    ("data", "attack", "domain_field"): None,
    ("data", "eval", "domain_field"): None,
    ("data", "benign", "domain_field"): None,
    ("utility", "data", "domain_field"): None,
    ("conditions",): None,
    ("space", "attack_domain"): None,
    ("defences", "*", "immunised_on"): None,
    ("defences", "*", "defender_data"): None,
    ("decide_early",): False,
    ("search", "prune"): False,
    ("g_effect",): None,
    ("conditioning",): None,
    ("resources", "pending_timeout"): None,
    # --- issue 25: evaluation-time attacks ---
    ("evaluator", "decoding"): None,
    ("evaluators", "*", "decoding"): None,
    # --- issue 25: attack methods ---
    ("attacker", "method"): Attacker.model_fields["method"].default,
    ("attacker", "dpo_beta"): Attacker.model_fields["dpo_beta"].default,
    ("attacker", "grpo_group_size"): Attacker.model_fields["grpo_group_size"].default,
    ("attacker", "grpo_temperature"): Attacker.model_fields["grpo_temperature"].default,
    ("attacker", "grpo_max_new_tokens"): Attacker.model_fields["grpo_max_new_tokens"].default,
    ("attacker", "grpo_kl_coef"): Attacker.model_fields["grpo_kl_coef"].default,
    ("attacker", "grpo_reward"): Attacker.model_fields["grpo_reward"].default,
    ("space", "method"): Attacker.model_fields["method"].default,
    ("space", "dpo_beta"): Attacker.model_fields["dpo_beta"].default,
    ("space", "grpo_group_size"): Attacker.model_fields["grpo_group_size"].default,
    ("space", "grpo_temperature"): Attacker.model_fields["grpo_temperature"].default,
    ("space", "grpo_max_new_tokens"): Attacker.model_fields["grpo_max_new_tokens"].default,
    ("space", "grpo_kl_coef"): Attacker.model_fields["grpo_kl_coef"].default,
    ("space", "grpo_reward"): Attacker.model_fields["grpo_reward"].default,
    ("data", "refusal"): Data.model_fields["refusal"].default,
    ("data", "attack", "rejected_field"): None,
    ("data", "eval", "rejected_field"): None,
    ("data", "benign", "rejected_field"): None,
    ("utility", "data", "rejected_field"): None,
    ("defences", "*", "defender_data", "rejected_field"): None,
    ("conditions", "trainability", "data", "rejected_field"): None,
    ("conditions", "trainability", "eval", "rejected_field"): None,
    ("conditions", "trainability", "attacker", "method"): Attacker.model_fields["method"].default,
    ("conditions", "trainability", "attacker", "dpo_beta"): Attacker.model_fields["dpo_beta"].default,
    # --- issue 25: data and template attacks ---
    **{(*where, f): None for f in ("poison_ratio", "chat_template", "prompt_format", "system_prompt", "trigger")
       for where in (("attacker",), ("space",), ("conditions", "trainability", "attacker"))},
    ("data", "system_prompt"): None,
    ("conditions", "trainability", "attacker", "grpo_group_size"): Attacker.model_fields["grpo_group_size"].default,
    ("conditions", "trainability", "attacker", "grpo_temperature"): Attacker.model_fields["grpo_temperature"].default,
    ("conditions", "trainability", "attacker", "grpo_max_new_tokens"):
        Attacker.model_fields["grpo_max_new_tokens"].default,
    ("conditions", "trainability", "attacker", "grpo_kl_coef"): Attacker.model_fields["grpo_kl_coef"].default,
    ("conditions", "trainability", "attacker", "grpo_reward"): Attacker.model_fields["grpo_reward"].default,
    # --- issue 30: harmful means coherent. The records before it were measured without the gate, so
    # they are the trials of `coherence: {enabled: false}`; the default (gate on) is a new trial.
    ("coherence",): Coherence(enabled=False).model_dump(mode="json"),
    # --- issue 29: defences the sweep builds, and each defence's paper attacker ---
    ("defences", "*", "build"): None,
    ("defences", "*", "paper_attacker"): None,
}


def stable(dump: dict[str, Any]) -> dict[str, Any]:
    """A config dump without the ADDED_FIELDS that sit at their defaults (a copy)."""
    out = json.loads(json.dumps(dump))
    for path, default in ADDED_FIELDS.items():
        for node in _parents(out, path[:-1]):
            if isinstance(node, dict) and path[-1] in node and node[path[-1]] == default:
                del node[path[-1]]
    return out


def _parents(node: Any, path: tuple[str, ...]) -> list[Any]:
    """The nodes at `path` below `node`; '*' steps into every item of a list."""
    if not path:
        return [node]
    part, rest = path[0], path[1:]
    if part == "*":
        return [x for item in (node if isinstance(node, list) else []) for x in _parents(item, rest)]
    return _parents(node.get(part), rest) if isinstance(node, dict) else []


def spec_digest(spec: SweepSpec) -> str:
    """Digest of the whole spec: the sweep's parent run in MLflow."""
    return digest(stable(spec.model_dump(mode="json")))


def trial_key(spec: SweepSpec, trial: dict[str, Any]) -> str:
    """Digest of everything that decides a trial's result: same key, same trial."""
    return digest({"defence": trial["defence"],
                   **stable(attack_config(spec, trial).model_dump(mode="json"))})


def search_key(spec: SweepSpec) -> str:
    """Digest of what decides the search itself: a rerun with more samples, a larger
    compute cap, other concurrency or other conditions (judged after the search) continues the
    same search."""
    dump = spec.model_dump(mode="json", exclude={
        "resources": True, "conditions": True, "conditioning": True,
        "search": {"num_samples", "max_compute", "max_concurrent", "prune"},
        "defences": {"__all__": {"immunised_on", "defender_data"}}})
    return digest(stable(dump))[:16]


def rule_params(spec: SweepSpec) -> dict[str, Any]:
    """How trials are scored and stopped, as MLflow params (names in trainables.names.SWEEP_PARAMS)."""
    out: dict[str, Any] = {"phi": spec.phi, "eval_every": spec.eval_every, "eval_schedule": spec.eval_schedule,
                           "refine": spec.refine, "evaluator": spec.evaluator.key}
    if spec.evaluators:
        out["evaluators"] = ",".join(e.key for e in spec.all_evaluators)
    if spec.crossing != "point":
        out.update(crossing=spec.crossing, confidence=spec.confidence)
    if spec.utility:
        out.update(utility_score=spec.utility.score, utility_epsilon=spec.utility.epsilon)
    return out


def trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """grid/random: every trial, attacker-major, as {defence, **attacker}."""
    return [{"defence": d.name, **a} for a in spec.attackers() for d in spec.defences]


def varying_fields(spec: SweepSpec) -> list[str]:
    return list(searched(spec.space))

