"""The report's folder is complete or absent: written beside its place, then renamed into place
(orchestrator/report/folder.py). Real sqlite stores, real report writes, a real SIGKILL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_interrupt import quiet
from test_report import Sweep, T

from orchestrator import cli, report
from orchestrator.report import figures
from orchestrator.report.publish import publish

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> str:
    """A store holding a small sweep: the base and a defence, each against two attackers (one
    breaks both, one resists), with curves: every table and figure the report draws."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    s = Sweep(uri, "grid")
    for defence, steps in (("base", 5), ("wall", 15)):
        for lr in (1e-4, 3e-3):
            attacker, group = {"learning_rate": lr}, f"lr{lr}"
            if lr > 1e-3:
                s.trial(defence, "failed", base=defence == "base", group=group, attacker=attacker, resolution=5,
                        btf={"steps": steps, "tokens": 100 * steps}, spent={"steps": steps, "tokens": 100 * steps},
                        curve={k: {"harmfulness": 0.0 if k < steps else 0.9} for k in range(0, steps + 1, 5)})
            else:
                s.trial(defence, "resisted", base=defence == "base", group=group, attacker=attacker,
                        spent={"steps": T, "tokens": 100 * T},
                        curve={k: {"harmfulness": 0.05} for k in range(0, T + 1, 20)})
    return uri


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by its relative path, with its bytes (report.html's time of writing,
    to the minute, left out: two writes of one report differ there alone)."""
    return {p.relative_to(folder).as_posix(): re.sub(rb"written \d{4}-\d\d-\d\d \d\d:\d\d UTC", b"written UTC",
                                                     p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def beside(folder: Path) -> list[str]:
    """What a write left beside folder (.NAME.partial-*, .NAME.old-*)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture(scope="module")
def whole(swept, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Per unit, the report report.write puts straight into an empty folder: what a whole one holds."""
    rows, out = report.load(swept, "grid"), {}
    for unit in ("steps", "tokens"):
        folder = tmp_path_factory.mktemp(f"whole-{unit}")
        report.write(rows, "grid", folder, unit=unit)
        out[unit] = snapshot(folder)
    return out


def run_report(uri: str, out: Path, *more: str) -> int:
    return cli.main(["report", "--experiment", "grid", "--tracking-uri", uri, "--out", str(out), *more])


def test_an_error_or_a_ctrl_c_mid_write_leaves_the_previous_report_whole(swept, whole, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run_report(swept, out) == 0
    steps = snapshot(out)
    assert steps == whole["steps"]        # premise: a whole report, in steps
    tokens = whole["tokens"]
    assert steps["report.md"] != tokens["report.md"]          # premise: the two tell apart

    def boom(rows, unit):
        raise RuntimeError("the heatmap broke")

    monkeypatch.setattr(figures, "heatmap", boom)   # report.md and the CSVs are written before it runs
    assert run_report(swept, out, "--unit", "tokens") == 1
    assert "the heatmap broke" in capsys.readouterr().err
    assert snapshot(out) == steps and beside(out) == []

    def ctrl_c(rows, unit):
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "heatmap", ctrl_c)
    with pytest.raises(KeyboardInterrupt):   # cli.main would os._exit: the report's writer itself
        cli._report(swept, "grid", str(out), "tokens")
    assert snapshot(out) == steps and beside(out) == []

    fresh = tmp_path / "fresh"    # no previous report: none at all, not half of one
    with pytest.raises(KeyboardInterrupt):
        cli._report(swept, "grid", str(fresh), "tokens")
    assert not fresh.exists() and beside(fresh) == []

    monkeypatch.undo()
    assert run_report(swept, out, "--unit", "tokens") == 0
    assert snapshot(out) == tokens and beside(out) == []


def report_mid_write(swept: str, out: Path, stderr) -> subprocess.Popen | None:
    """`attack-sweep report --unit tokens` into `out`, returned once it is mid-write (its tables
    written into the partial folder beside `out`, its figures not yet); None when it finished, whole,
    before this process saw it mid-way (a loaded machine can starve the polling that long)."""
    cmd = [sys.executable, "-m", "orchestrator.cli", "report", "--experiment", "grid", "--tracking-uri", swept,
           "--out", str(out), "--unit", "tokens"]
    proc = subprocess.Popen(cmd, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    while not list(out.parent.glob(f".{out.name}.partial-*/report.md")):
        if proc.poll() == 0 and not beside(out):
            return None
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError("the write was not seen mid-way")
        time.sleep(0.01)
    return proc


def signal_mid_write(swept: str, out: Path, sig: int, stderr=subprocess.DEVNULL) -> tuple[int, str]:
    """(exit code, stderr) of a report write sent `sig` once it is mid-write. On a loaded machine this
    process can be starved until the write has finished (exit 0, the new report in place): that try
    did not test a signal mid-write, so the previous report is written back and it tries again."""
    for _ in range(5):
        proc = report_mid_write(swept, out, stderr)
        if proc is None:   # finished before it was seen mid-way: the previous report again, and retry
            assert run_report(swept, out) == 0
            continue
        try:
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.returncode != 0:
            return proc.returncode, err or ""
        assert run_report(swept, out) == 0   # the previous report again, as the try found it
    raise AssertionError("the write finished before the signal in 5 tries")


def test_a_write_killed_mid_way_leaves_a_partial_folder_that_the_next_write_removes(swept, whole, tmp_path):
    out = tmp_path / "out"
    assert run_report(swept, out) == 0
    steps = snapshot(out)
    assert signal_mid_write(swept, out, signal.SIGKILL)[0] == -signal.SIGKILL
    (left,) = beside(out)
    assert left.startswith(".out.partial-") and len(left) == len(".out.partial-") + 6
    assert snapshot(out) == steps                      # the previous report, untouched
    assert run_report(swept, out, "--unit", "tokens") == 0
    assert beside(out) == [] and snapshot(out) == whole["tokens"]


def test_the_users_own_files_in_the_folder_stay_and_the_last_reports_do_not(swept, whole, tmp_path):
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "figures" / "README").write_text("also mine")
    (out / "figures" / "stale.png").write_bytes(b"an earlier report's figure")
    (out / "verdicts.csv").write_text("an earlier report's verdicts")
    assert run_report(swept, out) == 0
    assert snapshot(out) == {**whole["steps"], "notes.txt": b"mine",
                             "figures/README": b"also mine"}


def test_a_previous_report_set_aside_by_a_killed_swap_is_put_back_before_the_next_write(swept, whole, tmp_path):
    """A SIGKILL between the swap's two renames leaves the place empty and the previous report as
    .NAME.old-XXXXXX (built here by hand: the window is two system calls)."""
    aside = tmp_path / ".out.old-a1b2c3"
    aside.mkdir()
    (aside / "report.md").write_text("the previous report")
    (aside / "notes.txt").write_text("mine")
    (tmp_path / ".out.partial-d4e5f6").mkdir()   # the new report it was swapping in
    out = tmp_path / "out"
    assert run_report(swept, out) == 0
    assert beside(out) == []
    assert snapshot(out) == {**whole["steps"], "notes.txt": b"mine"}


@pytest.mark.parametrize("where", ["subfolder", "cwd"])
def test_a_folder_the_report_cannot_replace_whole_is_refused(swept, tmp_path, monkeypatch, capsys, where):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "x.csv").write_text("1")
    if where == "cwd":
        monkeypatch.chdir(out / "data")
    assert run_report(swept, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {out}: holds ") and "give it a folder of its own" in err
    assert ("working directory" in err) == (where == "cwd") and ("(data)" in err) == (where == "subfolder")
    assert snapshot(out) == {"data/x.csv": b"1"} and beside(out) == []


def test_publish_logs_what_it_swapped_into_place(swept, whole, tmp_path, monkeypatch):
    """The run's end (publish with out_dir): the report in out_dir whole, and the same files,
    byte for byte, on the sweep run; a failed write logs no report and keeps the previous one."""
    client = MlflowClient(swept)
    exp = client.get_experiment_by_name("grid").experiment_id
    (sweep_run,) = client.search_runs([exp], "tags.kind = 'sweep'")
    out = tmp_path / "out"
    assert run_report(swept, out) == 0
    steps = snapshot(out)
    monkeypatch.setattr(figures, "heatmap", lambda rows, unit: 1 / 0)
    lines: list[str] = []
    assert publish(swept, "grid", sweep_run.info.run_id, "tokens", echo=lines.append, out_dir=out) is None
    assert "ZeroDivisionError" in lines[0] and snapshot(out) == steps and beside(out) == []
    assert not client.list_artifacts(sweep_run.info.run_id, "report")
    monkeypatch.undo()
    assert publish(swept, "grid", sweep_run.info.run_id, "tokens", echo=lines.append, out_dir=out) is not None
    local = snapshot(out)
    assert local == whole["tokens"] and beside(out) == []
    run_id = sweep_run.info.run_id
    logged = {a.path for a in client.list_artifacts(run_id, "report") if not a.is_dir}
    logged |= {a.path for a in client.list_artifacts(run_id, "report/figures")}
    assert logged == {f"report/{name}" for name in local}
    (tmp_path / "logged").mkdir()
    for name in local:
        logged_bytes = Path(client.download_artifacts(run_id, f"report/{name}", str(tmp_path / "logged"))).read_bytes()
        assert logged_bytes == (out / name).read_bytes()


def test_ctrl_c_while_the_report_is_written_leaves_the_previous_one_whole(swept, whole, tmp_path):
    """A real SIGINT to `attack-sweep report` mid-write: the one line, exit 130, the previous
    report as it was and nothing beside it; a rerun writes the new one whole."""
    out = tmp_path / "out"
    assert run_report(swept, out) == 0
    steps = snapshot(out)
    returncode, err = signal_mid_write(swept, out, signal.SIGINT, subprocess.PIPE)
    assert returncode == 130 and quiet(err), (returncode, err[-2000:])
    assert beside(out) == [], (beside(out), err[-2000:])
    assert snapshot(out) == steps, sorted(set(snapshot(out)) ^ set(steps))
    assert run_report(swept, out, "--unit", "tokens") == 0
    assert snapshot(out) == whole["tokens"] and beside(out) == []
