"""What a sweep is doing while it runs: one display for the whole sweep, fed by a Tune callback."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.echo import amount, say
from orchestrator.sweep.adversary import Progress

Mode = Literal["live", "plain"]
HEARTBEAT_S = 60.0
"""Plain mode: the most often one running trial gets a heartbeat line (a 10-minute trial gets ten)."""
REFRESH_PER_S = 4
WIDTH = 100
"""Plain lines are cut to this many characters (the label gives way), as is the live table."""


@dataclass
class Running:
    """A trial in flight, as the driver last heard of it."""

    defence: str
    label: str
    horizon: int | None
    started: float
    step: int | None = None
    top: int = 0
    """The furthest step evaluated: a step below it is a refinement replay."""
    f: float | None = None
    last_line: float = 0.0
    fresh: bool = False
    """An evaluation arrived since the last heartbeat line."""


@dataclass
class DefenceTally:
    """One defence's line in the display: its trials done of total and its search's progress."""

    name: str
    done: int = 0
    total: int = 0
    progress: Progress | None = None
    state: Literal["waiting", "running", "ended"] = "waiting"


@dataclass
class Display:
    """The sweep's progress, in a terminal or as plain lines. `echo` prints the sweep's lines."""

    defences: Sequence[str]
    per_defence: int
    unit: str
    echo_to: Callable[[str], None] = say
    title: str = ""
    mode: Mode | None = None
    """live or plain; None: ATTACK_SWEEP_PROGRESS, else live when stdout is a terminal."""
    heartbeat_s: float | None = None
    """None: ATTACK_SWEEP_HEARTBEAT_S, else HEARTBEAT_S."""
    clock: Callable[[], float] = time.monotonic
    console: Any = None
    """A rich Console for live mode (default: one on stdout, made at start)."""
    rows: dict[str, DefenceTally] = field(init=False)
    running: dict[str, Running] = field(init=False, default_factory=dict)
    durations: list[float] = field(init=False, default_factory=list)
    peak: int = field(init=False, default=0)
    started: float | None = field(init=False, default=None)
    waiting_for: str | None = field(init=False, default=None)
    """What pending trials wait for ('waiting for 1 CPU (0 of 2 free)'), while none runs."""
    waited: float = field(init=False, default=0.0)
    """Plain mode: when the waiting line was last printed."""

    def __post_init__(self) -> None:
        self.rows = {d: DefenceTally(d, 0, self.per_defence) for d in self.defences}
        if self.mode is None:
            forced = os.environ.get("ATTACK_SWEEP_PROGRESS", "").strip().lower() or "auto"
            if forced not in ("auto", "live", "plain"):
                raise ValueError(f"ATTACK_SWEEP_PROGRESS={forced!r}: takes auto, live or plain")
            self.mode = forced if forced != "auto" else "live" if _isatty() else "plain"
        if self.heartbeat_s is None:
            raw = os.environ.get("ATTACK_SWEEP_HEARTBEAT_S", "").strip()
            try:
                self.heartbeat_s = float(raw) if raw else HEARTBEAT_S
            except ValueError:
                raise ValueError(f"ATTACK_SWEEP_HEARTBEAT_S={raw!r}: takes a number of seconds") from None
        self._lock = threading.RLock()
        self._live = None

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_live", "console", "clock")}
        return {**state, "clock": time.monotonic, "console": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock, self._live = threading.RLock(), None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> Display:
        self.started = self.clock()
        if self.mode == "live" and self._live is None:
            from rich.console import Console
            from rich.live import Live

            self.console = self.console or Console()
            self._live = Live(get_renderable=self.render, console=self.console, refresh_per_second=REFRESH_PER_S,
                              transient=True, redirect_stdout=True, redirect_stderr=True)
            self._live.start()
        return self

    def stop(self) -> None:
        """End the live region (the terminal is left as plain lines); safe to call twice, never raises."""
        live, self._live = self._live, None
        if live is not None:
            with contextlib.suppress(Exception):  # a broken terminal must not hide the sweep's own outcome
                live.stop()

    def __enter__(self) -> Display:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def echo(self, line: str) -> None:
        """One of the sweep's lines: above the live region, or to `echo_to`."""
        if self._live is not None and self.echo_to is say:
            from rich.text import Text

            self._live.console.print(Text(line), soft_wrap=True)
        else:  # live with another echo: what it prints lands above the region (redirect_stdout)
            self.echo_to(line)

    # --- what the sweep and Tune tell it ----------------------------------------------------

    def begin(self, defence: str, progress: Progress, done: int, pending: int) -> None:
        """A defence's search starts: `done` trials already recorded, `pending` to run. The
        defences' searches run side by side: every defence begun stays running until end()."""
        with self._lock:
            row = self.rows.setdefault(defence, DefenceTally(defence))
            row.done, row.total, row.progress, row.state = done, done + pending, progress, "running"

    def end(self, defence: str | None = None) -> None:
        """The searches are done (each may have run fewer than its pending trials: a compute cap
        ended it), or only `defence`'s."""
        with self._lock:
            for row in self.rows.values():
                if row.state == "running" and defence in (None, row.name):
                    self._end(row)

    def _end(self, row: DefenceTally) -> None:
        row.state = "ended"
        row.total = row.done

    def trial_started(self, trial_id: str, defence: str, label: str, horizon: int | None) -> None:
        with self._lock:
            now = self.clock()
            self.running[trial_id] = Running(defence, label, horizon, now, last_line=now)
            self.peak = max(self.peak, len(self.running))

    def trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        with self._lock:
            trial = self.running.get(trial_id)
            if trial is None or result.get("status") == "error" or "step" not in result:
                return
            trial.step = int(result["step"])
            trial.top = max(trial.top, trial.step)
            f = result.get("harmfulness")
            trial.f = float(f) if isinstance(f, (int, float)) else None
            trial.fresh = True
        self.tick()

    def trial_finished(self, trial_id: str, error: bool = False) -> None:
        """A trial ended (recorded): counted done; its duration feeds the ETA unless it crashed."""
        with self._lock:
            trial = self.running.pop(trial_id, None)
            if trial is None:
                return
            if not error:
                self.durations.append(self.clock() - trial.started)
            row = self.rows.get(trial.defence)
            if row is not None:
                row.done += 1
                row.total = max(row.total, row.done)

    def trial_lost(self, trial_id: str) -> None:
        """A trial's process died and Tune reruns it (a new trial_started follows): not done."""
        with self._lock:
            self.running.pop(trial_id, None)

    def waiting(self, what: str | None) -> None:
        """Trials wait for resources (`what`: 'waiting for 1 CPU (0 of 2 free)'), or no longer
        (None). Plain mode prints it when it starts, then at most every `heartbeat_s` while it lasts."""
        with self._lock:
            now, line = self.clock(), None
            if what is not None and (self.waiting_for is None or now - self.waited >= max(self.heartbeat_s, 1.0)):
                self.waited, line = now, what
            self.waiting_for = what
        if line is not None and self.mode == "plain":
            self.echo_to(f"  {line}")

    def tick(self) -> None:
        """Plain mode: a heartbeat line for each running trial that is due one. A trial is due
        `heartbeat_s` after it started or after its last line; a line with no evaluation new since
        the last also waits at least a second (so an interval of 0 does not print every tick)."""
        if self.mode != "plain":
            return
        with self._lock:
            now, due = self.clock(), []
            for trial in self.running.values():
                quiet = now - trial.last_line
                if quiet >= self.heartbeat_s and (trial.fresh or quiet >= max(self.heartbeat_s, 1.0)):
                    trial.last_line, trial.fresh = now, False
                    due.append(self.running_line(trial, now))
        for line in due:
            self.echo_to(line)

    # --- arithmetic -------------------------------------------------------------------------

    def totals(self) -> tuple[int, int]:
        """(trials done, trials in the sweep): recorded before this run included."""
        return sum(r.done for r in self.rows.values()), sum(r.total for r in self.rows.values())

    def eta(self, now: float | None = None) -> float | None:
        """Seconds until the sweep ends, or None until a trial has finished in this run.

        Each trial not yet started takes the mean duration of those that finished; each running
        one the rest of that mean (at least 0); the work runs as many at a time as were ever seen
        running at once. Defences not yet begun count at their full size (resumed ones shrink
        when they begin), and a compute cap can end a defence early: an upper-leaning guess."""
        with self._lock:
            if not self.durations:
                return None
            now = self.clock() if now is None else now
            mean = sum(self.durations) / len(self.durations)
            waiting = sum(max(0, r.total - r.done) for r in self.rows.values() if r.state != "ended")
            waiting = max(0, waiting - len(self.running))
            left = sum(max(0.0, mean - (now - t.started)) for t in self.running.values())
            return (waiting * mean + left) / max(1, self.peak)

    # --- text -------------------------------------------------------------------------------

    def running_line(self, trial: Running, now: float | None = None) -> str:
        """The plain heartbeat of one running trial, at most WIDTH characters."""
        now = self.clock() if now is None else now
        rest = f"  {_where(trial)}  {duration(now - trial.started)}"
        head = "  running: "
        return head + fit(f"{trial.defence} · {trial.label}", WIDTH - len(head) - len(rest)) + rest

    def header(self) -> str:
        done, total = self.totals()
        now = self.clock()
        elapsed = duration(now - self.started) if self.started is not None else "0s"
        eta = self.eta(now)
        name = f"sweep {self.title!r}: " if self.title else "sweep: "
        return (f"{name}{done}/{total} trials · {len(self.running)} running · elapsed {elapsed} · "
                f"ETA {'?' if eta is None else duration(eta)}")

    def render(self):
        """The live region: a header, a row per defence, a row per running trial."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            now = self.clock()
            defences = Table(box=None, pad_edge=False, show_edge=False, expand=False, header_style="bold")
            defences.add_column("defence", overflow="ellipsis", no_wrap=True, max_width=24)
            defences.add_column("trials", justify="right", no_wrap=True)
            defences.add_column(f"best budget-to-failure ({self.unit})", justify="right", no_wrap=True)
            defences.add_column(f"spent ({self.unit})", justify="right", no_wrap=True)
            defences.add_column("", no_wrap=True)
            for row in self.rows.values():
                p = row.progress
                best = "-" if p is None else "none yet" if math.isinf(p.best) else amount(p.best)
                spent = "-" if p is None else amount(p.compute)
                state = {"waiting": "waiting", "ended": "done"}.get(row.state, "")
                if row.state == "running":
                    n = sum(t.defence == row.name for t in self.running.values())
                    state = f"{n} running" if n else ""
                defences.add_row(row.name, f"{row.done}/{row.total}", best, spent, state)
            parts = [Text(self.header(), style="bold", no_wrap=True, overflow="ellipsis"), defences]
            if self.waiting_for:
                parts.append(Text(self.waiting_for, style="yellow", no_wrap=True, overflow="ellipsis"))
            if self.running:
                trials = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
                trials.add_column("running trial", overflow="ellipsis", no_wrap=True, max_width=WIDTH - 30)
                trials.add_column("step", justify="right", no_wrap=True)
                trials.add_column("f", justify="right", no_wrap=True)
                trials.add_column("elapsed", justify="right", no_wrap=True)
                for t in self.running.values():
                    step = "starting" if t.step is None else \
                        f"{t.step}/{t.horizon or '?'}" + (" refining" if t.step < t.top else "")
                    f = "-" if t.f is None else f"{t.f:.2f}"
                    trials.add_row(f"{t.defence} · {t.label}", step, f, duration(now - t.started))
                parts.append(trials)
            return Group(*parts)

    def __rich__(self):
        return self.render()


def _where(t: Running) -> str:
    if t.step is None:
        return "starting"
    f = "" if t.f is None else f"  f={t.f:.2f}"
    return f"step {t.step}/{t.horizon or '?'}{' (refining)' if t.step < t.top else ''}{f}"


def _isatty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def fit(text: str, width: int) -> str:
    """`text` cut to `width` characters, the cut marked with an ellipsis."""
    width = max(width, 8)
    return text if len(text) <= width else text[:width - 1] + "…"


def duration(seconds: float) -> str:
    """45s, 3m12s, 2h05m."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
