"""Loading the standard row format from parquet and JSONL, and naming what is wrong where."""

import copy
import json

import pytest

from flowrl.data import PromptDataset, RowError, read_rows, write_rows
from flowrl.keys import Keys
from flowrl.models.tiny import make_tokenizer


def good_row(i: int = 0) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
        "data_source": "flowrl/arithmetic",
        "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
        "extra_info": {"index": i},
    }


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_loads_parquet_and_jsonl(tmp_path, tok, suffix):
    rows = [good_row(i) for i in range(3)]
    rows[2]["extra_info"] = None  # optional
    path = write_rows(tmp_path / f"train.{suffix}", rows)
    ds = PromptDataset(path, tok)
    assert len(ds) == 3 and ds.stats == {"n_rows": 3, "n_filtered": 0, "n_truncated": 0, "n_kept": 3}
    batch = ds.collate([2, 0])
    assert batch[Keys.GROUND_TRUTH] == ["3", "1"]
    assert batch[Keys.DATA_SOURCE] == ["flowrl/arithmetic"] * 2
    assert batch[Keys.MESSAGES][1] == [{"role": "user", "content": "What is 0 + 1?"}]
    assert batch[Keys.PROMPT_TEXT][1] == "<|user|>What is 0 + 1?\n<|assistant|>"
    assert batch[Keys.EXTRA_INFO][1]["index"] == 0
    assert batch[Keys.EXTRA_INFO][0] == {}  # a null extra_info becomes an empty dict


def test_several_files_concatenate(tmp_path, tok):
    a = write_rows(tmp_path / "a.jsonl", [good_row(0)])
    b = write_rows(tmp_path / "b.parquet", [good_row(1), good_row(2)])
    ds = PromptDataset([a, b], tok)
    assert [it.ground_truth for it in ds.items] == ["1", "2", "3"]


def _drop(path):
    def edit(row):
        *parents, last = path
        for p in parents:
            row = row[p]
        del row[last]

    return edit


def _set(path, value):
    def edit(row):
        *parents, last = path
        for p in parents:
            row = row[p]
        row[last] = value

    return edit


MALFORMED = [
    (_drop(["prompt"]), "missing 'prompt'"),
    (_set(["prompt"], 7), "expected chat messages (a list) or text, got int in 'prompt'"),
    (_set(["prompt"], ""), "empty string in 'prompt'"),
    (_set(["prompt"], []), "empty message list in 'prompt'"),
    (_set(["prompt", 0], "hi"), "expected a {'role', 'content'} dict, got str in 'prompt[0]'"),
    (_drop(["prompt", 0, "content"]), "missing 'prompt[0].content'"),
    (_set(["prompt", 0, "content"], 7), "expected a string, got int in 'prompt[0].content'"),
    (_set(["prompt", 0, "role"], ""), "empty 'prompt[0].role'"),
    (_drop(["data_source"]), "missing 'data_source' (a dataset without the column: set data.prompts.data_source)"),
    (_set(["data_source"], 3), "expected a string, got int in 'data_source'"),
    (
        _drop(["reward_model"]),
        "missing 'reward_model' (an answer in a column of its own: set data.prompts.ground_truth_key)",
    ),
    (_set(["reward_model"], "rule"), "expected a dict, got str in 'reward_model'"),
    (_drop(["reward_model", "ground_truth"]), "missing 'reward_model.ground_truth'"),
    (_set(["reward_model", "ground_truth"], None), "missing 'reward_model.ground_truth'"),
    (_set(["extra_info"], [1, 2]), "expected a dict, got list in 'extra_info'"),
]


@pytest.mark.parametrize("edit,message", MALFORMED)
def test_malformed_jsonl_row_names_file_row_and_field(tmp_path, tok, edit, message):
    bad = copy.deepcopy(good_row(1))
    edit(bad)
    path = str(tmp_path / "train.jsonl")
    with open(path, "w") as f:  # a blank line: rows are counted without it, lines with it
        f.write(json.dumps(good_row(0)) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(RowError) as err:
        PromptDataset(path, tok)
    assert str(err.value) == f"{path} row 1 (line 3): {message}"


def test_malformed_parquet_row_names_file_row_and_field(tmp_path, tok):
    rows = [good_row(i) for i in range(3)]
    rows[2]["reward_model"] = {"style": "rule", "ground_truth": None}
    path = write_rows(tmp_path / "train.parquet", rows)
    with pytest.raises(RowError, match=r"train\.parquet row 2: missing 'reward_model.ground_truth'$"):
        PromptDataset(path, tok)


def test_non_utf8_text_names_the_field(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    line = json.dumps(good_row(0)).replace("What is", "What\xff is").encode("latin-1")
    path.write_bytes(json.dumps(good_row(0)).encode() + b"\n" + line + b"\n")
    with pytest.raises(RowError) as err:
        read_rows(path)
    assert str(err.value) == f"{path} row 1 (line 2): text is not valid UTF-8 in 'prompt[0].content'"


def test_invalid_json_and_non_object_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": [}\n')
    with pytest.raises(RowError, match=r"row 0 \(line 1\): not valid JSON"):
        read_rows(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(RowError, match=r"row 0 \(line 1\): expected a JSON object, got list"):
        read_rows(path)


def test_missing_file_is_one_line_naming_the_path(tmp_path, tok):
    missing = tmp_path / "nope" / "train.parquet"
    with pytest.raises(FileNotFoundError) as err:
        PromptDataset(str(missing), tok)
    assert str(err.value) == f"dataset file not found: {missing}"


def test_unknown_extension(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"train\.csv: unknown dataset format"):
        read_rows(path)
