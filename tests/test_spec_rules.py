"""The spec's failure-rule blocks: evaluators (one primary), utility, crossing; bad input to
them is one line before Ray starts; and trial keys recorded before these fields existed stay
valid."""

import pytest
from test_spec import error_of, load_raw, minimal

from orchestrator import spec as S
from orchestrator import sweep
from orchestrator.spec import preflight
from trainables.config import AttackConfig, Evaluation


def with_utility(tmp_path, **utility) -> dict:
    (tmp_path / "u.jsonl").write_text("".join(f'{{"prompt": "benign {i}", "response": "ok"}}\n' for i in range(6)))
    return minimal(tmp_path, utility={"data": {"source": "u.jsonl"}, **utility})


def checked(tmp_path, raw) -> list[str]:
    """preflight's notes for `raw` (attackers drawing 32 of the 40 attack rows)."""
    raw["space"]["dataset_size"] = 32
    notes = preflight.check(load_raw(tmp_path, raw), checkpoints=False)  # 'org/model' is no real model
    return [n for n in notes if not n.startswith("checkpoints not checked")]


def check_error(tmp_path, raw) -> str:
    with pytest.raises(S.SpecError) as err:
        checked(tmp_path, raw)
    return str(err.value)


def one_line(msg: str) -> str:
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def test_evaluators_list_puts_the_primary_first(tmp_path):
    sp = load_raw(tmp_path, minimal(tmp_path, evaluators=[
        {"name": "nll", "label": "ref"}, {"name": "refusal_keyword", "primary": True}]))
    assert sp.evaluator.name == "refusal_keyword" and [e.key for e in sp.all_evaluators] == ["refusal_keyword", "ref"]
    cleared = load_raw(tmp_path, minimal(tmp_path, evaluator=None, evaluators=[{"name": "nll"}]))   # evaluator=null
    assert cleared.evaluator.name == "nll"
    single = load_raw(tmp_path, minimal(tmp_path, evaluators=[{"name": "nll"}]))
    assert single.evaluator.name == "nll" and single.evaluators == []   # one listed: it is the primary


@pytest.mark.parametrize("raw, expect", [
    ({"evaluators": [{"name": "refusal_keyword"}, {"name": "nll"}]}, "evaluators: mark exactly one with primary: true"),
    ({"evaluators": [{"name": "refusal_keyword", "primary": True}, {"name": "nll", "primary": True}]},
     "found 2"),
    ({"evaluators": [{"name": "refusal_keyword", "primary": True}, {"name": "refusal_keyword"}]},
     "'refusal_keyword' is listed twice; give each a distinct label"),
    ({"evaluators": [{"name": "refusal_keyword", "primary": True}, {"name": "jduge"}]},
     "evaluators[jduge]: unknown evaluator 'jduge'; known: "),
    ({"evaluator": {"name": "refusal_keyword", "options": {"max_new_tokens": 0}}},
     "evaluator.options.max_new_tokens: Input should be greater than 0"),
    ({"evaluator": {"name": "refusal_keyword"}, "evaluators": [{"name": "nll", "primary": True}]},
     "give either evaluator: (one) or evaluators:"),
    ({"crossing": "lower_bound", "evaluator": {"name": "nll"}}, "crossing: lower_bound needs"),
    ({"crossing": "upper"}, "crossing: Input should be 'point' or 'lower_bound'"),
])
def test_bad_evaluator_blocks_are_one_line(tmp_path, raw, expect):
    msg = one_line(error_of(tmp_path, minimal(tmp_path, **raw)))
    assert msg.startswith("spec error: ") and expect in msg, msg


@pytest.mark.parametrize("utility, expect", [
    ({"epsilon": 1.5}, "utility.epsilon: Input should be less than or equal to 1"),
    ({"epsilon": -0.1}, "utility.epsilon: Input should be greater than or equal to 0"),
    ({"score": "bleu"}, "utility.score: Input should be 'answer_probability' or 'answered'"),
])
def test_bad_utility_values(tmp_path, utility, expect):
    assert expect in one_line(error_of(tmp_path, with_utility(tmp_path, **utility)))


def test_utility_split_must_exist_be_held_out_and_have_answers(tmp_path):
    raw = with_utility(tmp_path)
    raw["utility"]["data"]["source"] = "./missing.jsonl"
    assert "utility.data.source: no such file" in one_line(check_error(tmp_path, raw))
    # overlapping the attack data ("p" is every attack prompt)
    (tmp_path / "u.jsonl").write_text('{"prompt": "P ", "response": "x"}\n{"prompt": "fine", "response": "y"}\n')
    msg = one_line(check_error(tmp_path, minimal(tmp_path, utility={"data": {"source": "u.jsonl"}})))
    assert "utility.data: 1 prompt(s) also in data.attack" in msg
    (tmp_path / "u.jsonl").write_text('{"prompt": "fine"}\n')
    msg = one_line(check_error(tmp_path, minimal(tmp_path, utility={"data": {"source": "u.jsonl"}})))
    assert "utility.data: data source" in msg and "has no field 'response'" in msg
    ok = minimal(tmp_path, utility={"data": {"source": "u.jsonl", "response_field": None}, "score": "answered"})
    assert checked(tmp_path, ok) == []


def test_a_spec_without_utility_is_told_what_it_risks(tmp_path):
    notes = checked(tmp_path, minimal(tmp_path))
    assert any("no utility block" in n and "counts as a successful attack" in n for n in notes)
    assert checked(tmp_path, with_utility(tmp_path)) == []


def test_the_stopping_rule_is_declared_once():
    shared = set(Evaluation.model_fields)
    assert {"phi", "eval_every", "eval_schedule", "refine", "max_steps", "utility", "crossing"} <= shared
    assert shared <= set(S.SweepSpec.model_fields) and shared <= set(AttackConfig.model_fields)
    for cls in (S.SweepSpec, AttackConfig):   # inherited, not redeclared
        assert issubclass(cls, Evaluation) and not shared & set(cls.__dict__.get("__annotations__", {}))


def test_trial_keys_recorded_before_the_new_fields_stay_valid():
    """Keys computed by the code before utility, evaluators, crossing and labels existed
    (commit e757b95) for this spec: a rerun must find those records, not rerun them."""
    raw = {"name": "keys", "defences": [{"name": "base", "model": "/nonexistent/base", "base": True},
                                        {"name": "d", "model": "/nonexistent/d"}],
           "data": {"attack": {"source": "/x/attack.jsonl"}, "eval": {"source": "/x/eval.jsonl"},
                    "chat_template": True},
           "evaluator": {"name": "refusal_keyword", "options": {"max_new_tokens": 4}},
           "phi": 0.5, "eval_every": 5, "max_steps": 20,
           "space": {"learning_rate": {"grid": [1e-4, 3e-3]}, "finetune": {"grid": ["full", "lora"]}}}
    # issue 30: those records were measured without the coherence gate, so they are the trials of a
    # spec that turns it off; the default (gate on) measures something else and reruns them
    gated = S.from_dict(raw)
    sp = S.from_dict({**raw, "coherence": {"enabled": False}})
    first, second = ({"defence": "d", **a} for a in sp.attackers()[:2])
    assert sweep.trial_key(gated, first) != sweep.trial_key(sp, first)
    assert sweep.trial_key(sp, first) == "052350a25cfea4856d24124c7d1eb7778c241bf69eef42626555a55a2437b115"
    assert sweep.trial_key(sp, second) == "9abd5f64ef1a8712c17f5118df47b38c30db0c253d0e626b16a318a98e0c8756"
    assert sweep.search_key(sp) == "67bd580a53df4ba8"
    assert sweep.spec_digest(sp) == "5fcdf9c10b0f717238e1a2f5328bccac9bd59f624b9b7ca377a39268ed9b2ffe"
    # a new field set away from its default is a different trial
    bounded = S.from_dict({**raw, "utility": {"data": {"source": "/x/u.jsonl"}}})
    assert sweep.trial_key(bounded, first) != sweep.trial_key(sp, first)
    assert sweep.trial_key(S.from_dict({**raw, "crossing": "lower_bound"}), first) != sweep.trial_key(sp, first)
