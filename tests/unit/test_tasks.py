"""The synthetic arithmetic task: right answers, disjoint deterministic splits, loadable files."""

import re

import pytest

from flowrl.data import PreferenceDataset, PromptDataset, SFTDataset, read_rows
from flowrl.keys import Keys
from flowrl.models.tiny import make_tokenizer
from flowrl.tasks import arithmetic
from flowrl.tasks.arithmetic import LEVELS, compute_score, make_splits, write_splits

QUESTION = re.compile(r"What is ([-+* 0-9]+)\? Answer with just the number\.")


def expression_of(row: dict) -> str:
    (message,) = row["prompt"]
    assert message["role"] == "user"
    return QUESTION.fullmatch(message["content"]).group(1)


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_answers_match_python(level):
    train, test = make_splits(60, 20, level, seed=1)
    spec = LEVELS[level]
    for i, p in enumerate(train + test):
        row = arithmetic.rl_row(p, level, "train", i)
        expr = expression_of(row)
        assert int(row["reward_model"]["ground_truth"]) == eval(expr)  # digits and + - * only
        numbers = [int(x) for x in re.findall(r"\d+", expr)]
        assert len(numbers) == spec.n_operands and all(0 <= x < 10**spec.max_digits for x in numbers)
        assert set(re.findall(r"[-+*]", expr)) <= set(spec.operators)
        assert row["data_source"] == "flowrl/arithmetic" and row["extra_info"]["level"] == level


def test_level_one_is_single_digit_addition():
    train, test = make_splits(500, 20, 1, seed=0)
    assert {p.operators for p in train + test} == {("+",)}
    assert len(set(train)) == 80  # 100 problems, 20 held out: train repeats the other 80
    assert not set(train) & set(test) and len(set(test)) == 20


@pytest.mark.parametrize("level,n_train,n_test", [(1, 300, 30), (3, 2000, 500), (8, 500, 100)])
def test_splits_are_disjoint_and_deterministic(level, n_train, n_test):
    train, test = make_splits(n_train, n_test, level, seed=7)
    assert len(train) == n_train and len(test) == n_test == len(set(test))
    assert not set(train) & set(test)
    if n_train <= LEVELS[level].n_problems - n_test:
        assert len(set(train)) == n_train
    assert make_splits(n_train, n_test, level, seed=7) == (train, test)
    assert make_splits(n_train, n_test, level, seed=8) != (train, test)


def test_too_many_test_problems_is_refused():
    with pytest.raises(ValueError, match="n_test=100 leaves no training problems at level 1"):
        make_splits(10, 100, 1, seed=0)
    with pytest.raises(ValueError, match="level=9 does not exist"):
        make_splits(10, 10, 9, seed=0)


@pytest.mark.parametrize(
    "response,truth,expected",
    [
        ("85", "85", 1.0),
        (" The answer is 85.", "85", 1.0),
        ("85 or 86", "85", 1.0),
        ("84 + 1 = 85", "85", 0.0),  # the first integer counts
        ("-3", "-3", 1.0),
        ("3", "-3", 0.0),
        ("eighty-five", "85", 0.0),
        ("", "85", 0.0),
    ],
)
def test_score(response, truth, expected):
    assert compute_score("q", response, truth, {})["score"] == expected


def test_format_score_only_for_a_bare_integer():
    assert compute_score("q", " 86\n", "85", {}, format_score=0.1) == {"score": 0.1, "acc": 0.0}
    assert compute_score("q", "it is 86", "85", {}, format_score=0.1) == {"score": 0.0, "acc": 0.0}


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_written_splits_load_and_score(tmp_path, fmt):
    paths = write_splits(tmp_path / "a", n_train=40, n_test=10, level=2, seed=3, fmt=fmt)
    assert sorted(paths) == ["pairs_test", "pairs_train", "sft_test", "sft_train", "test", "train"]
    again = write_splits(tmp_path / "b", n_train=40, n_test=10, level=2, seed=3, fmt=fmt)
    assert all(open(paths[k], "rb").read() == open(again[k], "rb").read() for k in paths)
    train = [row for _, row in read_rows(paths["train"])]
    test = [row for _, row in read_rows(paths["test"])]
    assert not {expression_of(r) for r in train} & {expression_of(r) for r in test}
    for _, row in read_rows(paths["sft_train"]):
        assert compute_score("q", row["response"], row["reward_model"]["ground_truth"], {})["score"] == 1.0
    for _, row in read_rows(paths["pairs_train"]):
        truth = row["reward_model"]["ground_truth"]
        assert compute_score("q", row["chosen"], truth, {})["score"] == 1.0
        assert compute_score("q", row["rejected"], truth, {})["score"] == 0.0
    tok = make_tokenizer()
    prompts = PromptDataset(paths["train"], tok)
    assert len(prompts) == 40
    assert prompts.collate([0])[Keys.GROUND_TRUTH] == [train[0]["reward_model"]["ground_truth"]]
    assert len(SFTDataset(paths["sft_train"], tok)) == 40
    assert len(PreferenceDataset(paths["pairs_test"], tok)) == 10


def test_command_line(tmp_path, capsys):
    arithmetic.main([str(tmp_path), "--n-train", "12", "--n-test", "4", "--level", "3", "--format", "jsonl"])
    assert len(read_rows(tmp_path / "train.jsonl")) == 12 and len(read_rows(tmp_path / "test.jsonl")) == 4
    assert "train: " in capsys.readouterr().out


def test_reasoning_gym_adapter(tmp_path):
    pytest.importorskip("reasoning_gym")
    from flowrl.rewards import RewardConfig, RewardResolver
    from flowrl.tasks import reasoning_gym as rga

    paths = rga.write_splits(tmp_path, "basic_arithmetic", n_train=8, n_test=4, seed=0, fmt="jsonl")
    rows = [row for _, row in read_rows(paths["train"])]
    assert rows and all(r["data_source"] == "reasoning_gym/basic_arithmetic" for r in rows)
    fn = RewardResolver()("reasoning_gym/basic_arithmetic")
    assert fn is rga.compute_score
    row = rows[0]
    truth, extra = row["reward_model"]["ground_truth"], row["extra_info"]
    assert fn("q", f"thinking...<answer>{truth}</answer>", truth, extra) == 1.0
    assert fn("q", f"<answer>{truth}1</answer>", truth, extra) < 1.0  # another number
    assert len(PromptDataset(paths["test"], make_tokenizer())) == 4
    # untagged answers: partial credit by default; the last number with untagged="last_number"
    assert fn("q", f"1 + 2 = {truth}", truth, extra) < 1.0
    flexible = RewardResolver(RewardConfig(kwargs={"*": {"untagged": "last_number"}}))("reasoning_gym/basic_arithmetic")
    assert flexible("q", f"1 + 2 = {truth}", truth, extra) == 1.0
    assert flexible("q", f"{truth} is not it, it is {truth}1", truth, extra) < 1.0  # the last number counts
    assert flexible("q", "no number here", truth, extra) == 0.0
    assert rga.extract_answer("x <answer> -4 </answer> then 7", "last_number") == "-4"  # tags win
    with pytest.raises(ValueError, match="untagged='first'"):
        rga.extract_answer("3", "first")


def test_symbols_style_and_restated_demonstrations(tmp_path):
    paths = write_splits(tmp_path, n_train=400, n_test=20, level=2, seed=0, style="symbols", restate_fraction=0.5)
    train, sft_train, sft_test = ([row for _, row in read_rows(paths[k])] for k in ("train", "sft_train", "sft_test"))
    restated = 0
    for row, sft in zip(train, sft_train):
        prompt = row["prompt"][0]["content"]
        assert re.fullmatch(r"\d[-+]\d=", prompt) and sft["prompt"] == row["prompt"]
        answer = row["reward_model"]["ground_truth"]
        assert int(answer) == eval(prompt[:-1])
        if sft["response"] == prompt + answer:
            restated += 1
            # the scorer marks a restated equation wrong unless its first operand is the answer
            assert compute_score(prompt, sft["response"], answer)["score"] == float(prompt[0] == answer)
        else:
            assert sft["response"] == answer
    assert 160 < restated < 240  # about half of 400
    assert all(r["response"] == r["reward_model"]["ground_truth"] for r in sft_test)  # held out: bare answers


def test_bad_style_or_fraction_is_refused(tmp_path):
    with pytest.raises(ValueError, match="style='latex'"):
        write_splits(tmp_path, 10, 5, level=2, style="latex")
    with pytest.raises(ValueError, match="restate_fraction=1.5 must be in"):
        write_splits(tmp_path, 10, 5, level=2, restate_fraction=1.5)
