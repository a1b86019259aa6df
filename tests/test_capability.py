"""trainables/capability.py with the real lm-evaluation-harness on the toy world: a local
multiple-choice task written from the held-out benign split, scored offline on the model in memory."""

from __future__ import annotations

import copy
import json
import random
import re
import socket
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainables import capability as C

pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")

TASK = "toy_howto"


def _rows(world, tok) -> list[dict]:
    """question: the chat-formatted benign request (the template writes <bos> itself); choices: the
    right how-to answer, the refusal, the same answer with another verb."""
    heldout = [json.loads(x) for x in (world / "benign_heldout.jsonl").read_text().splitlines()]
    verb = lambda r: re.search(r"how to (\w+) the", r["response"]).group(1)  # noqa: E731
    verbs = sorted({verb(r) for r in heldout})
    rows = []
    for r in heldout:
        v = verb(r)
        other = verbs[(verbs.index(v) + 1) % len(verbs)]
        question = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                           add_generation_prompt=True, tokenize=False)
        rows.append({"question": question, "answer": 0,
                     "choices": [r["response"], "i cannot help with that .",
                                 r["response"].replace(f" {v} ", f" {other} ")]})
    return rows


@pytest.fixture(scope="module")
def toy(world, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(world / "base")
    model = AutoModelForCausalLM.from_pretrained(world / "base")
    rows = _rows(world, tok)
    folder = tmp_path_factory.mktemp("tasks")
    C.write_task(folder, TASK, rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-layer model: one thread is as fast, and immune to a busy machine
    yield model, tok, rows, folder
    torch.set_num_threads(threads)


def test_base_scores_high_and_a_noised_copy_clearly_lower(toy):
    model, tok, rows, folder = toy
    assert len(rows) >= 20 and rows[0]["question"].count(tok.bos_token) == 1
    cfg = C.LmEval(tasks=[TASK], include_path=str(folder))
    C.check_tasks(cfg)
    base = C.scores(model, tok, cfg)
    assert set(base) == {f"{TASK}/acc", f"{TASK}/acc_norm"}
    name, value = C.main_metric(base, TASK)
    assert name == "acc_norm" and value >= 0.8 and base[f"{TASK}/acc"] >= 0.8

    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))  # weights are ~0.03 in size: this wrecks them
    broken = C.scores(noisy, tok, cfg)
    assert C.main_metric(broken, TASK)[1] < value - 0.4
    assert value - C.main_metric(broken, TASK)[1] > cfg.tolerance


def test_leaves_model_tokenizer_and_rngs_as_found_and_repeats_itself(toy):
    model, tok, _, folder = toy
    cfg = C.LmEval(tasks=[TASK], include_path=str(folder), limit=8, batch_size=3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.model.layers[0].eval()  # a mixed train/eval state comes back module by module
    random.seed(7)
    torch.manual_seed(7)
    expected_py, expected_torch = random.Random(7).random(), torch.rand(1, generator=torch.Generator().manual_seed(7))
    side = tok.padding_side
    try:
        first = C.scores(model, tok, cfg)
        assert model.training and not model.model.layers[0].training and model.model.layers[1].training
        assert random.random() == expected_py and torch.equal(torch.rand(1), expected_torch)
        assert tok.padding_side == side
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
        assert C.scores(model, tok, cfg) == first
    finally:
        model.eval()


def test_limit_scores_only_the_first_examples(toy, tmp_path):
    model, tok, rows, _ = toy
    # the first 4 rows keep the right answer; every later one marks the refusal as right
    C.write_task(tmp_path, "toy_limit", [r if i < 4 else {**r, "answer": 1} for i, r in enumerate(rows)])
    cfg = C.LmEval(tasks=["toy_limit"], include_path=str(tmp_path))
    assert C.scores(model, tok, cfg.model_copy(update={"limit": 4}))["toy_limit/acc"] == 1.0
    assert C.scores(model, tok, cfg)["toy_limit/acc"] <= 6 / len(rows)


def test_runs_offline_without_touching_the_network(toy, tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    model, tok, rows, _ = toy
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read the variables once, at import: make the flags true for this process too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network use: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    C.write_task(tmp_path, "toy_offline", rows[:6])  # a new data file: datasets builds it here and now
    cfg = C.LmEval(tasks=["toy_offline"], include_path=str(tmp_path))
    C.check_tasks(cfg)
    assert C.scores(model, tok, cfg)["toy_offline/acc"] >= 0.8


def test_check_tasks_names_an_unknown_task_and_a_missing_folder(toy, tmp_path):
    _, _, _, folder = toy
    with pytest.raises(ValueError, match="no task 'toy_howtoo'.*close: toy_howto") as err:
        C.check_tasks(C.LmEval(tasks=[TASK, "toy_howtoo"], include_path=str(folder)))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="is not a folder"):
        C.check_tasks(C.LmEval(tasks=[TASK], include_path=str(tmp_path / "nowhere")))


def test_write_task_yaml_and_row_checks(tmp_path):
    path = C.write_task(tmp_path / "t", "mc", [{"question": "q", "choices": ["a", "b"], "answer": 1}])
    config = yaml.safe_load(path.read_text())
    data = config["dataset_kwargs"]["data_files"]["test"]
    assert config["task"] == "mc" and config["output_type"] == "multiple_choice"
    assert Path(data).is_absolute()
    assert json.loads(Path(data).read_text()) == {"question": "q", "choices": ["a", "b"], "answer": 1}
    for bad in ({"question": "q", "choices": ["a"], "answer": 1}, {"question": "q", "choices": [], "answer": 0},
                {"question": 3, "choices": ["a"], "answer": 0}):
        with pytest.raises(ValueError, match="row 0"):
            C.write_task(tmp_path, "bad", [bad])


def test_main_metric_and_config():
    s = {"t/acc": 0.5, "t/acc_norm": 0.6, "u/exact_match/strict-match": 0.2, "u/f1": 0.3, "tt/acc": 0.9}
    assert C.main_metric(s, "t") == ("acc_norm", 0.6)
    assert C.main_metric({"t/acc": 0.5}, "t") == ("acc", 0.5)
    assert C.main_metric(s, "u") == ("exact_match/strict-match", 0.2)
    with pytest.raises(KeyError, match="'v'"):
        C.main_metric(s, "v")
    with pytest.raises(ValueError):
        C.LmEval(tasks=[])
    with pytest.raises(ValueError):
        C.LmEval(tasks=["t"], limit=0)
    with pytest.raises(ValueError):
        C.LmEval(tasks=["t"], extra=1)


def test_missing_says_how_to_install(monkeypatch):
    assert C.missing() is None
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # import lm_eval now raises ImportError
    assert "pip install 'attack-sweep[lm-eval]'" in C.missing()
