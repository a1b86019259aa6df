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
