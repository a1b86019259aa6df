"""The light paths stay light: `attack-sweep --help` and a spec's errors import none of torch,
transformers, MLflow or Ray, and `report` imports MLflow but not torch, transformers or Ray.
Each case runs the real CLI in a fresh interpreter and lists the heavy modules it loaded;
nothing is timed here (bench/startup.py measures the seconds).

    .venv/bin/pytest -q tests/test_startup.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "orchestrator" / "quickstart.yaml"
HEAVY = ("torch", "transformers", "peft", "datasets", "mlflow", "sqlalchemy", "ray", "pandas", "scipy",
         "matplotlib", "lifelines")
"""Each of these takes from a few tenths of a second (pandas) to 1.5 s (torch) to import."""
PROBE = f"""
import sys
from orchestrator.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exit:
    rc = exit.code
print("RC", rc)
print("LOADED", " ".join(m for m in {HEAVY!r} if m in sys.modules))
"""


def probe(args: list[str], cwd: Path, code: str = PROBE) -> tuple[int, set[str], str]:
    """Run the CLI with `args` in a fresh interpreter: its exit code, the heavy modules it had
    imported by the end, and its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in proc.stdout.splitlines()
                 if line.startswith(("RC", "LOADED")))
    assert "LOADED" in lines, f"probe failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return int(lines["RC"]), set(lines["LOADED"].split()), proc.stderr


def test_help_imports_nothing_heavy(tmp_path):
    rc, loaded, _ = probe(["--help"], tmp_path)
    assert rc == 0
    assert loaded == set()


@pytest.mark.parametrize("bad, named", [
    ("max_stepz: 40", "max_stepz: unknown key"),       # a misspelt field
    ("phi: 1.5", "phi: Input should be less than or equal to 1"),   # a value out of range
    ("space: {optimizer: adamm}", "space.optimizer"),    # an unknown choice, nested
])
def test_a_spec_error_imports_nothing_heavy(world, tmp_path, bad, named):
    """The quickstart spec (whose toyworld: paths import orchestrator/spec/toyworld.py) with one
    mistake: the one-line error comes before torch, MLflow or Ray are imported."""
    spec = tmp_path / "bad.yaml"
    spec.write_text(QUICKSTART.read_text() + f"\n{bad}\n")
    rc, loaded, err = probe(["validate", str(spec)], tmp_path)
    assert rc == 2
    assert named in err
    assert loaded == set(), f"a spec error imported {sorted(loaded)}"


def test_validate_without_a_store_imports_no_mlflow(world, tmp_path):
    """validate reads the tracking store (for its time estimate) only where the store exists: without
    one it imports no MLflow (nor its SQLAlchemy), and creates no store. (Ray is imported: this
    machine's CPUs and GPUs are counted by Ray's own resolver, orchestrator/capacity.py.)"""
    import yaml
    from conftest import sweep_dict

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep_dict(world, "light")))
    rc, loaded, err = probe(["validate", str(tmp_path / "s.yaml"), "--skip-checkpoint-checks"], tmp_path)
    assert rc == 0, err
    assert not loaded & {"mlflow", "sqlalchemy"}, sorted(loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_report_imports_no_torch_or_ray(tmp_path):
    """`report` needs MLflow (the records) and draws with matplotlib, but never torch,
    transformers or Ray; on an empty store it stops at its one line (no such experiment)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()   # the empty store (report creates none)
    rc, loaded, err = probe(["report", "--experiment", "nothing-here", "--tracking-uri", uri], tmp_path)
    assert rc == 2 and "no MLflow experiment 'nothing-here'" in err
    assert "mlflow" in loaded
    assert not loaded & {"torch", "transformers", "peft", "datasets", "ray"}, sorted(loaded)
    code = PROBE.replace("rc = main(sys.argv[1:])", "from orchestrator import report; "
                         "from orchestrator.report import figures, html; rc = 0")
    _, loaded, _ = probe([], tmp_path, code)
    assert not loaded & {"torch", "transformers", "peft", "datasets", "ray"}, sorted(loaded)


def test_trainables_imports_lazily(tmp_path):
    """`from trainables import AttackConfig` is the config alone; run_attack brings torch."""
    code = ("import sys\nfrom trainables import AttackConfig, Attacker, Stage, Status\n"
            "print('RC', int('torch' in sys.modules))\n"
            "import trainables\nfrom trainables import run_attack, AttackResult, Budget, EvalPoint\n"
            "assert all(getattr(trainables, n) is not None for n in trainables.__all__)\n"
            "assert set(trainables.__all__) <= set(dir(trainables))\n"
            "print('LOADED', ' '.join(m for m in ('torch',) if m in sys.modules))\n")
    rc, loaded, _ = probe([], tmp_path, code)
    assert rc == 0, "the config classes imported torch"
    assert loaded == {"torch"}
    import trainables

    with pytest.raises(AttributeError):
        trainables.no_such_name  # noqa: B018 - the module's __getattr__ must refuse unknown names


@pytest.mark.parametrize("args, code", [(["validate", str(QUICKSTART)], 0), (["validate", "/no/such.yaml"], 2)])
def test_the_console_script_exits_as_main_says_after_every_atexit_handler(tmp_path, args, code):
    """entry() (the `attack-sweep` script) leaves with main's exit code, after the atexit handlers
    a normal exit runs (Ray's shutdown is one), and with everything printed flushed."""
    marker = tmp_path / "atexit-ran"
    script = ("import atexit, pathlib, sys; from orchestrator.cli import entry\n"
              f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes'))\n"
              "sys.argv = ['attack-sweep', *sys.argv[1:]]\nentry()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == code, proc.stderr
    assert marker.read_text() == "yes"
    assert (proc.stdout.startswith("spec OK") if code == 0 else "no/such.yaml" in proc.stderr)
