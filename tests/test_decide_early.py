"""decide_early: a point stops being scored once its crossing decision cannot change. The
arithmetic against brute force over every outcome, the parts against full scoring, whole
trials against the same trials scored in full, and the spec rules that keep it exact."""

import functools
import math
import random

import pytest
import torch
from conftest import attack_dict
from test_spec import error_of, minimal

from orchestrator import spec as S
from orchestrator import sweep
from trainables import AttackConfig, run_attack
from trainables.evaluators import base as B
from trainables.names import PROMPTS_SCORED

pytestmark = pytest.mark.usefixtures("one_thread")

CROSSINGS = [("point", 0.95), ("lower_bound", 0.95), ("lower_bound", 0.6)]
PHIS = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 1.0]


def brute(n: int, phi: float, crossing: str, level: float):
    """Over every way the unscored items can turn out (harmful, refusal, or None: malformed):
    `outcomes(h, s, c)` the decisions full scoring can still reach after h harmful, s refusals and
    c malformed verdicts, and `fewest(h, s, c)` the fewest further items that can make it safe."""
    def crosses(k: int, m: int) -> bool:   # what attack.py decides on a full Scores
        if m == 0:
            return False   # f is nan: never > phi
        s = B.Scores.binary([1.0] * k + [0.0] * (m - k))
        return (s.interval(level)[0] if crossing == "lower_bound" else s.f) > phi

    @functools.cache
    def outcomes(h: int, s: int, c: int) -> frozenset[bool]:
        if h + s + c == n:
            return frozenset([crosses(h, h + s)])
        return outcomes(h + 1, s, c) | outcomes(h, s + 1, c) | outcomes(h, s, c + 1)

    @functools.cache
    def fewest(h: int, s: int, c: int) -> float:
        if outcomes(h, s, c) == {False}:
            return 0
        if h + s + c == n:
            return math.inf
        return 1 + min(fewest(h + 1, s, c), fewest(h, s + 1, c), fewest(h, s, c + 1))

    return outcomes, fewest


@pytest.mark.parametrize("crossing, level", CROSSINGS)
def test_refusals_to_safety_equals_brute_force_over_every_outcome(crossing, level):
    for n in [*range(1, 14), 17]:   # small, odd and even
        for phi in PHIS:
            outcomes, fewest = brute(n, phi, crossing, level)
            for h in range(n + 1):
                for s in range(n + 1 - h):
                    for c in range(n + 1 - h - s):
                        j = B.refusals_to_safety(h, h + s, n - h - s - c, phi, crossing, level)
                        want = fewest(h, s, c)
                        assert j == (None if want == math.inf else want), (n, phi, h, s, c)
                        # None: crosses whatever comes; 0: cannot cross whatever comes
                        assert (j is None) == (outcomes(h, s, c) == {True}), (n, phi, h, s, c)


def test_the_issues_example_and_the_edges():
    assert B.refusals_to_safety(0, 0, 40, 0.5) == 20    # 20 refusals of 40 decide safety at phi 0.5
    assert B.refusals_to_safety(21, 21, 19, 0.5) is None   # 21 harmful answers decide a crossing
    assert B.refusals_to_safety(20, 20, 20, 0.5) == 20
    assert B.refusals_to_safety(0, 0, 40, 1.0) == 0     # phi 1: nothing can cross, nothing is scored
    assert B.refusals_to_safety(0, 0, 7, 0.0) == 7      # phi 0: every prompt must be a refusal
    assert B.refusals_to_safety(1, 1, 6, 0.0) is None
    # Wilson's lower end is what moves: 14 refusals of 24 bring it to 10/24's, 0.245 <= 0.25
    assert B.refusals_to_safety(0, 0, 24, 0.25, "lower_bound") == 14


def test_wilson_moves_one_way_with_each_verdict():
    """What makes the extremes suffice: a refusal never raises either end of the interval, a
    harmful verdict never lowers it (exactly, not within rounding)."""
    for level in (0.5, 0.8, 0.95, 0.99):
        for n in range(1, 120):
            for k in range(n + 1):
                lo, hi = B.wilson(k, n, level)
                refusal, harmful = B.wilson(k, n + 1, level), B.wilson(k + 1, n + 1, level)
                assert refusal[0] <= lo and refusal[1] <= hi and harmful[0] >= lo and harmful[1] >= hi


def test_a_bounded_point_brackets_whatever_full_scoring_would_say():
    for n in range(1, 10):
        for scored in range(n):
            for k in range(scored + 1):
                for malformed in range(scored - k + 1):
                    verdicts = [1.0] * k + [None] * malformed + [0.0] * (scored - k - malformed)
                    r = n - scored
                    early = B.Scores.bounded(verdicts, r)
                    assert early.unscored == r and early.n == scored - malformed and early.malformed == malformed
                    assert len(early.verdicts) == n
                    lo, hi = early.interval(0.9)
                    assert lo <= early.f <= hi
                    for a in range(r + 1):
                        for b in range(r + 1 - a):   # a harmful, b refusals, the rest malformed
                            full = B.Scores.binary(verdicts + [1.0] * a + [0.0] * b + [None] * (r - a - b))
                            if full.n:
                                assert full.f <= early.f
                                flo, fhi = full.interval(0.9)
                                assert lo <= flo and fhi <= hi


class Preset:
    """An evaluator over items whose reference response is its verdict ("1", "0", "?": malformed);
    counts the items it scored."""

    def __init__(self):
        self.scored = 0

    def __call__(self, ctx: B.EvalContext) -> B.Scores:
        self.scored += len(ctx.items)
        return B.Scores.binary([None if it.response == "?" else float(it.response) for it in ctx.items],
                               {"calls": 1.0})


@pytest.mark.parametrize("crossing, level", CROSSINGS)
def test_scoring_in_parts_decides_as_full_scoring(crossing, level):
    rng = random.Random(0)
    early_ones = 0
    for _ in range(400):
        n = rng.randint(1, 30)
        p_harm, phi = rng.random(), rng.choice(PHIS)
        items = [B.EvalItem(f"p{i}", rng.choices(["1", "0", "?"], [p_harm, 1 - p_harm, 0.1])[0]) for i in range(n)]
        full = Preset()(B.EvalContext(None, None, items))
        ev = Preset()
        got = B.score_until_decided(ev, B.EvalContext(None, None, items), phi, crossing, level)
        decide = (lambda s: s.interval(level)[0]) if crossing == "lower_bound" else (lambda s: s.f)
        assert (decide(got) > phi) == (decide(full) > phi)
        if got.unscored:
            early_ones += 1
            assert not decide(got) > phi   # only safety is decided early
            assert got.n + got.malformed + got.unscored == n and ev.scored == n - got.unscored
            assert got.verdicts[:n - got.unscored] == full.verdicts[:n - got.unscored]
            assert math.isnan(full.f) or got.f >= full.f
            if crossing == "point":
                assert got.f <= phi
        else:
            assert got == full   # scored in full: the evaluator's own Scores, extras and all
    assert early_ones > 100


def test_a_non_binary_primary_is_refused_at_its_first_part():
    items = [B.EvalItem(f"p{i}", None) for i in range(8)]
    with pytest.raises(ValueError, match="decide_early: the primary evaluator gave no yes/no verdict"):
        B.score_until_decided(lambda ctx: B.Scores(0.1), B.EvalContext(None, None, items), 0.5)


def test_parts_generate_in_the_whole_points_batches(world, monkeypatch):
    """A part's answers are generated in the batches full scoring uses (same padding, so the same
    numbers), each batch once, and read the same text."""
    from transformers import AutoModelForCausalLM

    from trainables.checkpoint import load_tokenizer
    from trainables.config import Checkpoint

    tok = load_tokenizer(Checkpoint(model=str(world / "base")))
    model = AutoModelForCausalLM.from_pretrained(world / "base")
    items = [B.EvalItem(f"<bos>user : question {'x ' * (i % 4)}{i} assistant :", None) for i in range(11)]
    whole = B.EvalContext(model, tok, items).responses(4, batch_size=4)

    calls = []
    real = B.generate_ids
    monkeypatch.setattr(B, "generate_ids", lambda m, t, prompts, *a: calls.append(prompts) or real(m, t, prompts, *a))
    ctx = B.EvalContext(model, tok, items)
    assert ctx.part(2, 6).responses(4, batch_size=4) == whole[2:6]
    assert ctx.generated == [*whole[:8], None, None, None]   # batches 0 and 1 only
    assert ctx.part(6, 9).responses(4, batch_size=4) == whole[6:9]
    assert ctx.responses(4, batch_size=4) == whole
    batches = [[it.prompt for it in items[i:i + 4]] for i in (0, 4, 8)]
    assert calls == batches


def toy_answers(world, name: str, noise: float):
    """A toy-world model (its weights perturbed by `noise`, seeded, for answers of every kind:
    refusals early and late, compliance, gibberish) and 23 held-out prompts as trials see them."""
    import json

    from transformers import AutoModelForCausalLM

    from trainables import data as D
    from trainables.checkpoint import load_tokenizer
    from trainables.config import Checkpoint, Data

    tok = load_tokenizer(Checkpoint(model=str(world / name)))
    model = AutoModelForCausalLM.from_pretrained(world / name)
    g = torch.Generator().manual_seed(round(noise * 1000))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    rows = [json.loads(x) for x in (world / "eval.jsonl").read_text().splitlines()][:23]
    fmt = Data(attack={"source": str(world / "attack.jsonl")}, eval={"source": str(world / "eval.jsonl")})
    return model, tok, [D.format_prompt(tok, r["prompt"], fmt) for r in rows]


@pytest.mark.parametrize("name, noise", [("base", 0.0), ("noised", 0.0), ("base", 0.8), ("rescaled", 1.0),
                                         ("base", 1.5)])
def test_a_batch_ends_once_every_answer_is_decided_and_is_full_generation_until_then(world, name, noise):
    """generate_ids with stop_when: a batch that ran to its end is full generation's, token for
    token; a batch cut short holds only answers decided (holding a marker the full answer holds)
    or ended, each the start of its full answer, and ran fewer forward passes."""
    from trainables.evaluators import refuses

    model, tok, prompts = toy_answers(world, name, noise)
    passes = []
    model.register_forward_hook(lambda *a: passes.append(1))
    full = B.generate_ids(model, tok, prompts, 10, 5)
    n_full = len(passes)
    cut: set[int] = set()
    stopped = B.generate_ids(model, tok, prompts, 10, 5, stop_when=refuses, cut=cut)
    n_stopped = len(passes) - n_full
    for b in range(0, len(prompts), 5):
        rows, whole = stopped[b:b + 5], full[b:b + 5]
        if b // 5 not in cut:
            assert rows == whole
            continue
        for a, f in zip(rows, whole, strict=True):
            assert len(a) < len(f) and a == f[:len(a)]
            if tok.eos_token_id not in a:   # not ended: decided, on the full answer's first tokens
                assert refuses(tok.decode(a, skip_special_tokens=True))
                assert refuses(tok.decode(f, skip_special_tokens=True))
    def settled(f: list[int]) -> int:   # the first tokens of a full answer that decide or end it
        return next((k for k in range(1, len(f) + 1) if tok.eos_token_id in f[:k]
                     or refuses(tok.decode(f[:k], skip_special_tokens=True))), len(f) + 1)

    cuttable = set()
    for b in range(0, len(prompts), 5):   # every answer settled before the last token, one not ended
        k = max(map(settled, full[b:b + 5]))
        if k < 10 and any(tok.eos_token_id not in f[:k] for f in full[b:b + 5]):
            cuttable.add(b // 5)
    assert cut == cuttable
    assert (n_stopped < n_full) == bool(cut)


def test_a_cut_is_read_from_the_answers_even_where_generate_copies_the_criterion(world, monkeypatch):
    """A transformers that deep-copies its stopping criteria (some versions did) still gets each
    batch's cut right: it is read from the answers, not from the criterion's state."""
    import copy

    from trainables.evaluators import refuses

    model, tok, prompts = toy_answers(world, "base", 0.0)   # every answer refuses early
    real = B._criteria
    monkeypatch.setattr(B, "_criteria", lambda d: real(copy.deepcopy(d)))
    cut: set[int] = set()
    stopped = B.generate_ids(model, tok, prompts, 10, 5, stop_when=refuses, cut=cut)
    assert cut == set(range(5)) and all(len(a) < 10 for a in stopped)


def test_the_stop_cases_cover_cut_and_whole_batches(world):
    """The cases above are not vacuous: batches cut short and batches that run to their end."""
    from trainables.evaluators import refuses

    kinds = set()
    for name, noise in [("base", 0.0), ("noised", 0.0), ("base", 0.8)]:
        model, tok, prompts = toy_answers(world, name, noise)
        cut: set[int] = set()
        B.generate_ids(model, tok, prompts, 10, 5, stop_when=refuses, cut=cut)
        kinds |= {b in cut for b in range(5)}
    assert kinds == {True, False}


def test_a_whole_point_reads_only_batches_that_ran_to_their_end(world, monkeypatch):
    """stop_parts: a part may cut a batch short; the whole point generates again exactly the
    batches a part cut (reads the others), and `generated` (the saved text) never holds a cut one."""
    from trainables.evaluators import refuses

    model, tok, prompts = toy_answers(world, "noised", 0.0)
    answers = B.generate(model, tok, prompts, 10, 4)
    refusing = [p for p, a in zip(prompts, answers, strict=True) if refuses(a)]
    other = [p for p, a in zip(prompts, answers, strict=True) if not refuses(a)]
    assert len(refusing) >= 8 and other
    # batch 0 all refusals (cut), batch 1 one answer that does not refuse (runs to its end)
    items = [B.EvalItem(p, None) for p in [*refusing[:4], other[0], *refusing[4:7], *refusing[:3]]]
    full = B.EvalContext(model, tok, items).responses(10, batch_size=4)
    calls = []
    real = B.generate_ids
    monkeypatch.setattr(B, "generate_ids", lambda m, t, prompts, n, size, synced, stop=None, cut=None:
                        calls.append(stop is not None) or real(m, t, prompts, n, size, synced, stop, cut))
    ctx = B.EvalContext(model, tok, items, stop_parts=True)
    part = ctx.part(0, 8).responses(10, batch_size=4, stop_when=refuses)
    assert calls == [True, True]
    assert [refuses(a) for a in part] == [refuses(a) for a in full[:8]]
    assert all(f.startswith(a) for a, f in zip(part, full[:8], strict=True)) and part[4:] == full[4:8]
    assert part[:4] != full[:4]   # batch 0 was cut
    assert ctx.generated == [None] * 4 + full[4:8] + [None] * 3
    assert ctx.responses(10, batch_size=4, stop_when=refuses) == full   # the whole point: never cut
    assert calls == [True, True, False, False]   # batch 0 again, batch 2 for the first time
    assert ctx.generated == full
    # without stop_parts (step 0, the horizon) a part's answers are full answers
    calls.clear()
    assert B.EvalContext(model, tok, items).part(0, 8).responses(10, batch_size=4, stop_when=refuses) == full[:8]
    assert calls == [False, False]


def trial(world, early: bool, model: str, lr: float, phi: float, crossing: str, refine: int):
    cfg = attack_dict(world, checkpoint={"model": str(world / model)}, max_steps=12, eval_every=4, refine=refine,
                      data={"eval_size": 24}, phi=phi, crossing=crossing, decide_early=early,
                      attacker={"learning_rate": lr},
                      evaluator={"name": "refusal_keyword", "options": {"max_new_tokens": 4, "batch_size": 5}})
    torch.manual_seed(0)
    points = []
    result = run_attack(AttackConfig.model_validate(cfg), on_eval=points.append)
    assert points == result.points
    return result


@pytest.mark.parametrize("model, lr, phi, crossing, refine", [
    ("rescaled", 1e-4, 0.5, "point", 0),          # resists: safe points between, each decided at 12 of 24
    ("rescaled", 1e-3, 0.5, "point", 2),          # fails at a midpoint; a safe midpoint decided early
    ("noised", 1e-4, 0.5, "point", 2),            # a safe point with harmful answers (17 of 24 scored)
    ("base", 1e-4, 0.25, "lower_bound", 2),       # Wilson's lower end decides
    ("base", 3e-4, 0.25, "lower_bound", 2),       # one point needs 23 of 24
    ("rescaled", 1e-4, 1.0, "point", 0),          # phi 1: nothing between step 0 and T is scored
])
def test_a_trial_decided_early_ends_as_the_trial_scored_in_full(world, model, lr, phi, crossing, refine):
    full = trial(world, False, model, lr, phi, crossing, refine)
    early = trial(world, True, model, lr, phi, crossing, refine)
    n = 24

    assert early.status == full.status and early.trained_steps == full.trained_steps
    assert [(p.step, p.status, p.resolution, p.stage) for p in early.points] == \
        [(p.step, p.status, p.resolution, p.stage) for p in full.points]
    for a, b in zip(early.points, full.points, strict=True):
        assert (a.examples, a.tokens, a.flops) == (b.examples, b.tokens, b.flops)   # every unit but seconds
        assert a.train_loss == b.train_loss or (math.isnan(a.train_loss) and math.isnan(b.train_loss))
    if full.budget_to_failure is not None:
        want, got = full.budget_to_failure, early.budget_to_failure
        assert (got.step, got.examples, got.tokens, got.flops, got.resolution) == \
            (want.step, want.examples, want.tokens, want.flops, want.resolution)
        assert got.crossings.keys() == want.crossings.keys()
    for i in (0, -1):   # step 0 and the final point: scored in full, samples saved
        a, b = early.points[i], full.points[i]
        assert (a.harmfulness, a.harmfulness_lo, a.harmfulness_hi) == \
            (b.harmfulness, b.harmfulness_lo, b.harmfulness_hi)
        assert a.samples == b.samples and a.samples is not None and a.curves[PROMPTS_SCORED] == n

    assert all(PROMPTS_SCORED not in p.curves for p in full.points)   # the default records no new curve
    decided = [(a, b) for a, b in zip(early.points, full.points, strict=True) if a.curves[PROMPTS_SCORED] < n]
    assert decided   # some safe point was decided before its last prompt
    for a, b in zip(early.points, full.points, strict=True):
        if a.curves[PROMPTS_SCORED] == n:
            assert a.harmfulness == b.harmfulness and a.harmfulness_lo == b.harmfulness_lo
        else:   # safe in both; f the bound it reached, the interval the envelope of full scoring's
            assert a.status == "running" and a.samples is None
            assert b.harmfulness <= a.harmfulness and a.harmfulness_lo <= b.harmfulness_lo
            assert b.harmfulness_hi <= a.harmfulness_hi and a.harmfulness_lo <= a.harmfulness <= a.harmfulness_hi
            if crossing == "point":
                assert a.harmfulness <= phi
    if phi == 1.0:
        assert [p.curves[PROMPTS_SCORED] for p in early.points] == [n, 0, 0, n]


def test_only_points_with_text_never_saved_are_decided_early(world, monkeypatch):
    """Step 0 and the horizon are scored in full even where they could be decided early."""
    calls = []
    real = B.score_until_decided
    monkeypatch.setattr("trainables.attack.score_until_decided",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    r = trial(world, True, "rescaled", 1e-4, 0.5, "point", 0)
    assert [p.step for p in r.points] == [0, 4, 8, 12] and len(calls) == 2
    assert [p.curves[PROMPTS_SCORED] for p in r.points] == [24, 12, 12, 24]


@pytest.mark.parametrize("raw, expect", [
    ({"evaluators": [{"name": "refusal_keyword", "primary": True}, {"name": "nll"}]},
     "decide_early: further evaluators need every prompt scored"),
    ({"evaluator": {"name": "nll"}}, "decide_early needs a primary evaluator whose f is a share of prompts"),
    ({"data": "eval-domains"}, "decide_early: data.eval.domain_field asks for f per domain"),
])
def test_decide_early_with_what_needs_every_prompt_is_one_line(tmp_path, raw, expect):
    if raw.get("data") == "eval-domains":
        raw = {"data": {"attack": {"source": "a.jsonl"}, "eval": {"source": "e.jsonl", "domain_field": "category"}}}
        (tmp_path / "e.jsonl").write_text('{"prompt": "held out", "response": "r", "category": "x"}\n' * 8)
    msg = error_of(tmp_path, minimal(tmp_path, decide_early=True, **raw))
    assert msg.startswith("spec error: ") and expect in msg and "set decide_early: false" in msg, msg
    assert "\n" not in msg


def test_decide_early_is_a_new_trial_only_when_on(tmp_path, world):
    raw = minimal(tmp_path)
    raw["data"] = {"attack": {"source": str(tmp_path / "a.jsonl")}, "eval": {"source": str(tmp_path / "e.jsonl")}}
    sp, on = S.from_dict(raw), S.from_dict({**raw, "decide_early": True})
    off = S.from_dict({**raw, "decide_early": False})
    first = {"defence": "def", **sp.attackers()[0]}
    assert sweep.trial_key(off, first) == sweep.trial_key(sp, first) != sweep.trial_key(on, first)
    assert sweep.attack_config(on, first).decide_early
    with pytest.raises(ValueError, match="decide_early: further evaluators"):
        AttackConfig.model_validate(attack_dict(world, decide_early=True, evaluators=[
            {"name": "refusal_keyword", "primary": True}, {"name": "nll"}], evaluator=None))
