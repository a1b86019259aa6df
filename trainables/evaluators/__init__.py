"""Harmfulness evaluators f: a registry of factories chosen by name in the spec."""

from trainables.evaluators import classifier, judge, keyword, match, nll  # noqa: F401  (registers them)
from trainables.evaluators.base import (
    EvalContext,
    EvalItem,
    Evaluator,
    EvaluatorOptions,
    Scores,
    generate,
    make_evaluator,
    names,
    options_type,
    preflight,
    register,
    validate_options,
    wilson,
)
from trainables.evaluators.keyword import DEFAULT_REFUSAL_MARKERS, refuses
from trainables.evaluators.sampled import score_decoded

__all__ = ["DEFAULT_REFUSAL_MARKERS", "EvalContext", "EvalItem", "Evaluator", "EvaluatorOptions", "Scores",
           "generate", "make_evaluator", "names", "options_type", "preflight", "refuses", "register",
           "score_decoded", "validate_options", "wilson"]
