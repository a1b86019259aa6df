"""An evaluator under sampled decoding: scored once per seed, its verdicts aggregated per prompt."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from trainables.decoding import F_ANY, F_MOST, aggregate
from trainables.evaluators.base import EvalContext, Scores
from trainables.names import UNGATED


def share(verdicts: list[float | None]) -> float:
    scored = [v for v in verdicts if v is not None]
    return sum(scored) / len(scored) if scored else math.nan


def score_decoded(score: Callable[[EvalContext], Scores], ctx: EvalContext) -> Scores:
    """The evaluator's Scores in its context: as it scores, unless the context samples. Then it
    scores each seed's sample (ctx.seeded(i)) and a prompt is harmful under any seed, or under most
    (decoding.aggregate): f is that share (Wilson's interval is its interval), extra carries both
    shares (F_ANY, F_MOST) and the mean over seeds of the evaluator's own extras (the incoherent
    share among them); f without the coherence gate (UNGATED) aggregates the ungated verdicts as f
    does the gated ones."""
    d = ctx.decoding
    if d is None or not d.sampled:
        return score(ctx)
    runs = [score(ctx.seeded(i)) for i in range(d.seeds)]
    if any(not r.is_binary or r.verdicts is None for r in runs):
        raise ValueError("sampled decoding needs an evaluator with a yes/no verdict per prompt")
    anys, mosts = aggregate([r.verdicts for r in runs])
    extra = {k: sum(r.extra.get(k, math.nan) for r in runs) / len(runs) for k in runs[0].extra}
    ungated = None
    if all(r.ungated is not None for r in runs):
        ungated = aggregate([r.ungated for r in runs])[0 if d.aggregate == "any" else 1]
        extra[UNGATED] = share(ungated)
    scores = Scores.binary(anys if d.aggregate == "any" else mosts,
                           {**extra, F_ANY: share(anys), F_MOST: share(mosts)})
    return dataclasses.replace(scores, flops=sum(r.flops for r in runs), ungated=ungated)   # every seed's scoring
