"""`flowrl eval` without vLLM: argument errors (one line, exit 2) and the accuracy arithmetic."""

from __future__ import annotations

import pytest
import torch

from flowrl.cli import main
from flowrl.data.rows import write_rows
from flowrl.evaluation import accuracy_metrics
from flowrl.models.tiny import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "model"
    make_tiny_model(path, seed=0)
    return str(path)


def _rows(tmp_path, data_source: str = "flowrl/arithmetic") -> str:
    row = {
        "prompt": [{"role": "user", "content": "What is 2 + 3?"}],
        "data_source": data_source,
        "reward_model": {"style": "rule", "ground_truth": "5"},
        "extra_info": {},
    }
    return write_rows(str(tmp_path / "rows.jsonl"), [row, row])


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flowrl eval: ")
    return err


def test_accuracy_mean_score_and_pass_at_n_hand_computed():
    scores = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.0])  # 4 prompts x 2 samples (aabb)
    m = accuracy_metrics(scores, n=2)
    assert m["accuracy"] == 3 / 8  # 0.5 is not a correct answer
    assert m["score"] == 3.5 / 8
    assert m["pass_at_n"] == 3 / 4  # prompts 0, 1, 3 have a correct sample
    assert (m["samples"], m["prompts"]) == (8.0, 4.0)


def test_missing_model_folder(tmp_path, capsys):
    err = _error(capsys, ["eval", str(tmp_path / "nope"), _rows(tmp_path)])
    assert f"model {tmp_path / 'nope'}: not a Hugging Face model folder" in err


def test_missing_data_file(tmp_path, capsys, model_dir):
    err = _error(capsys, ["eval", model_dir, str(tmp_path / "none.parquet")])
    assert f"data file {tmp_path / 'none.parquet'}: no such file" in err


def test_samples_without_temperature(tmp_path, capsys, model_dir):
    err = _error(capsys, ["eval", model_dir, _rows(tmp_path), "--n", "4"])
    assert "--n=4" in err and "--temperature" in err


def test_unknown_data_source_fails_before_generation(tmp_path, capsys, model_dir):
    err = _error(capsys, ["eval", model_dir, _rows(tmp_path, "my/task")])
    assert "'my/task'" in err and "--reward-function" in err


def test_bad_reward_function_path(tmp_path, capsys, model_dir):
    err = _error(capsys, ["eval", model_dir, _rows(tmp_path), "--reward-function", "no_such_mod:score"])
    assert "no_such_mod" in err


def test_like_run_takes_lengths_samples_and_reward_settings(tmp_path):
    from omegaconf import OmegaConf

    from flowrl.config import load_config
    from flowrl.evaluation import settings_of_run
    from flowrl.rewards import RewardConfig

    overrides = ["actor.model.path=m", "data.train_files=[x.parquet]", "data.val_max_samples=7", "rollout.max_response_length=40"]
    cfg = load_config("recipes/grpo_smollm2_arith_gpu.yaml", [*overrides, "data.prompts.ground_truth_key=label"])
    OmegaConf.save(cfg, tmp_path / "config.yaml")  # what every run writes
    got = settings_of_run(str(tmp_path))
    assert got["max_new_tokens"] == 40 and got["max_samples"] == 7
    assert got["max_prompt_length"] == cfg.data.prompts.max_prompt_length
    # where the run read its columns (docs/data.md)
    assert (got["prompt_key"], got["ground_truth_key"], got["data_source"]) == ("prompt", "label", "")
    assert got["reward"] == RewardConfig(num_workers=4, kwargs={"*": {"untagged": "last_number"}})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.yaml").write_text("rollout: 3\n")
    with pytest.raises(ValueError, match=r"--like-run .*bad/config.yaml: not a flowrl run config"):
        settings_of_run(str(tmp_path / "bad"))


def test_like_run_without_a_config_is_one_line(model_dir, tmp_path, capsys):
    assert main(["eval", model_dir, _rows(tmp_path), "--like-run", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"flowrl eval: --like-run {tmp_path}: no run config (config.yaml) there"
