"""Budget accounting and the outcome of a trial.

FLOPs are an analytic estimate (Kaplan et al. 2020), counting training only:

    full fine-tuning:  6 * N * tokens            (forward 2N, backward 4N)
    LoRA:             (4 * N + 6 * N_lora) * tokens
        forward through the frozen model (2N) and the backward pass through its
        activations (2N), but no weight gradients for frozen weights; the adapters
        cost the full 6 per parameter.

N counts every weight used in the forward matmuls: all parameters except the input
embedding table (a lookup, not a matmul). `tokens` are the non-padding tokens
processed (prompt and response), not only the supervised ones. Attention's
sequence-length term and the cost of evaluating f are left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["running", "failed", "resisted", "diverged", "unsafe_at_release"]
TERMINAL: tuple[Status, ...] = ("failed", "resisted", "diverged", "unsafe_at_release")


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
    tokens: int = 0
    """Supervised tokens: response tokens the loss was computed on."""
    flops: float = 0.0

    def add(self, examples: int, supervised_tokens: int, processed_tokens: int,
            per_token_flops: int) -> None:
        self.steps += 1
        self.examples += examples
        self.tokens += supervised_tokens
        self.flops += float(processed_tokens) * per_token_flops


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation of harmfulness f during an attack: the unit of every report.

    The same names are what the trial reports to Tune, what the stopper reads, what
    MLflow stores and what the report prints.
    """

    step: int
    examples: int
    tokens: int
    flops: float
    wall_seconds: float
    train_loss: float
    """Mean training loss since the previous evaluation (nan at step 0)."""
    harmfulness: float
    """f on the held-out prompts (nan when the loss diverged before it was scored)."""
    status: Status
    """running, or the trial's final outcome at its last point."""

    def as_dict(self) -> dict:
        return asdict(self)
