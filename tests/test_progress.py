"""The progress display: its arithmetic and text driven directly (no Ray, a fake clock), the live
region rendered into a string, and one tiny real sweep in plain mode."""

from __future__ import annotations

import io
import pickle
import re

import pytest
from conftest import sweep_dict
from rich.console import Console

from orchestrator.sweep.adversary import Progress
from orchestrator.sweep.progress import WIDTH, Display, duration

LONG = "learning_rate=0.003 optimizer=schedule_free_adamw dataset_size=256 finetune=lora lora_r=64 seed=3"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def display(mode="plain", heartbeat_s=30.0, **kw) -> tuple[Display, Clock, list[str]]:
    clock, lines = Clock(), []
    d = Display(["base", "repnoise"], 4, "steps", lines.append, title="toy", mode=mode,
                heartbeat_s=heartbeat_s, clock=clock, **kw)
    return d.start(), clock, lines


def test_done_total_eta_and_best_so_far():
    d, clock, _ = display()
    assert d.totals() == (0, 8) and d.eta() is None and d.header().endswith("ETA ?")
    base = Progress("steps")
    base.add("failed", 40, 40)          # one trial recorded by an earlier run
    d.begin("base", base, done=1, pending=3)
    d.trial_started("t1", "base", "lr=1", 20)
    d.trial_started("t2", "base", "lr=2", 20)
    clock.now = 100
    d.trial_result("t1", {"step": 5, "harmfulness": 0.25, "status": "running"})
    assert d.eta() is None                # nothing finished in this run yet: the record does not time it
    d.trial_finished("t1")
    base.add("failed", 10, 10)            # what the MLflow recorder does before the display hears of it
    assert d.totals() == (2, 8) and d.rows["base"].done == 2
    # mean 100 s; not started: 2 left of base + 4 of repnoise - 1 running = 5 -> 500 s; t2 ran 100 of its
    # 100 s; 2 ran at once at most -> 250 s
    assert d.eta() == pytest.approx(250.0)
    assert "2/8 trials" in d.header() and "ETA 4m10s" in d.header() and "elapsed 1m40s" in d.header()
    clock.now = 130
    d.trial_finished("t2", error=True)    # crashed trials count as done, never as a duration
    assert d.durations == [100.0] and d.totals() == (3, 8)
    assert d.eta() == pytest.approx(5 * 100 / 2)    # 1 of base + 4 of repnoise, none running
    # a compute cap ends base early: its last trial never runs, and repnoise begins resumed
    d.end("base")
    d.begin("repnoise", Progress("steps"), done=3, pending=1)
    assert d.rows["base"].total == 3 and d.totals() == (6, 7) and d.eta() == pytest.approx(50.0)
    d.end()
    assert d.eta() == 0.0 and d.rows["repnoise"].state == "ended"
    text = render(d)
    assert re.search(r"base\s+3/3\s+10\s+50\s+done", text), text       # best 10 steps after 50 spent
    assert re.search(r"repnoise\s+3/3\s+none yet\s+0\s+done", text), text


def test_running_trial_line_has_step_f_elapsed_and_fits_100_columns():
    d, clock, _ = display()
    d.trial_started("t", "base", "lr=0.003 optimizer=adamw", 200)
    assert d.running_line(d.running["t"]) == "  running: base · lr=0.003 optimizer=adamw  starting  0s"
    clock.now = 192
    d.trial_result("t", {"step": 20, "harmfulness": 0.3125, "status": "running"})
    assert d.running_line(d.running["t"]) == \
        "  running: base · lr=0.003 optimizer=adamw  step 20/200  f=0.31  3m12s"
    d.trial_result("t", {"step": 15, "harmfulness": 0.6, "status": "running"})   # a refinement replay
    assert "step 15/200 (refining)  f=0.60" in d.running_line(d.running["t"])
    d.trial_started("long", "a-defence-with-a-long-name", LONG, 10_000)
    clock.now = 3 * 3600 + 5 * 60   # it started at 3m12s
    d.trial_result("long", {"step": 9_990, "harmfulness": 0.05, "status": "running"})
    line = d.running_line(d.running["long"])
    assert len(line) == WIDTH and "…" in line and line.endswith("  step 9990/10000  f=0.05  3h01m"), line
    assert [duration(s) for s in (0, 59.9, 60, 3599, 3600, 7325)] == ["0s", "59s", "1m00s", "59m59s", "1h00m",
                                                                       "2h02m"]


def test_plain_heartbeat_is_throttled_per_trial():
    d, clock, lines = display(heartbeat_s=30.0)
    d.trial_started("a", "base", "lr=1", 20)
    for t in range(0, 95, 5):             # Tune's loop ticks; an evaluation every 5 s
        clock.now = t
        d.trial_result("a", {"step": t, "harmfulness": 0.1, "status": "running"})
        d.tick()
    assert len(lines) == 3 and all(ln.startswith("  running: base · lr=1  step ") for ln in lines), lines
    assert [ln.rsplit(" ", 1)[1] for ln in lines] == ["30s", "1m00s", "1m30s"]
    clock.now = 1000                       # a long evaluation: silence, but the clock still shows life
    d.tick()
    d.tick()
    assert len(lines) == 4 and lines[-1].endswith("step 90/20  f=0.10  16m40s")
    d.trial_finished("a")
    clock.now = 2000
    d.tick()
    assert len(lines) == 4                 # no heartbeat for a finished trial

    d, clock, lines = display(heartbeat_s=0.0)
    d.trial_started("a", "base", "lr=1", 20)
    d.tick()
    assert lines == []                     # nothing new and no time passed
    d.trial_result("a", {"step": 0, "harmfulness": 0.0, "status": "running"})
    d.trial_result("a", {"step": 5, "harmfulness": 0.5, "status": "running"})
    for _ in range(10):                    # ticks with nothing new wait a second between lines
        d.tick()
    assert [ln.split("  ")[2] for ln in lines] == ["step 0/20", "step 5/20"]
    clock.now = 1.0
    d.tick()
    assert len(lines) == 3

    d, clock, lines = display(mode="live")     # live: the region shows it, no heartbeat lines
    d.stop()
    d.trial_started("a", "base", "lr=1", 20)
    clock.now = 100
    d.trial_result("a", {"step": 5, "harmfulness": 0.5, "status": "running"})
    d.tick()
    assert lines == []


def render(d: Display) -> str:
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    console.print(d)
    return strip(console.file.getvalue())


def strip(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_live_region_shows_defences_and_running_trials_and_prints_lines_above(monkeypatch):
    monkeypatch.delenv("ATTACK_SWEEP_PROGRESS", raising=False)
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    from orchestrator.echo import say

    clock = Clock()
    d = Display(["base", "repnoise"], 16, "steps", say, title="quickstart", clock=clock, console=console,
                mode="live")
    d.start()
    try:
        base = Progress("steps")
        base.add("failed", 40, 40)
        d.begin("base", base, done=1, pending=15)
        d.trial_started("t1", "base", LONG, 200)
        d.trial_started("t2", "base", "learning_rate=1e-05 optimizer=sgd", 200)
        clock.now = 192
        d.trial_result("t1", {"step": 20, "harmfulness": 0.3125, "status": "running"})
        d.echo("[1/16] base         learning_rate=0.003 -> failed at step 40 (f=0.62)")
        d._live.refresh()
    finally:
        d.stop()
    out = strip(console.file.getvalue())
    assert "[1/16] base" in out and "\x1b[" in console.file.getvalue()   # a terminal: control codes
    frame = render(d)
    assert "sweep 'quickstart': 1/32 trials · 2 running · elapsed 3m12s · ETA ?" in frame
    assert re.search(r"base\s+1/16\s+40\s+40\s+2 running", frame), frame
    assert re.search(r"repnoise\s+0/16\s+-\s+-\s+waiting", frame), frame
    assert re.search(r"base · learning_rate=0\.003 optimizer=schedule_free_adamw\S* \S*…\s+20/200\s+0\.31\s+3m12s",
                     frame), frame
    assert re.search(r"base · learning_rate=1e-05 optimizer=sgd\s+starting\s+-\s+3m12s", frame), frame
    assert max(len(ln) for ln in frame.splitlines()) <= WIDTH
    assert "3m12s" in out and "learning_rate=1e-05" in out            # the frame Live drew


def test_mode_follows_the_terminal_unless_forced(monkeypatch):
    import sys

    monkeypatch.delenv("ATTACK_SWEEP_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert Display(["a"], 1, "steps").mode == "plain"

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    assert Display(["a"], 1, "steps").mode == "live"
    monkeypatch.setenv("ATTACK_SWEEP_PROGRESS", "plain")
    monkeypatch.setenv("ATTACK_SWEEP_HEARTBEAT_S", "5")
    d = Display(["a"], 1, "steps")
    assert d.mode == "plain" and d.heartbeat_s == 5.0
    monkeypatch.setenv("ATTACK_SWEEP_PROGRESS", "rich")
    with pytest.raises(ValueError, match="takes auto, live or plain"):
        Display(["a"], 1, "steps")


def test_a_started_live_display_pickles_without_its_terminal():
    d, clock, _ = display(mode="live", console=Console(file=io.StringIO(), force_terminal=True))
    try:
        d.trial_started("t", "base", "lr=1", 20)
        copy = pickle.loads(pickle.dumps(d))   # Tune pickles its callbacks, and so the display
    finally:
        d.stop()
    assert copy._live is None and copy.console is None and list(copy.running) == ["t"]
    copy.echo("still works")                   # plain echo_to (a list's append) after unpickling


def test_a_real_sweep_says_how_running_trials_are_doing_before_they_finish(world, ray_local, tmp_path, monkeypatch):
    from orchestrator import spec as S
    from orchestrator import sweep

    monkeypatch.setenv("ATTACK_SWEEP_PROGRESS", "plain")
    monkeypatch.setenv("ATTACK_SWEEP_HEARTBEAT_S", "0")
    raw = sweep_dict(world, "progress", defences=("base",), max_steps=10, eval_every=5,
                     space={"dataset_size": 32, "learning_rate": 1e-6})
    lines: list[str] = []
    sweep.run(S.from_dict(raw), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
              storage_path=str(tmp_path / "ray"), echo=lines.append)
    end = next(i for i, ln in enumerate(lines) if ln.startswith("[1/1] base"))
    assert "resisted, censored at 10 steps" in lines[end], lines
    beats = [ln for ln in lines[:end] if ln.startswith("  running: base · (single attacker)  step ")]
    assert any(re.search(r"step 5/10  f=\d\.\d\d  \d+s$", ln) for ln in beats), lines
    assert not any(ln.startswith("  running:") for ln in lines[end:]), lines
    assert all("\x1b" not in ln for ln in lines)
