"""The conditions block: a condition asked for without the data it needs is one line before
Ray starts (spec validation, then preflight with the data read); domains and the benign task
are checked against the data; trial keys of sweeps without these fields do not change."""

import json

import pytest
from test_spec import error_of, load_raw, minimal
from test_spec_rules import check_error, checked, one_line, with_utility

from orchestrator import spec as S
from orchestrator import sweep
from orchestrator.cli import main

DOMAINS = ["cyber", "theft"]


def with_domains(tmp_path, **over) -> dict:
    """Attack and eval rows with a category (40 attack rows per domain), and a benign task."""
    raw = with_utility(tmp_path)   # writes the plain splits: replaced below
    (tmp_path / "a.jsonl").write_text("".join(
        json.dumps({"prompt": f"attack {d} {i}", "response": "r", "category": d}) + "\n"
        for d in DOMAINS for i in range(40)))
    (tmp_path / "e.jsonl").write_text("".join(
        json.dumps({"prompt": f"held out {d} {i}", "response": "r", "category": d}) + "\n"
        for d in DOMAINS for i in range(4)))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"prompt": f"task {i}", "response": "x"}) + "\n"
                                              for i in range(24)))
    (tmp_path / "th.jsonl").write_text("".join(json.dumps({"prompt": f"task held {i}", "response": "x"}) + "\n"
                                               for i in range(6)))
    raw["data"] = {"attack": {"source": "a.jsonl", "domain_field": "category"},
                   "eval": {"source": "e.jsonl", "domain_field": "category"}}
    raw["defences"][1]["immunised_on"] = ["cyber"]
    raw["space"]["attack_domain"] = {"grid": DOMAINS}
    raw["conditions"] = {"stability": {"tolerance": 0.05}, "generalisation": {},
                         "trainability": {"data": {"source": "t.jsonl"}, "eval": {"source": "th.jsonl"},
                                          "target_loss": 0.5, "attacker": {"dataset_size": 16}}}
    raw.update(over)
    return raw


def test_a_complete_conditions_block_passes_and_resolves_the_task_paths(tmp_path):
    raw = with_domains(tmp_path)
    assert checked(tmp_path, raw) == []
    sp = load_raw(tmp_path, raw)
    assert sp.conditions.trainability.data.source == str((tmp_path / "t.jsonl").resolve())
    assert [a["attack_domain"] for a in sp.attackers()].count("cyber") == 4


@pytest.mark.parametrize("change, expect", [
    (lambda r: r.pop("utility"), "conditions.stability: needs a capability score at release"),
    (lambda r: r["data"]["eval"].pop("domain_field"), "conditions.generalisation: data.eval.domain_field is not set"),
    (lambda r: r["space"].pop("attack_domain"), "attackers must attack domain by domain; add a space dimension"),
    (lambda r: r["defences"][1].pop("immunised_on"), "conditions.generalisation: no defence declares immunised_on"),
    (lambda r: (r["data"]["attack"].pop("domain_field"), r["conditions"].pop("generalisation")),
     "space.attack_domain: attackers train on one harm domain, but data.attack.domain_field is not set"),
    (lambda r: r["conditions"]["trainability"].pop("target_loss"), "give exactly one of target_loss"),
    (lambda r: r["conditions"]["trainability"].update(target_match=0.8),
     "give exactly one of target_loss"),
    (lambda r: r["conditions"]["trainability"].pop("eval"), "conditions.trainability.eval: required field is missing"),
    (lambda r: r["conditions"]["trainability"]["attacker"].update(stages=[{"steps": 3}]), "drop stages"),
    (lambda r: r["conditions"].update(resistance={}), "conditions.resistance: unknown key"),
])
def test_a_condition_without_its_data_is_one_line_at_load(tmp_path, change, expect):
    raw = with_domains(tmp_path)
    change(raw)
    assert expect in one_line(error_of(tmp_path, raw))


@pytest.mark.parametrize("change, expect", [
    (lambda p, r: r["space"].update(attack_domain={"grid": ["cyber", "violence"]}),
     "space.attack_domain: 'violence' is not a domain of data.attack (its domains: cyber, theft)"),
    (lambda p, r: r["defences"][1].update(immunised_on=["cybr"]),
     "defences.1.immunised_on: 'cybr' is not a domain of data.attack"),
    (lambda p, r: p.joinpath("e.jsonl").write_text('{"prompt": "q", "response": "r"}\n'),
     "data.eval.domain_field: row 1 of"),
    (lambda p, r: p.joinpath("th.jsonl").write_text('{"prompt": "task 3", "response": "x"}\n'),
     "conditions.trainability.eval: 1 prompt(s) also in conditions.trainability.data"),
    (lambda p, r: p.joinpath("t.jsonl").write_text("".join(
        json.dumps({"prompt": f"attack cyber {i}", "response": "x"}) + "\n" for i in range(20))),
     "conditions.trainability.data: 20 prompt(s) also in data.attack"),
    (lambda p, r: r["conditions"]["trainability"]["attacker"].update(dataset_size=30),
     "conditions.trainability.attacker.dataset_size: 30 exceeds the 24 rows"),
    (lambda p, r: r["conditions"]["trainability"].update(data={"source": "./missing.jsonl"}),
     "conditions.trainability.data.source: no such file"),
    (lambda p, r: r["conditions"]["stability"].update(lm_eval={"tasks": ["no_such_task_xyz"]}),
     "conditions.stability.lm_eval:"),
])
def test_the_data_a_condition_reads_is_checked_before_ray(tmp_path, change, expect):
    raw = with_domains(tmp_path)
    change(tmp_path, raw)
    assert expect in one_line(check_error(tmp_path, raw))


def test_attackers_larger_than_a_domain_are_refused(tmp_path):
    raw = with_domains(tmp_path)
    raw["space"]["dataset_size"] = 48   # 80 attack rows, but 40 per domain
    from orchestrator.spec import preflight

    with pytest.raises(S.SpecError) as err:
        preflight.check(load_raw(tmp_path, raw), checkpoints=False)
    assert "space.dataset_size: 48 exceeds the 40 rows of domain 'cyber'" in one_line(str(err.value))


def test_validate_prints_the_condition_error_in_one_line(tmp_path, capsys):
    import yaml

    raw = with_domains(tmp_path)
    raw.pop("utility")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "spec.yaml"), "--skip-checkpoint-checks"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "conditions.stability: needs a capability score" in err[0]


def test_the_new_fields_at_their_defaults_leave_every_key_unchanged(tmp_path):
    """domain_field, attack_domain, immunised_on and conditions absent or null: the same keys (the
    pinned keys of test_spec_rules hold); set, they change the keys of what they change."""
    plain = load_raw(tmp_path, minimal(tmp_path))
    nulls = minimal(tmp_path, conditions=None)
    nulls["defences"][1]["immunised_on"] = None
    nulls["data"]["attack"]["domain_field"] = None
    nulls["space"]["attack_domain"] = None
    explicit = load_raw(tmp_path, nulls)
    trial = {"defence": "def", **plain.attackers()[0]}
    assert sweep.trial_key(explicit, trial) == sweep.trial_key(plain, trial)
    assert sweep.spec_digest(explicit) == sweep.spec_digest(plain)
    assert sweep.search_key(explicit) == sweep.search_key(plain)
    assert "attack_domain" not in plain.attackers()[0]
    domained = load_raw(tmp_path, with_domains(tmp_path))
    keys = {sweep.trial_key(domained, {"defence": "def", **a}) for a in domained.attackers()}
    assert len(keys) == len(domained.attackers())   # cyber and theft attackers are different trials
    assert sweep.spec_digest(domained) != sweep.spec_digest(plain)


def test_conditions_and_immunised_on_never_restart_an_adversarys_search(tmp_path):
    """Conditions are judged after the attacks: adding them, or changing a tolerance, keeps the
    search key (an adaptive search resumes its recorded trials) and every trial key."""
    raw = with_domains(tmp_path)
    with_conditions = load_raw(tmp_path, raw)
    changed = json.loads(json.dumps(raw))
    changed["conditions"]["stability"]["tolerance"] = 0.2
    changed["defences"][1]["immunised_on"] = ["theft"]
    without = json.loads(json.dumps(raw))
    without.pop("conditions")
    keys = {sweep.search_key(load_raw(tmp_path, r)) for r in (raw, changed, without)}
    assert len(keys) == 1
    trial = {"defence": "def", **with_conditions.attackers()[0]}
    assert sweep.trial_key(load_raw(tmp_path, without), trial) == sweep.trial_key(with_conditions, trial)
    assert sweep.spec_digest(load_raw(tmp_path, changed)) != sweep.spec_digest(with_conditions)


def test_a_defenders_own_data_must_not_reach_the_attack_or_eval_split(tmp_path):
    raw = with_domains(tmp_path)
    (tmp_path / "def.jsonl").write_text("".join(json.dumps({"prompt": p, "response": "no"}) + "\n" for p in
                                                ["held out cyber 1", "HELD  out theft 2", "unrelated"]))
    raw["defences"][1]["defender_data"] = {"source": "def.jsonl"}
    msg = one_line(check_error(tmp_path, raw))
    assert "defences.1.defender_data: 2 prompt(s) of data.eval are in def's own training data" in msg
    assert "'held out cyber 1'" in msg and "'held out theft 2'" in msg and "held-out prompts" in msg
    (tmp_path / "def.jsonl").write_text(json.dumps({"prompt": "attack theft 7", "response": "no"}) + "\n")
    assert "1 prompt(s) of data.attack are in def's own training data" in check_error(tmp_path, raw)
    (tmp_path / "def.jsonl").write_text(json.dumps({"prompt": "something else", "response": "no"}) + "\n")
    assert checked(tmp_path, raw) == []
    sp = load_raw(tmp_path, raw)   # the defender's data is no part of what a trial loads
    assert sp.defences[1].defender_data.source == str((tmp_path / "def.jsonl").resolve())
    assert "defender_data" not in sp.defences[1].checkpoint()


def test_a_hub_split_is_read_where_the_hub_answers_and_else_noted(tmp_path, monkeypatch):
    from orchestrator.spec import checkpoints

    raw = with_domains(tmp_path)
    raw["defences"][1]["defender_data"] = {"source": "org/defender-set"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notes = checked(tmp_path, raw)
    assert any("defences.1.defender_data: 'org/defender-set' is not a local path" in n and "HF_HUB_OFFLINE" in n
               for n in notes)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(checkpoints, "hub_offline", lambda: None)   # as if the hub answered: the read is tried
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")                  # ... and fails fast here, with no network
    notes = checked(tmp_path, raw)
    assert any("'org/defender-set' is not a local path and could not be read here" in n for n in notes), notes
