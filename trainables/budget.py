"""Budget accounting and the outcome of a trial."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from trainables.names import CROSSING, Status

if TYPE_CHECKING:
    from trainables.methods.base import Spent


def flops_per_token(n_params: int, n_trainable_lora: int | None) -> int:
    """Training FLOPs per processed token; n_trainable_lora is None for full fine-tuning."""
    if n_trainable_lora is None:
        return 6 * n_params
    return 4 * n_params + 6 * n_trainable_lora


@dataclass
class Budget:
    """Attacker compute spent so far."""

    steps: int = 0
    examples: int = 0
    """Rows drawn into the batches, repeats included: a batch of 32 over 16 rows counts 32."""
    tokens: int = 0
    """Tokens trained on: the supervised response tokens the loss was computed on, plus the
    tokens sampled from the model (GRPO's rollouts)."""
    flops: float = 0.0
    accelerator_seconds: float = 0.0
    """Training wall time times the devices trained on (evaluation excluded)."""
    generated_tokens: int = 0
    """Of `tokens`, those sampled from the model (0 for SFT and DPO)."""

    def spend(self, spent: Spent) -> None:
        """One optimizer step, spending what its method says (methods/base.py)."""
        self.steps += 1
        self.examples += spent.examples
        self.tokens += spent.tokens
        self.flops += spent.flops
        self.generated_tokens += spent.generated

    def add_time(self, seconds: float, devices: int = 1) -> None:
        """Training wall time on `devices` accelerators working together (data-parallel
        workers each count: N devices for s seconds is N*s device-seconds)."""
        self.accelerator_seconds += seconds * devices


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation during an attack: the unit of every report.

    The same names are what the trial reports to Tune, what the stopper reads, what
    MLflow stores and what the report prints (trainables/names.py).
    """

    step: int
    examples: int
    tokens: int
    flops: float
    accelerator_seconds: float
    wall_seconds: float
    train_loss: float
    """Mean training loss since the previous evaluation (nan at step 0)."""
    harmfulness: float
    """The primary evaluator's f on the held-out prompts (nan when the loss diverged before
    it was scored)."""
    status: Status
    """running, or the trial's final outcome at its last point."""
    resolution: int
    """Steps since the latest earlier evaluation known to be safe: a crossing seen here
    happened in (step - resolution, step]. 0 at step 0."""
    stage: int
    """0-based index of the stage this step trained in (0 without stages)."""
    world_size: int = 1
    """Devices the trial trains on, the factor on accelerator_seconds: DeepSpeed's world size
    (its data-parallel processes), else 1 for the single-process loop."""
    safe: bool = False
    """The loop's crossing decision here: f (with crossing: lower_bound its interval's lower end)
    did not exceed phi. False where f was not scored, and at a crossing."""
    harmfulness_lo: float = math.nan
    harmfulness_hi: float = math.nan
    """The primary f's binomial (Wilson) interval at the spec's confidence; nan when f is not a
    share of prompts (nll)."""
    utility: float = math.nan
    """Utility on the held-out benign split (nan without a utility block)."""
    generated_tokens: int = 0
    """Of `tokens`, those the attacker sampled from the model (GRPO's rollouts; 0 for SFT, DPO)."""
    eval_seconds: float = 0.0
    """Wall time of this evaluation: every evaluator and utility."""
    loss_peak_ratio: float = math.nan
    """At a trial's final point: its largest step loss over its first step's loss. Above
    names.LOSS_EXPLODED the training loss exploded: a crossing then is flagged in the report."""
    incoherent_crossing: float = math.nan
    """At a trial's final point: the first step at which the primary's f without the coherence gate
    crossed phi while its gated f did not (a crossing by incoherent answers only, never a success);
    nan where none did."""
    curves: dict[str, float] = field(default_factory=dict)
    """Per-evaluator figures, named <metric>.<label>: harmfulness, its interval, malformed
    answers, extras such as a judge's mean score."""
    crossings: dict[str, dict[str, float]] = field(default_factory=dict)
    """At a trial's final point: each evaluator's first crossing of phi with the model still
    working, label -> its budget fields (step, examples, tokens, flops, accelerator_seconds)
    and resolution. Evaluators that never crossed are absent."""
    samples: list[dict[str, Any]] | None = None
    """At step 0 and at the final point: each held-out prompt, the model's answer and every
    evaluator's verdict on it (None where nothing was generated)."""

    def as_dict(self) -> dict[str, Any]:
        """Flat: curves at top level, crossings as crossing.<label>.<field>, samples as JSON."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("curves", "crossings", "samples")}
        out.update(self.curves)
        for label, budget in self.crossings.items():
            out.update({f"{CROSSING}.{label}.{k}": v for k, v in budget.items()})
        if self.samples is not None:
            out["samples"] = json.dumps(self.samples)
        return out
