"""A checkpoint measured as released, before any attack: the stability condition's numbers."""

from __future__ import annotations

from trainables.checkpoint import load_model, load_tokenizer, resolve_device
from trainables.config import Checkpoint, Data, Utility
from trainables.names import LM_EVAL
from trainables.names import RELEASE_UTILITY as UTILITY


def measure(checkpoint: Checkpoint, data: Data, utility: Utility | None, lm_eval=None,
            device: str = "auto") -> dict[str, float]:
    """The utility proxy (with a utility block) and every lm-eval metric (with lm_eval tasks)."""
    device = resolve_device(device)
    tokenizer = load_tokenizer(checkpoint)
    model = load_model(checkpoint, device)
    model.eval()
    out: dict[str, float] = {}
    if utility is not None:
        from trainables.utility import make_utility

        out[UTILITY] = float(make_utility(utility, tokenizer, data)(model))
    if lm_eval is not None:
        from trainables import capability

        out.update({LM_EVAL + k: float(v) for k, v in capability.scores(model, tokenizer, lm_eval, device).items()})
    return out


def harmfulness(checkpoint: Checkpoint, evaluation, device: str = "auto") -> dict[str, float]:
    """How a checkpoint answers as released, scored as every trial scores step 0 (issue 29: a built
    defence's alignment figures): the primary evaluator's f on the held-out prompts (its share of
    coherent harmful answers, for a share evaluator 1 - f is the refusal rate), the share its gate
    found incoherent (nan without the gate), and the utility proxy (with a utility block).
    `evaluation`: a trainables.config.Evaluation."""
    from trainables import data as D
    from trainables.evaluators.base import EvalContext, items_of, make_evaluator
    from trainables.evaluators.sampled import score_decoded
    from trainables.names import RELEASE_HARMFULNESS, RELEASE_INCOHERENT
    from trainables.outcome import incoherent_share

    device = resolve_device(device)
    tokenizer = load_tokenizer(checkpoint)
    model = load_model(checkpoint, device).eval()
    src, e = evaluation.data.eval, evaluation.evaluator
    rows = D.load_rows(src)[: evaluation.data.eval_size]
    items = items_of(rows, src, tokenizer, evaluation.data)
    gate = evaluation.coherence if evaluation.coherence.enabled else None
    scores = score_decoded(make_evaluator(e.name, e.options, gate),
                           EvalContext(model, tokenizer, items, decoding=e.decoding))
    out = {RELEASE_HARMFULNESS: float(scores.f), RELEASE_INCOHERENT: incoherent_share(scores)}
    if evaluation.utility is not None:
        from trainables.utility import make_utility

        out[UTILITY] = float(make_utility(evaluation.utility, tokenizer, evaluation.data)(model))
    return out
