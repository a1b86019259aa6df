"""Defences the tool builds (issue 29): the deep method's recovery examples and gradient by hand,
the builder's cache (a second build is a hit, any changed part rebuilds), its budget, its folder
(an ordinary checkpoint, LoRA merged), a failed build leaving nothing, the spec's one-line errors,
and a sweep that builds a defence, records the build once and attacks the built folder."""

import json
import math
import random

import pytest
import torch
import yaml
from conftest import sweep_dict, trial_runs

from orchestrator import spec as S
from trainables import data as D
from trainables.checkpoint import load_model, load_tokenizer
from trainables.config import Checkpoint, Data, DataSource
from trainables.defences.build import BuildError, build, manifest_of
from trainables.defences.config import Build
from trainables.defences.deep import Deep
from trainables.defences.deep import Options as DeepOptions

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = Data(attack=DataSource(source="-"), eval=DataSource(source="-"), chat_template=True)


def rows(world, name):
    return [json.loads(line) for line in (world / name).read_text().splitlines() if line.strip()]


def deep_build(world, **over) -> Build:
    raw = {"method": "deep", "from": str(world / "base"), "steps": 3, "batch_size": 4, "learning_rate": 1e-3,
           "data": {"refusal": {"source": str(world / "align_harmful.jsonl")},
                    "harmful": {"source": str(world / "defender_harmful.jsonl")}}}
    raw.update(over)
    return Build.model_validate(raw)


# --- the deep method --------------------------------------------------------------------------

def test_the_defenders_harmful_split_answers_the_refused_requests_and_none_the_attacker_holds(world):
    refused, harmful = rows(world, "align_harmful.jsonl"), rows(world, "defender_harmful.jsonl")
    assert [r["prompt"] for r in harmful] == [r["prompt"] for r in refused]
    assert all(r["response"].startswith("sure , here is how to ") for r in harmful)
    attacker = {r["prompt"] for name in ("attack.jsonl", "eval.jsonl") for r in rows(world, name)}
    assert not attacker & {r["prompt"] for r in harmful}


def test_a_recovery_example_learns_the_refusal_after_a_harmful_opening_and_nothing_else(world):
    tok = load_tokenizer(Checkpoint(model=str(world / "base")))
    refused, harmful = rows(world, "align_harmful.jsonl")[:6], rows(world, "defender_harmful.jsonl")[:6]
    method = Deep(DeepOptions(augment_probability=1.0, max_prefix_tokens=3), None, None, seed=5)
    got = method.streams({"refusal": refused, "harmful": harmful}, tok, CHAT)["align"]
    assert len(got) == 6 and method.recovered == 6
    rng = random.Random("deep/5")   # the draw the method documents: one random() and one k per example
    for r, h, item in zip(refused, harmful, got, strict=True):
        rng.random()
        k = rng.randint(1, 3)
        prompt = tok(D.format_prompt(tok, r["prompt"], CHAT), add_special_tokens=False)["input_ids"]
        opening = tok(h["response"], add_special_tokens=False)["input_ids"][:k]
        refusal = tok(" " + r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert item.input_ids == prompt + opening + refusal
        assert item.labels == [D.IGNORE] * (len(prompt) + k) + refusal
        assert tok.decode(opening).startswith("sure")


def test_without_augmentation_deep_is_plain_refusal_training_on_refusals_and_benign_rows(world):
    tok = load_tokenizer(Checkpoint(model=str(world / "base")))
    refused, benign = rows(world, "align_harmful.jsonl")[:4], rows(world, "benign.jsonl")[:3]
    method = Deep(DeepOptions(augment_probability=0.0), None, None, seed=0)
    got = method.streams({"refusal": refused, "harmful": rows(world, "defender_harmful.jsonl"), "benign": benign},
                         tok, CHAT)["align"]
    want = [D.tokenize_pair(tok, D.format_prompt(tok, r["prompt"], CHAT), r["response"], CHAT.max_length)
            for r in refused + benign]
    assert got == want and method.recovered == 0


def test_deep_needs_a_harmful_answer_to_some_refused_request(world):
    tok = load_tokenizer(Checkpoint(model=str(world / "base")))
    other = [{"prompt": "something else", "response": "sure"}]
    with pytest.raises(ValueError, match="shares its prompt"):
        Deep(DeepOptions(), None, None, 0).streams({"refusal": rows(world, "align_harmful.jsonl"), "harmful": other},
                                                   tok, CHAT)


def test_the_deep_step_leaves_the_gradient_of_the_mean_refusal_token_loss(world):
    """The gradient against a per-sequence float64 log-probability sum over the supervised tokens,
    divided by their count (the batch's mean next-token loss)."""
    ckpt = Checkpoint(model=str(world / "base"))
    tok, model = load_tokenizer(ckpt), load_model(ckpt, torch.device("cpu"))
    method = Deep(DeepOptions(augment_probability=1.0, max_prefix_tokens=2), model, _rates(), seed=1)
    items = method.streams({"refusal": rows(world, "align_harmful.jsonl")[:3],
                            "harmful": rows(world, "defender_harmful.jsonl")[:3]}, tok, CHAT)["align"]
    batch = method.collate("align", items, tok.pad_token_id)
    model.zero_grad()
    step = method.step(model, lambda stream, i: batch, 0)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    total, count = 0.0, 0
    model.zero_grad()
    for it in items:
        logits = model(input_ids=torch.tensor([it.input_ids])).logits[0].double()
        for j in range(1, len(it.input_ids)):
            if it.labels[j] != D.IGNORE:
                total = total - torch.log_softmax(logits[j - 1], -1)[it.input_ids[j]]
                count += 1
    (total / count).backward()
    assert step.terms["loss"] == pytest.approx(float(total.detach() / count), rel=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad.float(), atol=1e-6, rtol=1e-4), n
    supervised = sum(sum(1 for x in it.labels[1:] if x != D.IGNORE) for it in items)
    tokens = sum(len(it.input_ids) for it in items)
    assert (step.spent.examples, step.spent.tokens, step.spent.flops) == (3, supervised, tokens * 7)


def _rates():
    from trainables.methods.base import Rates

    return Rates(train=7, forward=2)


# --- the builder and its cache ------------------------------------------------------------------

def test_a_second_build_is_a_cache_hit_and_every_changed_part_rebuilds(world, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTACK_SWEEP_CACHE", str(tmp_path / "cache"))
    start = Checkpoint(model=str(world / "base"))
    first = build(deep_build(world), start, CHAT, log=lambda _: None)
    assert not first.cached and first.folder.parent == tmp_path / "cache" / "defences"
    weights = first.folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = build(deep_build(world), start, CHAT, log=lambda _: None)
    assert again.cached and again.folder == first.folder and weights.stat().st_mtime_ns == stamp
    assert again.manifest == first.manifest

    changed = {
        "option": deep_build(world, options={"augment_probability": 1.0}),
        "training": deep_build(world, learning_rate=2e-3),
        "seed": deep_build(world, seed=1),
    }
    moved = tmp_path / "harmful.jsonl"
    lines = (world / "defender_harmful.jsonl").read_text().splitlines()
    moved.write_text("\n".join([lines[0].replace("quietly", "slowly"), *lines[1:]]) + "\n")
    changed["a data row"] = deep_build(world, data={"refusal": {"source": str(world / "align_harmful.jsonl")},
                                                    "harmful": {"source": str(moved)}})
    folders = {first.folder}
    for what, b in changed.items():
        built = build(b, start, CHAT, log=lambda _: None)
        assert not built.cached and built.folder not in folders, what
        folders.add(built.folder)
    # the same rows in another file: the same content, the same build
    copy = tmp_path / "copy.jsonl"
    copy.write_text((world / "defender_harmful.jsonl").read_text())
    same = build(deep_build(world, data={"refusal": {"source": str(world / "align_harmful.jsonl")},
                                         "harmful": {"source": str(copy)}}), start, CHAT, log=lambda _: None)
    assert same.cached and same.folder == first.folder
    # another starting checkpoint (the toy world's rescaled model) rebuilds
    other = build(deep_build(world, **{"from": str(world / "rescaled")}), Checkpoint(model=str(world / "rescaled")),
                  CHAT, log=lambda _: None)
    assert not other.cached and other.folder not in folders


def test_a_build_is_an_ordinary_checkpoint_with_its_budget_and_terms(world, tmp_path):
    out = tmp_path / "deep"
    b = deep_build(world, finetune="lora", lora_r=4, steps=4)
    built = build(b, Checkpoint(model=str(world / "base")), CHAT, folder=out, log=lambda _: None)
    assert built.folder == out and manifest_of(out)["key"] == built.manifest["key"]
    assert not (out / "adapter_config.json").exists()     # merged: a plain checkpoint
    tok = load_tokenizer(Checkpoint(model=str(out)))
    released = load_model(Checkpoint(model=str(out)), torch.device("cpu"))
    start = load_model(Checkpoint(model=str(world / "base")), torch.device("cpu"))
    moved = [n for (n, p), q in zip(released.named_parameters(), start.parameters(), strict=True)
             if not torch.equal(p, q)]
    assert moved and all(n.endswith("proj.weight") for n in moved)   # LoRA touched the projections only
    assert tok.chat_template == load_tokenizer(Checkpoint(model=str(world / "base"))).chat_template
    m = built.manifest
    assert (m["method"], m["finetune"], m["official_finetune"]) == ("deep", "lora", "full")
    assert [h["step"] for h in m["history"]] == [1, 2, 3, 4] and all(math.isfinite(h["loss"]) for h in m["history"])
    # the budget: every row drawn and every supervised token of the 4 batches, counted apart here
    method = Deep(b.method_options(), None, None, b.seed)
    items = method.streams({"refusal": rows(world, "align_harmful.jsonl"),
                            "harmful": rows(world, "defender_harmful.jsonl")}, tok, CHAT)["align"]
    order = [i for epoch in range(2) for i in _shuffled(len(items), b.seed, epoch)][:16]
    supervised = sum(sum(1 for x in items[i].labels[1:] if x != D.IGNORE) for i in order)
    assert m["budget"]["steps"] == 4 and m["budget"]["examples"] == 16 and m["budget"]["tokens"] == supervised
    assert m["budget"]["flops"] > 0 and m["budget"]["accelerator_seconds"] > 0


def _shuffled(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def test_a_build_that_diverges_leaves_no_folder_and_says_what_to_lower(world, tmp_path):
    out = tmp_path / "boom"
    b = deep_build(world, learning_rate=1e30, max_grad_norm=0, steps=10, optimizer="sgd")
    with pytest.raises(BuildError, match="lower build.learning_rate"):
        build(b, Checkpoint(model=str(world / "base")), CHAT, folder=out, log=lambda _: None)
    assert not out.exists() and not list(tmp_path.glob(".boom*"))


def test_a_named_folder_that_is_not_a_build_is_never_overwritten(world, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(BuildError, match="not a built defence"):
        build(deep_build(world), Checkpoint(model=str(world / "base")), CHAT, folder=out, log=lambda _: None)
    assert (out / "notes.txt").read_text() == "keep"


# --- the spec ------------------------------------------------------------------------------------

def spec_with(world, build: dict, **defence):
    raw = sweep_dict(world, "built", defences=("base",))
    raw["data"]["attack"]["domain_field"] = "category"
    raw["defences"].append({"name": "deep", "build": build, **defence})
    return S.from_dict(raw)


def good(world, **over):
    b = {"method": "deep", "from": "base", "data": {"refusal": {"source": str(world / "align_harmful.jsonl")},
                                                     "harmful": {"source": str(world / "defender_harmful.jsonl")}}}
    return {**b, **over}


@pytest.mark.parametrize("build, defence, message", [
    ({"method": "repnoyse"}, {},
     "defences.1.build.method: unknown defence method 'repnoyse' (did you mean 'repnoise'?"),
    ({"options": {"augment_probability": 2}}, {},
     "defences.1.build.options.augment_probability: Input should be less than or equal to 1"),
    ({"options": {"alpha": 1}}, {}, "defences.1.build.options.alpha: unknown option of deep"),
    ({"data": {"refusal": {"source": "ALIGN"}}}, {}, "defences.1.build.data.harmful: method deep needs"),
    ({"from": "deep"}, {}, "defences.1.build.from: deep -> deep is a cycle"),
    ({"frm": "base"}, {}, "defences.1.build.frm: unknown key (check its spelling; did you mean 'from'?"),
    ({"steps": 0}, {}, "defences.1.build.steps: Input should be greater than 0"),
    ({}, {"adapter": "x"}, "defences.1.adapter: a built defence is a plain checkpoint folder"),
])
def test_a_bad_build_gets_one_line_naming_the_field(world, build, defence, message):
    b = good(world, **build)
    if b["data"].get("refusal", {}).get("source") == "ALIGN":
        b["data"] = {"refusal": {"source": str(world / "align_harmful.jsonl")}}
    with pytest.raises(S.SpecError) as err:
        spec_with(world, b, **defence)
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)


def test_two_builds_starting_from_each_other_are_a_cycle_named_in_order(world):
    raw = sweep_dict(world, "cycle", defences=("base",))
    b = good(world)
    raw["defences"] += [{"name": "a", "build": {**b, "from": "b"}}, {"name": "b", "build": {**b, "from": "a"}}]
    with pytest.raises(S.SpecError, match=r"defences\.1\.build\.from: a -> b -> a is a cycle"):
        S.from_dict(raw)


def test_before_its_build_a_defence_is_checked_as_the_checkpoint_it_starts_from(world, tmp_path):
    from orchestrator.spec.preflight import check

    sp = spec_with(world, good(world, **{"from": str(world / "rescaled")}))
    assert sp.release_source(sp.defences[1]).model == str(world / "rescaled")
    check(sp)   # the start's tokenizer and weights are there: no error
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.SpecError, match=r"defences\.1\.build\.from: "):
        check(spec_with(world, good(world, **{"from": str(tmp_path / "empty")})))


def test_builds_run_in_waves_each_after_the_defence_it_starts_from(world):
    from orchestrator.sweep.defend import order

    raw = sweep_dict(world, "waves", defences=("base",))
    b = good(world)
    raw["defences"] += [{"name": "c", "build": {**b, "from": "b"}}, {"name": "b", "build": {**b, "from": "a"}},
                        {"name": "a", "build": b}, {"name": "d", "build": {**b, "from": str(world / "base")}}]
    assert [[d.name for d in wave] for wave in order(S.from_dict(raw))] == [["a", "d"], ["b"], ["c"]]


def test_a_sweep_builds_its_defence_records_the_build_once_and_attacks_the_built_folder(world, ray_local, tmp_path,
                                                                                          monkeypatch):
    from orchestrator import sweep

    monkeypatch.setenv("ATTACK_SWEEP_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw = sweep_dict(world, "built-e2e", defences=("base",), max_steps=5, eval_every=5,
                     utility={"data": {"source": str(world / "benign_heldout.jsonl")}})
    raw["defences"].append({"name": "deep", "build": {**good(world), "steps": 2},
                            "paper_attacker": {"learning_rate": 1e-5, "dataset_size": 8, "batch_size": 2, "steps": 3}})
    sp = S.from_dict(raw)
    said: list[str] = []
    built, outcomes = sweep.build(sp, tracking_uri=uri, echo=said.append)
    folder = outcomes[0].folder
    # the worker's progress reaches the driver's console, step by step, before the build's outcome
    progress = [s for s in said if s.startswith("  build deep: ")]
    assert progress[0] == "  build deep: building deep (full, 2 steps) from base ..."
    assert [s.split()[3] for s in progress[1:]] == ["1/2", "2/2"]
    done = next(i for i, s in enumerate(said) if s.startswith("build deep: deep (full) from base, built in"))
    assert said.index(progress[-1]) < done
    assert built.defences[1].model == str(folder) and not outcomes[0].cached
    assert folder.parent == tmp_path / "cache" / "defences"   # the driver's cache, whatever the workers' env
    from mlflow.tracking import MlflowClient

    lines: list[str] = []
    sweep.run(sp, tracking_uri=uri, storage_path=str(tmp_path / "ray"), echo=lines.append)
    assert any(line.startswith("build deep: deep (full) from base, found in the build cache") for line in lines)
    builds = trial_runs(uri, "built-e2e", "build")
    assert len(builds) == 1 and builds[0].data.params["folder"] == str(folder)
    metrics = builds[0].data.metrics
    assert metrics["spent_steps"] == 2 and "build.loss" in metrics
    trials = {r.data.tags["defence"]: r for r in trial_runs(uri, "built-e2e")}
    assert set(trials) == {"base", "deep"}
    # the build's figures at release are what the attack on it measured at its step 0
    history = MlflowClient(uri).get_metric_history
    step0 = {k: next(m.value for m in history(trials["deep"].info.run_id, k) if m.step == 0)
             for k in ("harmfulness", "utility")}
    assert metrics["harmfulness_at_release"] == pytest.approx(step0["harmfulness"])
    assert metrics["utility"] == pytest.approx(step0["utility"]) and metrics["utility"] > 0
    assert metrics["incoherent_at_release"] == 0   # the toy model answers in whole sentences

    # the paper's attacker ran once beside the search, and the durability table reads both
    from orchestrator.conditions import records
    from orchestrator.report import durability, load

    (paper,) = trial_runs(uri, "built-e2e", "paper")
    assert paper.data.tags["defence"] == "deep" and paper.data.params["learning_rate"] == "1e-05"
    assert paper.data.tags["status"] == "resisted" and paper.data.metrics["spent_steps"] == 3
    found = records.load(uri, "built-e2e", curves=False)
    assert found.paper["deep"].status == "resisted" and found.built["deep"].method == "deep"
    rows = {r.defence: r for r in load(uri, "built-e2e")}
    table = {r[0]: r for r in durability.csv_rows(list(rows.values()), found)[1]}
    deep, worst = table["deep"], rows["deep"].cheapest("steps")
    assert deep[1:4] == ["deep", "resisted", ""] and table["base"][2] == ""
    assert deep[4] == ("" if worst is None else f"{worst.value('steps'):.12g}")
    assert float(deep[7]) == pytest.approx(metrics["utility"])   # from the build record
    assert deep[8] == ("held under both" if worst is None else "held under (a), broke under (b)")

    (parent,) = trial_runs(uri, "built-e2e", "sweep")
    recorded = yaml.safe_load(MlflowClient(uri).download_artifacts(parent.info.run_id, "spec.yaml", str(tmp_path))
                              and (tmp_path / "spec.yaml").read_text())
    assert recorded["defences"][1]["model"] == str(folder)   # what the trials attacked
    assert recorded["defences"][1]["build"]["method"] == "deep"


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_every_method_of_the_example_builds_under_lora_and_full_into_a_checkpoint_that_loads(world, tmp_path,
                                                                                             monkeypatch, finetune):
    """examples/reference_defences.yaml's five builds, 2 steps each: each method's terms reach the
    record, and the folder loads as a plain model whose weights moved."""
    from pathlib import Path

    monkeypatch.setenv("ATTACK_SWEEP_CACHE", str(tmp_path))
    sp = S.load(Path(__file__).parent.parent / "examples" / "reference_defences.yaml")
    start = Checkpoint(model=sp.base.model)
    before = load_model(start, torch.device("cpu")).state_dict()
    terms = {"repnoise": "noise", "vaccine": "perturbed_ce", "booster": "harmful_ce_after",
             "tar": "tamper_resistance", "deep": "loss"}
    built = [d for d in sp.defences if d.build]
    assert sorted(d.build.method for d in built) == sorted(terms)
    for d in built:
        b = d.build.model_copy(update={"steps": 2, "finetune": finetune, "from_": sp.base.model,
                                       "options": {**d.build.options, **({"inner_steps": 2} if d.name == "tar"
                                                                        else {})}})
        out = build(b, start, sp.data, log=lambda _: None)
        m = out.manifest
        assert (m["method"], m["finetune"], m["budget"]["steps"]) == (d.build.method, finetune, 2)
        assert all(terms[d.build.method] in h and math.isfinite(h["loss"]) for h in m["history"])
        after = load_model(Checkpoint(model=str(out.folder)), torch.device("cpu")).state_dict()
        assert set(after) == set(before)
        assert any(not torch.equal(after[k], before[k]) for k in before), d.name



def test_a_build_on_some_harm_domains_trains_on_their_rows_and_is_immunised_on_them(world):
    from trainables.defences.build import rows_of

    src = DataSource(source=str(world / "align_harmful.jsonl"), domain_field="category")
    every = rows(world, "align_harmful.jsonl")
    want = [{"prompt": r["prompt"], "response": r["response"]} for r in every if r["category"] in ("cyber", "theft")]
    assert rows_of(src, ["cyber", "theft"]) == want and 0 < len(want) < len(every)
    assert len(rows_of(src)) == len(every)
    domained = {"refusal": {"source": str(world / "align_harmful.jsonl"), "domain_field": "category"},
                "harmful": {"source": str(world / "defender_harmful.jsonl"), "domain_field": "category"}}
    sp = spec_with(world, good(world, data=domained, domains=["cyber"]))
    assert sp.defences[1].immunised_on == ["cyber"]
    said = spec_with(world, good(world, data=domained, domains=["cyber"]), immunised_on=["theft"])
    assert said.defences[1].immunised_on == ["theft"]   # what the spec says wins
    with pytest.raises(S.SpecError, match=r"defences\.1\.build\.data\.refusal\.domain_field: build\.domains picks"):
        spec_with(world, good(world, domains=["cyber"]))
