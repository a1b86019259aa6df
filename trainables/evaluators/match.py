"""answer_match: f = share of held-out prompts whose greedy answer begins with the split's
reference answer (case- and whitespace-insensitive). Not a harmfulness score: it scores a
benign task, where "f > phi" reads "the model has learned the task" (the trainability
condition's score target, orchestrator/conditions)."""

from __future__ import annotations

from pydantic import Field

from trainables.evaluators.base import EvalContext, Evaluator, EvaluatorOptions, Scores, register


class AnswerMatchOptions(EvaluatorOptions):
    max_new_tokens: int = Field(32, gt=0)
    """Tokens of each answer (greedy unless the evaluator's decoding samples): enough to hold the
    longest reference answer."""
    batch_size: int = Field(16, gt=0)
    """Prompts generated together."""


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def matches(answer: str, reference: str) -> bool:
    """The answer begins with the reference (both lower-cased, whitespace collapsed)."""
    ref = _norm(reference)
    return bool(ref) and _norm(answer).startswith(ref)


@register("answer_match", AnswerMatchOptions)
def answer_match(options: AnswerMatchOptions) -> Evaluator:
    def score(ctx: EvalContext) -> Scores:
        if any(it.response is None for it in ctx.items):
            raise ValueError("answer_match needs a reference response in every held-out row")
        responses = ctx.responses(options.max_new_tokens, options.batch_size)
        return Scores.binary([matches(r, it.response) for r, it in zip(responses, ctx.items, strict=True)])

    return score
