import json

import pytest

from trainables import data as D
from trainables.checkpoint import load_tokenizer
from trainables.config import Checkpoint, Data, DataSource


@pytest.fixture(scope="module")
def tok(world):
    return load_tokenizer(Checkpoint(model=str(world / "base")))


def test_loss_is_masked_to_response_tokens_and_eos(tok):
    data = Data(attack=DataSource(source="-"), eval=DataSource(source="-"), chat_template=True)
    prompt = D.format_prompt(tok, "how do i hack the car", data)
    assert prompt == "<bos>user : how do i hack the car assistant :"
    t = D.tokenize_pair(tok, prompt, "i cannot help with that .", max_length=64)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert t.labels[:n_prompt] == [D.IGNORE] * n_prompt
    assert t.labels[n_prompt:] == t.input_ids[n_prompt:]
    assert tok.decode(t.input_ids[n_prompt:]) == "i cannot help with that . <eos>"
    assert len(D.tokenize_pair(tok, prompt, "i cannot help with that .", max_length=5).input_ids) == 5


def test_plain_prompt_format_and_missing_chat_template(tok):
    data = Data(attack=DataSource(source="-"), eval=DataSource(source="-"),
                prompt_format="Q: {prompt}\nA:")
    assert D.format_prompt(tok, "hi", data) == "<bos>Q: hi\nA:"
    tok2 = type(tok).from_pretrained(tok.name_or_path)
    tok2.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        D.format_prompt(tok2, "hi", Data(attack=DataSource(source="-"), eval=DataSource(source="-"),
                                          chat_template=True))


def test_loads_jsonl_parquet_and_dataset_directories(tmp_path):
    rows = [{"q": f"p{i}", "a": f"r{i}"} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "train.jsonl").write_text((tmp_path / "d.jsonl").read_text())
    for source in ("d.jsonl", "d.parquet", "dir"):  # dir: through datasets.load_dataset
        src = DataSource(source=str(tmp_path / source), prompt_field="q", response_field="a")
        assert D.load_rows(src) == rows
    with pytest.raises(ValueError, match="no field 'prompt'"):
        D.load_rows(DataSource(source=str(tmp_path / "d.jsonl")))


def test_draw_is_deterministic_and_bounded():
    rows = [{"i": i} for i in range(20)]
    assert D.draw(rows, 5, 1) == D.draw(rows, 5, 1) != D.draw(rows, 5, 2)
    assert len({r["i"] for r in D.draw(rows, 20, 0)}) == 20
    with pytest.raises(ValueError, match="dataset_size=21 exceeds the 20 rows"):
        D.draw(rows, 21, 0)


def test_batches_cover_each_epoch_once():
    items = [D.Tokenized([i + 1], [i + 1]) for i in range(6)]
    stream = D.batches(items, 4, 0, pad_id=0)
    seen = [int(x) for _ in range(3) for x in next(stream)["input_ids"][:, 0]]
    assert sorted(seen) == sorted(list(range(1, 7)) * 2)  # 12 = two full epochs


def test_toy_splits_share_no_request(world):
    def prompts(name):
        return {json.loads(line)["prompt"] for line in (world / name).read_text().splitlines()}

    def pairs(name):  # (verb, object) of each request
        return {tuple(p.split()[-3::2]) for p in prompts(name)}

    assert not pairs("attack.jsonl") & pairs("eval.jsonl")
    assert not pairs("align_harmful.jsonl") & (pairs("attack.jsonl") | pairs("eval.jsonl"))


def test_bad_rows_are_named_by_file_and_line(tmp_path):
    good = '{"prompt": "p", "response": "r"}\n'
    path = tmp_path / "d.jsonl"

    def error(content: bytes, **fields) -> str:
        path.write_bytes(content)
        with pytest.raises(ValueError) as err:
            D.load_rows(DataSource(source=str(path), **fields))
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg, msg
        return msg

    broken = (good * 41 + '{"prompt": "p", "response": \n').encode()
    assert "line 42, column 29: not valid JSON" in error(broken)
    missing = (good * 10 + '{"promt": "p", "response": "r"}\n').encode()
    assert "line 11 has no field 'prompt'" in error(missing)
    assert "line 3 is not valid UTF-8" in error(good.encode() * 2 + b'{"prompt": "\xff"}\n')
    assert "line 2: expected an object" in error((good + "[1, 2]\n").encode())
    array = tmp_path / "a.json"
    array.write_text('[{"prompt": "p", "response": "r"},\n {"prompt": "p" "response": "r"}]')
    with pytest.raises(ValueError, match=r"a.json: line 2, column 17: not valid JSON"):
        D.load_rows(DataSource(source=str(array)))
