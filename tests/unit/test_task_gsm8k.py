"""The GSM8K-format task (flowrl.tasks.gsm8k) and the scoring its SmolLM2 recipe relies on."""

import pytest

from flowrl.config import load_config
from flowrl.data import PromptDataConfig, PromptDataset, SequenceDataConfig, SFTDataset, read_rows
from flowrl.data.rows import check_prompt_row
from flowrl.models.tiny import make_tokenizer
from flowrl.rewards import RewardConfig, RewardResolver
from flowrl.rewards.gsm8k import compute_score, parse_number

pytest.importorskip("reasoning_gym")
from flowrl.tasks import gsm8k  # noqa: E402  (needs reasoning-gym)

RECIPE = "recipes/grpo_smollm2_gsm8k_gpu.yaml"

# The shape of SmolLM2-135M-Instruct's answers: numbered steps, the answer in a closing sentence, no "####".
SMOLLM2_LIKE = (
    "To find the number of plates in Ava's package, let's break it down step by step:\n\n"
    "1. Ava had a total of 24 plates when she set the table.\n"
    "2. She used 7 plates to sample the peppers, so 24 + 7 = 31 plates in all.\n"
    "3. Her husband bought 8 of them, so 31 - 8 = 23.\n\n"
    "Therefore, the package that Ava bought had 23 plates."
)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_written_rows_are_valid_gsm8k_rows(tmp_path, fmt):
    paths = gsm8k.write_splits(tmp_path / "a", n_train=30, n_test=10, seed=1, fmt=fmt)
    again = gsm8k.write_splits(tmp_path / "b", n_train=30, n_test=10, seed=1, fmt=fmt)
    assert all(open(paths[k], "rb").read() == open(again[k], "rb").read() for k in ("train", "test"))
    splits = {k: read_rows(paths[k]) for k in ("train", "test")}
    assert len(splits["test"]) == 10 and 0 < len(splits["train"]) <= 30
    for split, rows in splits.items():
        for ref, row in rows:
            checked = check_prompt_row(row, ref)
            (message,) = checked["prompt"]
            assert message["role"] == "user" and message["content"].endswith(gsm8k.INSTRUCTION)
            assert '"####"' in message["content"] and "Do not include units" not in message["content"]
            assert checked["data_source"] == "openai/gsm8k"
            truth = checked["reward_model"]["ground_truth"]
            assert checked["reward_model"]["style"] == "rule" and parse_number(truth) is not None
            assert float(truth) == float(truth.strip())  # a plain number: no units, "$" or commas
            extra = checked["extra_info"]
            assert extra["split"] == split and extra["question"] in message["content"]
            assert compute_score("", extra["answer"], truth)["score"] == 1.0  # the worked solution ends "#### N"
    questions = {k: {row["extra_info"]["question"] for _, row in rows} for k, rows in splits.items()}
    assert not questions["train"] & questions["test"]
    tok = make_tokenizer()  # one token a character: long limits
    assert len(PromptDataset(paths["test"], tok, PromptDataConfig(max_prompt_length=4096))) == 10
    assert sorted(paths) == ["sft_test", "sft_train", "test", "train"]
    for split in ("train", "test"):
        sft = [row for _, row in read_rows(paths[f"sft_{split}"])]
        assert [r["response"] for r in sft] == [row["extra_info"]["answer"] for _, row in splits[split]]
    assert len(SFTDataset(paths["sft_test"], tok, SequenceDataConfig(max_length=8192))) == 10


def test_command_line(tmp_path, capsys):
    gsm8k.main([str(tmp_path), "--n-train", "6", "--n-test", "3", "--seed", "2"])
    assert len(read_rows(tmp_path / "test.parquet")) == 3 and len(read_rows(tmp_path / "train.parquet")) <= 6
    out = capsys.readouterr().out
    assert f"train: {tmp_path}/train.parquet" in out and f"test: {tmp_path}/test.parquet" in out


def test_an_answer_that_is_not_a_plain_number_is_refused():
    entry = {"question": "q", "answer": "12 apples", "metadata": {"answer_cot": "#### 12"}}
    with pytest.raises(ValueError, match="gsm8k: train item 3: answer '12 apples' is not a plain number"):
        gsm8k.make_row(entry, "train", 3)
    with pytest.raises(ValueError, match="n_train=0"):
        gsm8k.write_splits("unused", n_train=0, n_test=1)


def test_smollm2_like_answer_scores_1_flexible_and_0_strict():
    assert compute_score("q", SMOLLM2_LIKE, "23", method="strict") == {"score": 0.0, "acc": 0.0, "has_answer": 0.0}
    assert compute_score("q", SMOLLM2_LIKE, "23", method="flexible") == {"score": 1.0, "acc": 1.0, "has_answer": 1.0}
    # with "####" both readers agree; flexible reads the last number, so a trailing number misleads it
    for method in ("strict", "flexible"):
        assert compute_score("q", "24 + 7 = 31, 31 - 8 = 23\n#### 23", "23", method=method)["score"] == 1.0
    assert compute_score("q", "So she bought 23 plates (step 3).", "23", method="flexible")["score"] == 0.0


def test_the_smollm2_recipe_scores_with_the_flexible_reader(tmp_path):
    from omegaconf import OmegaConf

    from flowrl.evaluation import settings_of_run

    overrides = ["actor.model.path=m", "data.train_files=[x.parquet]", "data.val_files=[y.parquet]"]
    cfg = load_config(RECIPE, overrides)
    reward = RewardConfig(**OmegaConf.to_container(cfg.reward, resolve=True))
    assert reward.kwargs == {"openai/gsm8k": {"method": "flexible"}}
    assert RewardResolver(reward)("openai/gsm8k")("q", SMOLLM2_LIKE, "23", {})["score"] == 1.0
    assert RewardResolver()("openai/gsm8k")("q", SMOLLM2_LIKE, "23", {})["score"] == 0.0  # default: strict
    OmegaConf.save(cfg, tmp_path / "config.yaml")  # what `flowrl train ... --print-config` writes
    assert settings_of_run(str(tmp_path / "config.yaml"))["reward"] == reward  # flowrl eval --like-run
