"""The step-0 cache (trainables/step0_cache.py) on the toy world: the trials against one release
share its step-0 reading, and every point they record is the one they record without it."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import attack_dict

from trainables import AttackConfig, run_attack
from trainables.checkpoint import make_trainable
from trainables.evaluators import Scores, register
from trainables.names import STEP0_CACHED
from trainables.step0_cache import ENV, WRAP_FIELDS, Step0Cache, why_not

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = ("wall_seconds", "eval_seconds", "accelerator_seconds")


@pytest.fixture
def cache(world, tmp_path, monkeypatch) -> Path:
    """An empty step-0 cache for this test (after `world` has built the toy world)."""
    monkeypatch.setenv("ATTACK_SWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(ENV, raising=False)
    return tmp_path / "cache" / "step0"


def files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.json")) if cache.is_dir() else []


def trial(world, **over):
    return run_attack(AttackConfig.model_validate(attack_dict(world, **over)))


def comparable(point) -> str:
    """A point as JSON without its timings or the cache's own flag (nan reads NaN, equal to itself)."""
    d = dataclasses.asdict(point)
    for k in TIMING:
        d.pop(k)
    d["curves"] = {k: v for k, v in d["curves"].items() if k != STEP0_CACHED}
    d["crossings"] = {k: {u: v for u, v in c.items() if u not in TIMING} for k, c in d["crossings"].items()}
    return json.dumps(d, sort_keys=True)


def rich(world, **over) -> dict:
    """A trial scored by two evaluators (one generating, one not), per domain, with a utility bound
    and refinement: every part of a reading, and a snapshot taken after step 0."""
    return {"evaluators": [{"name": "refusal_keyword", "options": {"max_new_tokens": 4}, "primary": True},
                           {"name": "nll"}],
            "evaluator": None,
            "data": {"eval": {"source": str(world / "eval.jsonl"), "domain_field": "category"}},
            "utility": {"data": {"source": str(world / "benign_heldout.jsonl")}, "size": 8, "epsilon": 0.5},
            "max_steps": 8, "eval_every": 4, "refine": 2, **over}


def test_attackers_of_one_release_share_step_0_and_end_as_without_it(world, cache, monkeypatch):
    attackers = [{"learning_rate": 3e-3, "optimizer": "adamw", "seed": 0},
                 {"learning_rate": 1e-3, "optimizer": "sgd_momentum", "seed": 1, "dataset_size": 12}]
    monkeypatch.setenv(ENV, "0")
    off = [trial(world, **rich(world, attacker=a)) for a in attackers]
    assert files(cache) == [] and all(STEP0_CACHED not in p.curves for r in off for p in r.points)

    monkeypatch.delenv(ENV)
    on = [trial(world, **rich(world, attacker=a)) for a in attackers]
    assert len(files(cache)) == 1   # one release, one reading
    assert [r.points[0].curves[STEP0_CACHED] for r in on] == [0.0, 1.0]   # measured, then read back
    assert on[1].points[0].eval_seconds < on[0].points[0].eval_seconds
    assert {r.status for r in off} == {"failed", "resisted"}
    for a, b in zip(on, off, strict=True):
        assert (a.status, a.trained_steps) == (b.status, b.trained_steps)
        assert [comparable(p) for p in a.points] == [comparable(p) for p in b.points]
    first = on[1].points[0]
    assert first.samples is not None and first.samples == off[1].points[0].samples
    assert first.utility == off[1].points[0].utility and "harmfulness_in.cyber" in first.curves


def test_a_release_unsafe_from_the_cache_ends_as_measured(world, cache, monkeypatch):
    over = {"evaluator": {"name": "nll", "options": {}}, "phi": 0.01}   # f ~ 0.06 at release
    on = [trial(world, **over) for _ in range(2)]
    monkeypatch.setenv(ENV, "0")
    off = trial(world, **over)
    assert [r.status for r in on] == ["unsafe_at_release"] * 2 == [off.status] * 2
    assert [r.points[0].curves[STEP0_CACHED] for r in on] == [0.0, 1.0]
    assert comparable(on[1].points[0]) == comparable(off.points[0]) and off.points[0].crossings


def test_lora_and_full_read_the_same_release_and_are_kept_apart(world, cache, monkeypatch):
    """B = 0: the wrapped model scores what the release scores, bit for bit (utility and nll are
    floats from the forward pass); the key still keeps the wrappings apart."""
    lora = {"finetune": "lora", "lora_r": 8}
    wrappings = [{"finetune": "full"}, lora, {"finetune": "lora", "lora_r": 4, "lora_alpha": 8.0,
                                             "lora_dropout": 0.1, "lora_target_modules": ["q_proj", "v_proj"]}]
    monkeypatch.setenv(ENV, "0")
    step0 = [trial(world, **rich(world, attacker=w, max_steps=1, refine=0)).points[0] for w in wrappings]
    assert len({comparable(p) for p in step0}) == 1 and step0[0].samples is not None

    monkeypatch.delenv(ENV)
    for w in wrappings:
        trial(world, **rich(world, attacker=w, max_steps=1, refine=0))
    assert len(files(cache)) == 3
    again = [{**lora, "learning_rate": 1e-2, "optimizer": "sgd", "seed": 7, "batch_size": 2},
             {"finetune": "full", "lora_r": 64}]   # lora_* mean nothing to a full fine-tune
    for w in again:
        assert trial(world, **rich(world, attacker=w, max_steps=1, refine=0)).points[0].curves[STEP0_CACHED] == 1
    assert len(files(cache)) == 3


def test_the_key_holds_every_attacker_field_that_wraps_the_model():
    read = set(re.findall(r"attacker\.(\w+)", inspect.getsource(make_trainable)))
    assert read and read <= set(WRAP_FIELDS)


def test_new_eval_data_evaluator_options_or_weights_miss(world, cache, tmp_path):
    model = tmp_path / "release"
    shutil.copytree(world / "base", model)
    eval_path = tmp_path / "eval.jsonl"
    shutil.copy(world / "eval.jsonl", eval_path)
    over = {"checkpoint": {"model": str(model)}, "data": {"eval": {"source": str(eval_path)}}, "max_steps": 1}

    def cached(**more) -> float:
        return trial(world, **{**over, **more}).points[0].curves[STEP0_CACHED]

    assert cached() == 0 and cached(attacker={"learning_rate": 1e-2, "seed": 5}) == 1
    lines = eval_path.read_text().splitlines(keepends=True)
    eval_path.write_text("".join(lines[1:] + lines[:1]))               # other held-out prompts
    assert cached() == 0 and cached() == 1
    options = {"name": "refusal_keyword", "options": {"max_new_tokens": 4, "markers": ["i cannot"]}}
    assert cached(evaluator=options) == 0 and cached(evaluator=options) == 1
    spelt = {"name": "refusal_keyword", "options": {"max_new_tokens": 4, "batch_size": 16}}   # the default
    assert cached(evaluator=spelt) == 1
    # issue 30: a reading gated otherwise is another reading
    assert cached(coherence={"max_repeat": 0.5}) == 0 and cached(coherence={"max_repeat": 0.5}) == 1
    assert cached(coherence={"enabled": False}) == 0
    weights = model / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))      # the weights file rewritten
    assert cached() == 0 and cached() == 1
    assert len(files(cache)) == 6


def same_reading(a: dict, b: dict) -> bool:
    return json.dumps(a["reading"], sort_keys=True) == json.dumps(b["reading"], sort_keys=True)


def test_a_corrupt_or_foreign_file_is_ignored_and_written_again(world, cache):
    want = [comparable(p) for p in trial(world).points]
    (path,) = files(cache)
    whole = path.read_text()
    reading = json.loads(whole)
    short = {**reading, "reading": {**reading["reading"], "responses": reading["reading"]["responses"][:-1]}}
    other = {**reading, "key": {**reading["key"], "eval_items": "0" * 64}}
    for bad in ("{not json", whole[: len(whole) // 2], "", json.dumps(short), json.dumps(other), "[]", "\udcff"):
        path.write_text(bad, errors="surrogateescape")
        r = trial(world)
        assert r.points[0].curves[STEP0_CACHED] == 0 and [comparable(p) for p in r.points] == want
        assert same_reading(json.loads(path.read_text()), reading)   # measured and written again
    assert trial(world).points[0].curves[STEP0_CACHED] == 1 and files(cache) == [path]


def test_an_unwritable_cache_costs_only_the_sharing(world, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ATTACK_SWEEP_CACHE", str(blocker))   # its step0 folder cannot be made
    with pytest.warns(UserWarning, match="step-0 cache: cannot write"):
        r = trial(world, max_steps=1)
    assert r.status == "resisted" and r.points[0].curves[STEP0_CACHED] == 0


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from trainables.evaluators import Scores
    from trainables.step0_cache import Step0Cache

    cache = Step0Cache({"race": 1}, Path(sys.argv[1]))
    me = float(sys.argv[2])
    for _ in range(100):
        cache.put({"k": Scores.binary([me] * 200)}, me, ["x" * int(1000 * (1 + me))] * 200, 0.0)
""")


def test_two_processes_writing_leave_one_whole_file(tmp_path):
    root = tmp_path / "step0"
    cache = Step0Cache({"race": 1}, root)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), v], env=env) for v in ("0", "1")]
    seen = set()
    while any(w.poll() is None for w in writers):
        got = cache.get(["k"], 200)   # never torn: nothing yet, or one writer's reading whole
        if got is not None:
            scores, u, responses = got
            assert scores["k"].verdicts == [u] * 200 and responses == ["x" * int(1000 * (1 + u))] * 200
            seen.add(u)
    assert [w.returncode for w in writers] == [0, 0]
    assert cache.get(["k"], 200) is not None and seen
    assert [p.name for p in root.iterdir()] == [cache.path.name]   # no temp file left behind


def test_where_the_cache_is_off(world, monkeypatch):
    cfg = AttackConfig.model_validate(attack_dict(world))
    assert why_not(cfg) is None
    for value in ("0", "off", "False"):
        monkeypatch.setenv(ENV, value)
        assert why_not(cfg) == f"{ENV}=0"
    monkeypatch.delenv(ENV)
    assert "DeepSpeed" in why_not(cfg.model_copy(update={"deepspeed": {"config": {}}}))
    judge = {"name": "judge", "options": {"backend": "http", "base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    assert "judge behind a server" in why_not(AttackConfig.model_validate(attack_dict(world, evaluators=[
        {"name": "refusal_keyword", "primary": True}, judge], evaluator=None)))
    assert "outside trainables/evaluators" in why_not(AttackConfig.model_validate(
        attack_dict(world, evaluator={"name": "counted_here"})))


@register("counted_here")
def counted_here(options):
    """An evaluator of this module's own: it may keep state (a scripted sequence, a call count)."""
    return lambda ctx: 0.0


def test_scores_survive_the_file_exactly(tmp_path):
    gated = dataclasses.replace(Scores.binary([0, 0, None, 1], {"incoherent": 0.25}), ungated=[1.0, 0.0, None, 1.0],
                                incoherent=[True, False, False, False])   # as the coherence gate leaves it
    scores = {"a": Scores.binary([1, 0, None, 1], {"mean_score": 0.1 + 0.2}),
              "b": Scores(0.123456789012345678, [1e-300, 0.3, 2 / 3, float("nan")]), "c": gated}
    cache = Step0Cache({"k": 1}, tmp_path)
    cache.put(scores, float("nan"), ["é", None, "", "x"], 0.5)
    got, u, responses = cache.get(["a", "b", "c"], 4)
    assert json.dumps({k: dataclasses.asdict(s) for k, s in got.items()}) == \
        json.dumps({k: dataclasses.asdict(s) for k, s in scores.items()})
    assert u != u and responses == ["é", None, "", "x"]
    assert cache.get(["b", "a", "c"], 4) is None and cache.get(["a", "b", "c"], 5) is None
