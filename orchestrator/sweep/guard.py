"""The Tune callback that turns a Ctrl-C into the end of Tune's loop (Ray imported at the top:
only fit.py imports this)."""

from __future__ import annotations

from ray.tune import Callback

from orchestrator.sweep import signals


class InterruptGuard(Callback):
    """Turns signals.INTERRUPTED into Interrupted at the next step of Tune's loop (which fit()
    turns back into a KeyboardInterrupt), and keeps Tune's list of trials so that fit() can stop
    their actors after a Ctrl-C that reached it some other way."""

    trials: list = []

    def on_step_begin(self, iteration, trials, **info) -> None:
        self.trials = trials
        # by reference, through the module: Tune pickles its callbacks, and an Event cannot be
        if signals.INTERRUPTED.is_set():
            raise signals.Interrupted  # an Exception: Tune stops its trials' actors, then re-raises
