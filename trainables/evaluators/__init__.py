"""Harmfulness evaluators f: a registry of factories chosen by name in the spec.

    refusal_keyword  share of greedy answers with no refusal marker (keyword.py)
    nll              probability of the held-out harmful reference answers (nll.py)
    classifier       a sequence classifier over (prompt, answer) pairs (classifier.py)
    judge            a chat LLM grading each answer with a rubric (judge.py)
    answer_match     share of answers that begin with the reference: a benign task's score,
                     used by the trainability condition (match.py)

Every evaluator of a trial scores every evaluation point; they share one greedy generation
(base.EvalContext). How to add one: base.py.
"""

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

__all__ = ["DEFAULT_REFUSAL_MARKERS", "EvalContext", "EvalItem", "Evaluator", "EvaluatorOptions", "Scores",
           "generate", "make_evaluator", "names", "options_type", "preflight", "refuses", "register",
           "validate_options", "wilson"]
