"""What every evaluator shares: the registry, the items it scores, the context it scores them
in (one greedy generation shared by every evaluator of an evaluation point), and its result.

An evaluator is a factory registered by name that returns `score(ctx) -> Scores` (a bare
float is accepted as f without per-prompt verdicts):

    class MyOptions(EvaluatorOptions):
        threshold: float = 0.5

    @register("my_scorer", MyOptions)
    def my_scorer(options: MyOptions) -> Evaluator:
        def score(ctx: EvalContext) -> Scores:
            responses = ctx.responses(max_new_tokens=64)      # generated once, shared
            verdicts = [float(looks_harmful(r)) for r in responses]
            return Scores.binary(verdicts)
        return score
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class EvalItem:
    prompt: str
    """The held-out prompt, already wrapped (chat template or prompt_format)."""
    response: str | None
    """Reference response, when the split has one."""
    raw_prompt: str = ""
    """The prompt as the data holds it (what judges and classifiers read)."""


@dataclass(frozen=True)
class Scores:
    """One evaluator's result at one evaluation point."""

    f: float
    """Harmfulness in [0, 1] (the share of harmful verdicts for a binary evaluator)."""
    verdicts: list[float | None] | None = None
    """Per item: 1.0 harmful / 0.0 not (binary evaluators), or the item's own score; None
    where the item could not be scored (e.g. a judge answer that could not be parsed)."""
    is_binary: bool = False
    """f is a share of yes/no verdicts, so a binomial interval applies."""
    malformed: int = 0
    """Items left unscored (counted, reported, never silently 0)."""
    extra: dict[str, float] = field(default_factory=dict)
    """Further per-point figures worth a curve (e.g. a judge's mean rubric score)."""

    @classmethod
    def binary(cls, verdicts: list[bool | float | None], extra: dict[str, float] | None = None) -> Scores:
        """f = share of harmful verdicts among the items that could be scored."""
        scored = [float(v) for v in verdicts if v is not None]
        f = sum(scored) / len(scored) if scored else math.nan
        return cls(f, [None if v is None else float(v) for v in verdicts], True,
                   len(verdicts) - len(scored), extra or {})

    @property
    def n(self) -> int:
        """Items that were scored."""
        return 0 if self.verdicts is None else sum(v is not None for v in self.verdicts)

    def interval(self, level: float) -> tuple[float, float]:
        """Wilson score interval of f (nan, nan when f is not a binomial share)."""
        if not self.is_binary or not self.n:
            return math.nan, math.nan
        return wilson(round(self.f * self.n), self.n, level)


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials: unlike the normal (Wald) interval
    it stays inside [0, 1] and is not degenerate at k = 0 or k = n, the usual case here."""
    if n <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


class EvalContext:
    """The model under attack and the items of one evaluation point. `responses` generates
    once and shares the text between every evaluator asking for it."""

    def __init__(self, model, tokenizer, items: list[EvalItem], synced_generation: bool = False):
        self.model, self.tokenizer, self.items = model, tokenizer, items
        self.synced_generation = synced_generation
        self._ids: list[list[int]] | None = None
        self._length = 0

    def responses(self, max_new_tokens: int, batch_size: int = 16) -> list[str]:
        """Greedy responses of the model to every item's prompt. Generated once at the
        longest length asked so far: greedy text of n tokens is the first n tokens of the
        text of more, so shorter requests read a prefix of the same tokens."""
        if self._ids is None or max_new_tokens > self._length:
            self._ids = generate_ids(self.model, self.tokenizer, [it.prompt for it in self.items],
                                     max_new_tokens, batch_size, self.synced_generation)
            self._length = max_new_tokens
        return self.tokenizer.batch_decode([ids[:max_new_tokens] for ids in self._ids],
                                           skip_special_tokens=True)

    @property
    def generated(self) -> list[str] | None:
        """The longest responses generated at this point (None if no evaluator generated)."""
        return None if self._ids is None else self.responses(self._length)


Evaluator = Callable[[EvalContext], "Scores | float"]


class EvaluatorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_REGISTRY: dict[str, tuple[Callable[[Any], Evaluator], type[EvaluatorOptions]]] = {}
_PREFLIGHT: dict[str, Callable[[Any], None]] = {}


def register(name: str, options: type[EvaluatorOptions] = EvaluatorOptions,
             preflight: Callable[[Any], None] | None = None):
    """Register an evaluator factory. `preflight(options)` raises ValueError (one line) for
    what can be checked before any trial starts: an unreachable endpoint, a missing model."""

    def wrap(factory: Callable[[Any], Evaluator]) -> Callable[[Any], Evaluator]:
        _REGISTRY[name] = (factory, options)
        if preflight is not None:
            _PREFLIGHT[name] = preflight
        return factory

    return wrap


def names() -> list[str]:
    return sorted(_REGISTRY)


def options_type(name: str) -> type[EvaluatorOptions]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown evaluator {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name][1]


def validate_options(name: str, options: dict[str, Any]) -> EvaluatorOptions:
    """Typed options of a named evaluator; unknown names list the known ones."""
    return options_type(name).model_validate(options)


def preflight(name: str, options: dict[str, Any]) -> None:
    """The evaluator's own checks before any trial starts (ValueError, one line)."""
    if name in _PREFLIGHT:
        _PREFLIGHT[name](validate_options(name, options))


def make_evaluator(name: str, options: dict[str, Any]) -> Callable[[EvalContext], Scores]:
    """The evaluator, its result always a Scores (a bare float becomes one)."""
    score = _REGISTRY[name][0](validate_options(name, options))

    def scored(ctx: EvalContext) -> Scores:
        out = score(ctx)
        return out if isinstance(out, Scores) else Scores(float(out))

    return scored


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             synced_gpus: bool = False) -> list[str]:
    """Batched greedy generation with left padding; returns only the new text."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, synced_gpus)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                 synced_gpus: bool = False) -> list[list[int]]:
    """Batched greedy generation with left padding: the new tokens of each prompt.
    `synced_gpus`: a ZeRO-3 trial's ranks generate together, as partitioned weights need."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[list[int]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus)
            out += gen[:, enc["input_ids"].shape[1]:].tolist()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
