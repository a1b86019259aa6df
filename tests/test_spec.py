from pathlib import Path

import pytest
import yaml

from orchestrator import spec as S
from orchestrator.cli import main

QUICKSTART = Path(__file__).parents[1] / "search_spaces" / "quickstart.yaml"


def minimal(tmp_path: Path, **over) -> dict:
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "response": "r"}\n' * 40)
    (tmp_path / "e.jsonl").write_text('{"prompt": "held out", "response": "r"}\n' * 8)
    raw = {
        "name": "t",
        "defences": [{"name": "base", "model": "org/model", "base": True},
                     {"name": "def", "model": "org/defended"}],
        "data": {"attack": {"source": "a.jsonl"}, "eval": {"source": "e.jsonl"}},
        "space": {"learning_rate": {"grid": [1e-4, 1e-3]}, "finetune": {"grid": ["lora", "full"]}},
    }
    raw.update(over)
    return raw


def load_raw(tmp_path: Path, raw: dict, overrides=()) -> S.SweepSpec:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return S.load(path, list(overrides))


def error_of(tmp_path, raw, overrides=()) -> str:
    with pytest.raises(S.SpecError) as err:
        load_raw(tmp_path, raw, overrides)
    return str(err.value)


def test_valid_spec_counts_trials_and_resolves_local_paths(tmp_path):
    sp = load_raw(tmp_path, minimal(tmp_path))
    assert len(sp.attackers()) == 4 and sp.base.name == "base"
    assert sp.data.attack.source == str((tmp_path / "a.jsonl").resolve())
    assert sp.defences[0].model == "org/model"  # not a local path: a hub id, left as is


def test_unknown_key_names_field_and_allowed_keys(tmp_path):
    msg = error_of(tmp_path, minimal(tmp_path, phii=0.3))
    assert msg.startswith("spec error: phii: unknown key") and "phi" in msg and "\n" not in msg


def test_unknown_attacker_field_lists_attacker_fields(tmp_path):
    raw = minimal(tmp_path)
    raw["space"]["lr"] = 0.1
    msg = error_of(tmp_path, raw)
    assert "space.lr: unknown key" in msg and "learning_rate" in msg


def test_bad_value_inside_a_domain_names_field_and_allowed_values(tmp_path):
    raw = minimal(tmp_path)
    raw["space"]["optimizer"] = {"grid": ["adamw", "lion"]}
    msg = error_of(tmp_path, raw)
    assert msg.startswith("spec error: space.optimizer: grid[1]:")
    assert "'sgd_momentum'" in msg and "lion" in msg


@pytest.mark.parametrize("space, expect", [
    ({"learning_rate": -1}, "space.learning_rate: Input should be greater than 0"),
    ({"learning_rate": {"loguniform": [1e-2, 1e-4]}}, "low < high"),
    ({"batch_size": {"sample": [1, 2]}}, "one of: grid, choice, uniform, loguniform, randint"),
    ({"finetune": {"choice": []}}, "non-empty list"),
])
def test_bad_domains(tmp_path, space, expect):
    raw = minimal(tmp_path)
    raw["space"] = space
    raw["search"] = {"algorithm": "random"}
    assert expect in error_of(tmp_path, raw)


def test_exactly_one_base_and_unique_names(tmp_path):
    raw = minimal(tmp_path)
    raw["defences"][0]["base"] = False
    assert "exactly one defence with 'base: true'" in error_of(tmp_path, raw)
    raw = minimal(tmp_path)
    raw["defences"][1]["name"] = "base"
    assert "repeated: base" in error_of(tmp_path, raw)


def test_unknown_evaluator_lists_known_ones(tmp_path):
    msg = error_of(tmp_path, minimal(tmp_path, evaluator={"name": "jduge"}))
    assert msg.startswith("spec error: evaluator: unknown evaluator 'jduge'")
    assert all(name in msg for name in ("classifier", "judge", "nll", "refusal_keyword"))
    msg = error_of(tmp_path, minimal(tmp_path, evaluator={"name": "judge"}))
    assert msg == "spec error: evaluator.options.backend: Field required"
    msg = error_of(tmp_path, minimal(tmp_path, evaluator={"options": {"max_tokens": 3}}))
    assert "max_tokens" in msg


def test_grid_search_refuses_continuous_domains(tmp_path):
    raw = minimal(tmp_path)
    raw["space"]["learning_rate"] = {"loguniform": [1e-5, 1e-3]}
    assert "search.algorithm=grid cannot sample space.learning_rate" in error_of(tmp_path, raw)


def test_set_overrides_any_field(tmp_path):
    sp = load_raw(tmp_path, minimal(tmp_path), [
        "max_steps=7", "defences.1.model=org/other", "search.algorithm=random",
        "search.num_samples=3", "space.learning_rate={loguniform: [1.0e-5, 1.0e-3]}"])
    assert sp.max_steps == 7 and sp.defences[1].model == "org/other"
    assert len(sp.attackers()) == 2 * 3  # finetune grid x 3 draws
    assert "--set max_steps" in error_of(tmp_path, minimal(tmp_path), ["max_steps"])
    assert "not an index" in error_of(tmp_path, minimal(tmp_path), ["defences.5.model=x"])
    assert "max_steps: Input should be greater than 0" in error_of(
        tmp_path, minimal(tmp_path), ["max_steps=0"])


def test_spec_round_trips_through_json(tmp_path):
    sp = load_raw(tmp_path, minimal(tmp_path))
    again = S.SweepSpec.model_validate_json(sp.model_dump_json())
    assert again == sp and again.attackers() == sp.attackers()


def test_cli_validate_prints_trials_and_one_line_errors(tmp_path, capsys, world):
    assert main(["validate", str(QUICKSTART)]) == 0
    out = capsys.readouterr().out
    assert "trials: 32 = 2 defences x 16 attackers" in out and "T=40 steps" in out
    raw = minimal(tmp_path)
    raw["space"]["optimizer"] = "lion"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spec error: space.optimizer") and len(err.splitlines()) == 1
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_preflight_catches_data_problems(tmp_path, capsys):
    raw = minimal(tmp_path, space={"dataset_size": 100})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "s.yaml")]) == 2
    assert "space.dataset_size: 100 exceeds the 40 rows of data.attack" in capsys.readouterr().err
    raw = minimal(tmp_path)
    raw["data"]["attack"]["prompt_field"] = "question"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "s.yaml")]) == 2
    assert "no field 'question'" in capsys.readouterr().err


def test_overlay_file_applies_before_set_and_fails_in_one_line(tmp_path, capsys):
    (tmp_path / "over.yaml").write_text("max_steps: 12\nsearch.seed: 3\nspace.dataset_size: {grid: [8, 16]}\n")
    sp = S.load(QUICKSTART, [*S.overlay(tmp_path / "over.yaml"), "max_steps=13"])
    assert sp.max_steps == 13 and sp.search.seed == 3 and len(sp.attackers()) == 32   # 16 attackers x 2 sizes
    (tmp_path / "list.yaml").write_text("- max_steps: 12\n")
    assert main(["validate", str(QUICKSTART), "--overlay", str(tmp_path / "list.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: overlay file") and "mapping" in err and len(err.splitlines()) == 1


def test_preflight_refuses_eval_prompts_the_attacker_trains_on(tmp_path, capsys):
    raw = minimal(tmp_path, space={"dataset_size": 16})
    (tmp_path / "e.jsonl").write_text('{"prompt": "held out", "response": "r"}\n{"prompt": "  P ", "response": "r"}\n')
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spec error: data.eval: 1 held-out prompt(s) also in data.attack") and "'  P '" in err
    (tmp_path / "e.jsonl").write_text('{"prompt": "held out", "response": "r"}\n{"prompt": "q", "response": "r"}\n')
    assert main(["validate", str(tmp_path / "s.yaml"), "--skip-checkpoint-checks"]) == 0


def test_paths_expand_environment_variables(tmp_path, monkeypatch, capsys):
    raw = minimal(tmp_path)
    raw["defences"][1]["model"] = "${DEFENDED_DIR}/ckpt"
    raw["data"]["attack"]["source"] = "${DATA_DIR}/a.jsonl"
    monkeypatch.setenv("DEFENDED_DIR", "/scratch/models")
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    sp = load_raw(tmp_path, raw)
    assert sp.defences[1].model == "/scratch/models/ckpt"
    assert sp.data.attack.source == str(tmp_path / "a.jsonl")
    monkeypatch.delenv("DATA_DIR")
    err = error_of(tmp_path, raw)
    assert err.startswith("spec error: data.attack.source: environment variable DATA_DIR is not set")
    assert len(err.splitlines()) == 1
