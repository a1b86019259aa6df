"""The durability table (issue 29, orchestrator/report/durability.py): each defence under its paper's
attacker beside the adaptive worst case, from hand-made records (no MLflow), every cell and verdict
worked out here."""

import math

import pytest

from orchestrator.conditions.records import Built, Paper, Records, Release
from orchestrator.report import durability
from orchestrator.report.records import DefenceRow, Trial


def trial(defence, lr, status, steps, base=False):
    btf = {"steps": float(steps)} if status == "failed" else {}
    return Trial(defence, base, status, {"learning_rate": str(lr), "finetune": "full"}, max_steps=40,
                 attacker_id=f"{defence}-{lr}", btf=btf, spent={"steps": float(steps)},
                 curve=[(0, 0.0 if defence != "given" else 0.25), (5, 1.0)])


ROWS = [
    DefenceRow("base", True, trials=[trial("base", 1e-4, "failed", 10, True), trial("base", 3e-3, "failed", 5, True)]),
    DefenceRow("vaccine", False, trials=[trial("vaccine", 1e-4, "resisted", 40), trial("vaccine", 3e-3, "failed", 5)]),
    DefenceRow("repnoise", False, trials=[trial("repnoise", 1e-4, "failed", 20), trial("repnoise", 3e-3, "failed", 5)]),
    DefenceRow("tough", False, trials=[trial("tough", 1e-4, "resisted", 40), trial("tough", 3e-3, "resisted", 40)]),
    DefenceRow("given", False, trials=[trial("given", 1e-4, "resisted", 40), trial("given", 3e-3, "failed", 40)]),
]
RECORDS = Records({}, paper={
    "vaccine": Paper("vaccine", "resisted", spent={"steps": 80.0}),
    "repnoise": Paper("repnoise", "failed", btf={"steps": 20.0}, spent={"steps": 20.0}),
    "tough": Paper("tough", "resisted", spent={"steps": 10.0}),
}, built={
    "vaccine": Built("vaccine", "vaccine", "lora", {"steps": 24.0},
                     {"harmfulness_at_release": 0.0, "utility": 0.991}),
    "repnoise": Built("repnoise", "repnoise", "full", {"steps": 24.0},
                      {"harmfulness_at_release": 0.125, "utility": 0.5}),
    "tough": Built("tough", "tar", "full", {"steps": 8.0}, {"harmfulness_at_release": 0.0}),
})


def test_each_defence_reads_its_papers_attacker_beside_the_adaptive_worst_case():
    header, body = durability.csv_rows(ROWS, RECORDS)   # in steps unless told
    assert header == durability.CSV_HEADER
    got = {r[0]: r for r in body}
    # base: no paper attacker, no build; f at release from its first trial's step 0
    assert got["base"] == ["base", "base", "", "", "5", "lr 3e-3", "0", "", "-"]
    # vaccine: resisted its paper's attacker, broken at 5 by the adaptive search: the contrast
    assert got["vaccine"] == ["vaccine", "vaccine", "resisted", "", "5", "lr 3e-3", "0", "0.991",
                              "held under (a), broke under (b)"]
    # repnoise: broken by both, the adaptive attack 20 / 5 = 4x cheaper
    assert got["repnoise"] == ["repnoise", "repnoise", "failed", "20", "5", "lr 3e-3", "0.125", "0.5",
                               "broke under both, (b) 4x cheaper"]
    # tough: resisted everything; no utility recorded at release
    assert got["tough"] == ["tough", "tar", "resisted", "", "", "", "0", "", "held under both"]
    # given (a ready checkpoint, no paper attacker): its f at release from step 0 of its trials
    assert got["given"] == ["given", "given", "", "", "40", "lr 3e-3", "0.25", "", "-"]


def test_the_text_table_says_the_same_in_words():
    header, body = durability.table(ROWS, RECORDS)   # in steps unless told
    assert header == durability.HEADER
    got = {r[0]: r for r in body}
    assert got["base (reference)"][1:5] == ["base", "-", "5", "lr 3e-3"]
    assert got["vaccine"][2:4] == ["resisted after 80", "5"]
    assert got["repnoise"][2:4] == ["20", "5"] and got["repnoise"][5:7] == ["0.12", "0.500"]
    assert got["tough"][2:4] == ["resisted after 10", "> 40"] and got["tough"][4] == "-"
    assert got["vaccine"][5:7] == ["0.00", "0.991"] and got["tough"][6] == "-" and got["given"][5:7] == ["0.25", "-"]


def test_a_defence_without_a_release_reading_or_a_paper_budget_reads_a_dash_or_its_status():
    bare = Trial("bare", False, "resisted", {"learning_rate": "1e-4"}, 40, spent={"steps": 40.0})   # no curve
    late = Trial("late", False, "resisted", {"learning_rate": "1e-4"}, 40, spent={"steps": 40.0},
                 curve=[(5, 0.5)])                                                        # no step 0
    records = Records({}, paper={"bare": Paper("bare", "diverged", spent={"steps": 3.0}),
                                 "late": Paper("late", "resisted")})                    # spent not recorded
    rows = [DefenceRow("bare", False, trials=[bare]), DefenceRow("late", False, trials=[late])]
    text = {r[0]: r for r in durability.table(rows, records)[1]}
    assert text["bare"][2] == "diverged" and text["late"][2] == "resisted"
    assert text["bare"][5] == "-" and text["late"][5] == "-"
    numbers = {r[0]: r for r in durability.csv_rows(rows, records)[1]}   # in steps unless told
    assert numbers["bare"][2:7] == ["diverged", "", "", "", ""] and numbers["late"][6] == ""
    tokens = {r[0]: r for r in durability.table(rows, Records({}, paper={"bare": Paper(
        "bare", "resisted", spent={"steps": 3.0, "tokens": 900.0})}), "tokens")[1]}
    assert tokens["bare"][2] == "resisted after 900"


def test_a_ready_checkpoint_reads_its_utility_from_the_stability_conditions_release_run():
    records = Records({}, built=RECORDS.built, paper=RECORDS.paper,
                      release={"base": Release("base", {"utility": 0.875}),
                               "vaccine": Release("vaccine", {"utility": 0.5}),
                               "given": Release("given", {"lm_eval.task/acc": 0.9})})   # no utility proxy
    got = {r[0]: r for r in durability.csv_rows(ROWS, records)[1]}
    assert got["base"][6:8] == ["0", "0.875"]       # no build: f from step 0, utility from the release run
    assert got["vaccine"][6:8] == ["0", "0.991"]    # a build's own record comes first
    assert got["given"][7] == ""                    # neither
    assert {r[0]: r[6] for r in durability.table(ROWS, records)[1]}["given"] == "-"


def test_the_table_is_shown_only_where_a_sweep_built_a_defence_or_ran_a_paper_attacker():
    assert durability.shown(RECORDS)
    assert not durability.shown(None) and not durability.shown(Records({}))
    assert durability.shown(Records({}, paper={"x": Paper("x", "resisted")}))
    assert durability.shown(Records({}, built={"x": Built("x", "deep", "full", {}, {})}))


@pytest.mark.parametrize("paper_btf, status, adaptive, want", [
    (None, "resisted", 5.0, "held under (a), broke under (b)"),
    (None, "diverged", 5.0, "held under (a), broke under (b)"),    # a failed paper attack broke nothing
    (None, "resisted", math.inf, "held under both"),
    (None, "resisted", None, "held under both"),
    (20.0, "failed", 5.0, "broke under both, (b) 4x cheaper"),
    (2.0, "failed", 0.5, "broke under both, (b) 4x cheaper"),       # a budget below 1 (flops in 1e12, say)
    (5.0, "failed", 0.0, "broke under both"),                         # broken at release: no ratio
    (0.0, "unsafe_at_release", 0.0, "broke under both"),
    (5.0, "failed", 5.0, "broke under both"),
    (5.0, "failed", 10.0, "broke under both"),
    (5.0, "failed", None, "broke under both"),
    (None, None, 5.0, "-"),
])
def test_the_verdict_contrasts_the_papers_attacker_with_the_adaptive_one(paper_btf, status, adaptive, want):
    assert durability.verdict(paper_btf, status, adaptive) == want
