"""The attacker library in search_spaces/: every spec validates, names its source, and encodes the
published numbers; the adaptive adversary covers the others' dimensions and runs on the toy world.

    .venv/bin/pytest -q tests/test_library.py

Every *.yaml in search_spaces/ is picked up, so a new library file is checked on arrival. Library
files open with a comment block holding a line `# Source: AUTHORS (YEAR), "TITLE", VENUE/arXiv`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator import spec as S
from orchestrator.cli import main
from orchestrator.spec.space import Dim

SPACES_DIR = Path(__file__).parents[1] / "search_spaces"
SPACES = sorted(SPACES_DIR.glob("*.yaml"))
DEMO = {"quickstart.yaml"}  # the demo's own toy sweep (orchestrator/quickstart.yaml), not a published attacker
LIBRARY = [p for p in SPACES if p.name not in DEMO]
ADAPTIVE = SPACES_DIR / "adaptive_tpe.yaml"
SOURCE_LINE = re.compile(r"^# Source: .*\b(19|20)\d\d\b")

# adaptive_tpe.yaml retargeted at the embedded toy world (2 defences, 144 attack rows, CPU):
#   attack-sweep run search_spaces/adaptive_tpe.yaml --overlay examples/toyworld_overlay.yaml
TOY_OVERLAY = Path(__file__).parents[1] / "examples" / "toyworld_overlay.yaml"


def _space(name: str) -> dict[str, Dim]:
    return dict(S.load(SPACES_DIR / name).space)


def _values(dim: Dim) -> set:
    return set(dim.values)


# --- every file ------------------------------------------------------------------------


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_spec_validates(path, world, capsys):
    # `world` builds the toy world in a temp cache first: quickstart.yaml points into it. The
    # library's defences are hub models, not checked offline: the note says so.
    hub = path.name not in DEMO
    assert main(["validate", str(path), *(["--skip-checkpoint-checks"] if hub else [])]) == 0
    out = capsys.readouterr().out
    assert out.startswith("spec OK") and ("checkpoints not checked" in out) == hub


@pytest.mark.parametrize("path", LIBRARY, ids=[p.name for p in LIBRARY])
def test_header_names_a_dated_source(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert any(SOURCE_LINE.match(line) for line in header), \
        f"{path.name}: its opening comment needs a line '# Source: AUTHORS (YEAR), \"TITLE\", VENUE'"


def test_library_is_not_empty():
    assert {p.name for p in LIBRARY} >= {"qi2025_lr_seeds.yaml", "tar_adversaries.yaml",
                                         "tamperbench_lora.yaml", "adaptive_tpe.yaml"}


# --- the published numbers --------------------------------------------------------------


def test_qi2025_repnoise_attack():
    sp = S.load(SPACES_DIR / "qi2025_lr_seeds.yaml")
    d = dict(sp.space)
    assert sp.search.algorithm == "grid"
    assert d["learning_rate"].kind == "grid" and _values(d["learning_rate"]) == {3e-5, 6e-5, 8e-5}
    assert d["seed"].kind == "grid" and len(_values(d["seed"])) == 5
    assert d["optimizer"].values == ("adamw",) and d["lr_schedule"].values == ("cosine",)
    assert d["warmup_ratio"].values == (0.1,) and d["finetune"].values == ("full",)
    assert d["batch_size"].values == (4,) and d["dataset_size"].values == (1000,)
    horizon = d["steps"].values[0] or sp.max_steps
    assert horizon == 250 == 1000 // 4  # one epoch
    assert len(sp.attackers()) == 15
    assert any(x.model == "domenicrosati/repnoise_0.001_beta" for x in sp.defences)


def test_tar_red_teaming_dimensions():
    sp = S.load(SPACES_DIR / "tar_adversaries.yaml")
    d = dict(sp.space)
    assert sp.search.algorithm == "grid"
    assert _values(d["optimizer"]) == {"sgd_momentum", "sgd_nesterov", "adam", "adamw", "adagrad", "adadelta"}
    # schedule-free AdamW only as a commented line, so the file validates without the package
    assert "pip install schedulefree" in (SPACES_DIR / "tar_adversaries.yaml").read_text()
    schedules = d["stages"].values
    assert d["stages"].kind == "grid" and all(len(v) == 1 for v in schedules)
    shapes = {(v[0].lr_schedule, bool(v[0].warmup_steps or v[0].warmup_ratio)) for v in schedules}
    assert shapes == {("constant", False), ("constant", True), ("cosine", True), ("sgdr", True)}
    assert all(v[0].steps == 1000 for v in schedules) and sp.max_steps == 1000
    assert _values(d["finetune"]) == {"lora", "full"}
    assert d["lora_r"].values == (16,) and d["lora_alpha"].values == (32,)
    assert d["learning_rate"].values == (2e-5,)
    assert len(sp.attackers()) == 6 * 4 * 2


def test_tamperbench_lora_space():
    sp = S.load(SPACES_DIR / "tamperbench_lora.yaml")
    d = dict(sp.space)
    assert sp.search.algorithm == "random"
    assert d["learning_rate"].kind == "loguniform" and d["learning_rate"].values == (1e-6, 1e-3)
    assert _values(d["steps"]) == {16, 64, 128, 256, 512}
    assert _values(d["batch_size"]) == {8, 16, 32, 64}
    assert _values(d["lora_r"]) == {8, 16, 32, 64}
    assert _values(d["lr_schedule"]) == {"constant", "cosine"}
    assert d["finetune"].values == ("lora",)
    assert sp.max_steps == 512


# --- the adaptive adversary --------------------------------------------------------------


def test_adaptive_tpe_search_settings():
    sp = S.load(ADAPTIVE)
    s = sp.search
    assert (s.algorithm, s.num_samples, s.n_initial, s.unit, s.penalty) == ("tpe", 64, 10, "tokens", 2)
    assert s.max_compute and s.max_compute > 0
    assert sp.eval_schedule == "geometric" and sp.refine == 3
    assert _values(dict(sp.space)["seed"]) == {0, 1, 2, 3, 4}
    assert _values(dict(sp.space)["warmup_ratio"]) == {0.0, 0.1}


def _searched(space: dict[str, Dim]) -> dict[str, Dim]:
    """Searched dimensions, a schedule-per-stage grid unfolded into the attacker fields it varies."""
    out = {n: d for n, d in space.items() if d.kind != "constant" and n != "stages"}
    if space["stages"].kind != "constant":
        stages = [s for v in space["stages"].values for s in v]
        out["lr_schedule"] = Dim("choice", tuple({s.lr_schedule for s in stages if s.lr_schedule}))
        out["warmup"] = Dim("choice", tuple({bool(s.warmup_steps or s.warmup_ratio) for s in stages}))
    return out


def _covers(wide: Dim, narrow: Dim) -> bool:
    if narrow.kind in ("uniform", "loguniform", "randint") or wide.kind in ("uniform", "loguniform", "randint"):
        if wide.kind in ("grid", "choice"):
            return False
        lo, hi = wide.values
        return lo <= min(narrow.values) and max(narrow.values) <= hi
    return set(narrow.values) <= set(wide.values)


@pytest.mark.parametrize("path", [p for p in LIBRARY if p != ADAPTIVE],
                         ids=[p.name for p in LIBRARY if p != ADAPTIVE])
def test_adaptive_tpe_covers_every_searched_dimension(path):
    adaptive = dict(S.load(ADAPTIVE).space)
    wide = _searched(adaptive)
    wide["warmup"] = Dim("choice", tuple({bool(v) for n in ("warmup_steps", "warmup_ratio")
                                           for v in adaptive[n].values}))
    for name, dim in _searched(dict(S.load(path).space)).items():
        assert name in wide, f"adaptive_tpe.yaml does not search {name} (searched by {path.name})"
        assert _covers(wide[name], dim), f"adaptive_tpe.yaml's {name} {wide[name]} misses {path.name}'s {dim}"


def test_adaptive_tpe_validates_on_the_toy_world(world, capsys):
    assert main(["validate", str(ADAPTIVE), "--overlay", str(TOY_OVERLAY)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("spec OK: adaptive-tpe-toy") and "tpe search" in out
    # everything checked here; the only notes are the budget's: the overlay's dataset_size 16 under
    # batch_size 32 and 64 (rows repeat within a step, docs/troubleshooting.md "Budget notes")
    notes = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("note:")]
    assert [n.split(" in attackers")[0] for n in notes] == [
        f"note: space.batch_size: {b} exceeds the 16 rows drawn (space.dataset_size: 16, of data.attack's 144 rows)"
        for b in (32, 64)]
    sp = S.load(ADAPTIVE, S.overlay(TOY_OVERLAY))
    assert [Path(d.model) for d in sp.defences] == [world / "base", world / "rescaled"]
    assert sp.base.name == "base" and sp.adaptive
