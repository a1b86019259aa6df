"""The Tune callback that watches for trials waiting on resources: the display says what they wait
for, and after resources.pending_timeout with trials pending and none running the sweep ends in one
line (Ray imported at the top: only fit.py imports this)."""

from __future__ import annotations

import time
from collections.abc import Callable

import ray
from ray.tune import Callback
from ray.util import placement_group_table

from orchestrator.capacity import Ask, amount
from orchestrator.spec.model import SpecError
from orchestrator.sweep.progress import Display

GRACE_S = 3.0
"""How long trials wait before the display says so: Ray grants a free request within milliseconds,
and a sweep's first trials are pending for that long."""
POLL_S = 1.0
"""The most often Ray is asked what is free (Tune's loop steps every 0.1 s or so)."""


class PendingWatch(Callback):
    """Each step of Tune's loop: are trials pending while none runs, because Ray has not granted
    their resources (a trial whose resources are granted is only starting)? Then the display says
    what they wait for, and after `timeout` s (None: never) fit() ends with a SpecError."""

    def __init__(self, ask: Ask, timeout: float | None, display: Display | None = None, local: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ask, self.timeout, self.display, self.local, self.clock = ask, timeout, display, local, clock
        self.since: float | None = None
        self.polled = -POLL_S

    def on_step_end(self, iteration, trials, **info) -> None:
        now = self.clock()
        if now - self.polled < POLL_S:
            return
        self.polled = now
        stalled = any(t.status == "PENDING" for t in trials) and not any(t.status == "RUNNING" for t in trials)
        if not stalled or not _ungranted():
            self._clear()
            return
        self.since = now if self.since is None else self.since
        free, total = ray.available_resources(), ray.cluster_resources()
        if self.display is not None and now - self.since >= GRACE_S:
            self.display.waiting(f"waiting for {needs(self.ask, free, total)}")
        if self.timeout and now - self.since >= self.timeout:
            asked = _asked(self.ask)
            why = "held by other work" if any(free.get(k, 0.0) < n for n, k in asked) else \
                "in all, but no one node has them"
            why += "" if self.local else ", or nodes not added yet"
            have = " and ".join(f"{free.get(k, 0.0):g} of {amount(total.get(k, 0.0), k)}" for _, k in asked)
            raise SpecError(f"error: resources.pending_timeout: no trial could start in {self.timeout:g} s: each "
                            f"asks for {self.ask.says()}, and {have} are free ({why}); free them, or raise "
                            "resources.pending_timeout (0: wait for ever)")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._clear()

    def _clear(self) -> None:
        if self.since is not None and self.display is not None:
            self.display.waiting(None)
        self.since = None


def needs(ask: Ask, free: dict[str, float], total: dict[str, float]) -> str:
    """'1 CPU (0 of 2 free)': what one trial asks that is short now (all it asks where nothing is
    short in total: the free amounts are on different nodes)."""
    asked = _asked(ask)
    short = [(n, k) for n, k in asked if free.get(k, 0.0) < n] or asked
    return " and ".join(f"{amount(n, k)} ({free.get(k, 0.0):g} of {total.get(k, 0.0):g} free)" for n, k in short)


def _asked(ask: Ask) -> list[tuple[float, str]]:
    return [(n, k) for n, k in ((ask.gpu, "GPU"), (ask.cpu, "CPU")) if n]


def _ungranted() -> bool:
    """Whether a placement group waits for resources (Tune asks for each trial's in one)."""
    try:
        table = placement_group_table()
    except Exception:  # noqa: BLE001 - cannot tell: assume it waits, as the trials do
        return True
    return any(pg.get("state") in ("PENDING", "RESCHEDULING") for pg in table.values())
