"""Reward models without Ray or FSDP: the Bradley–Terry loss, the scored token, config and folder checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowrl.algos import bradley_terry_loss, last_token_index, pair_accuracy
from flowrl.drivers.reward_model import RewardModelTrainConfig
from flowrl.batch import Batch
from flowrl.config import ConfigError, load_config
from flowrl.engines.fsdp import Normalizer
from flowrl.engines.sequences import model_inputs
from flowrl.keys import Keys
from flowrl.workers.reward_model import check_reward_model_folder, pair_loss


def test_bradley_terry_loss_hand_computed() -> None:
    chosen = torch.tensor([2.0, 0.5, 1.0, -1.0])
    rejected = torch.tensor([0.0, 0.5, 3.0, -4.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    # margins 2, 0, -2, 3: -log sigmoid(m) = log(1 + e^-m)
    expected = [math.log(1 + math.exp(-2)), math.log(2), math.log(1 + math.exp(2)), math.log(1 + math.exp(-3))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx([0.126928, 0.693147, 2.126928, 0.048587], abs=1e-6)
    assert float(metrics["accuracy"]) == 0.5  # the tie (margin 0) counts as wrong
    assert float(metrics["margin"]) == pytest.approx(0.75)
    assert float(metrics["chosen_score"]) == pytest.approx(0.625)
    assert float(metrics["rejected_score"]) == pytest.approx(-0.125)
    assert pair_accuracy(chosen, rejected) == 0.5


def test_bradley_terry_loss_is_finite_for_large_margins() -> None:
    loss, _ = bradley_terry_loss(torch.tensor([0.0, 200.0]), torch.tensor([200.0, 0.0]))
    assert loss.tolist() == pytest.approx([200.0, 0.0])


def test_bradley_terry_loss_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"both be \[B\]; got \(3,\) and \(2,\)"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))


def test_pair_loss_sums_to_the_global_mean_over_micro_batches() -> None:
    chosen, rejected = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([0.0, 1.0, 0.5, -1.0])
    norm = Normalizer(global_tokens=0.0, global_seqs=4.0)
    total = 0.0
    for part in (slice(0, 1), slice(1, 4)):  # uneven micro-batches
        out = {Keys.CHOSEN_SCORES: chosen[part], Keys.REJECTED_SCORES: rejected[part]}
        loss, _ = pair_loss(Batch({}, batch_size=1), out, norm)
        total += float(loss)
    assert total == pytest.approx(float(bradley_terry_loss(chosen, rejected)[0].mean()), rel=1e-6)


def test_scored_token_of_a_rollout_row_is_its_last_response_token() -> None:
    # prompts left-padded to 4, responses right-padded to 3; row 2 has an empty response
    batch = Batch(
        {
            Keys.PROMPT_IDS: torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9], [0, 0, 0, 4]]),
            Keys.PROMPT_MASK: torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]),
            Keys.RESPONSE_IDS: torch.tensor([[10, 11, 0], [12, 1, 0], [0, 0, 0]]),
            Keys.RESPONSE_MASK: torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
        }
    )
    inputs = model_inputs(batch, trim=False)
    last = last_token_index(inputs.attention_mask)
    assert last.tolist() == [5, 5, 3]  # columns of 11, of 1 (the EOS), and of the prompt's last token
    assert inputs.input_ids.gather(1, last[:, None]).squeeze(1).tolist() == [11, 1, 4]
    trimmed = model_inputs(batch, trim=True)  # drops the all-padding first column and response column 2
    assert last_token_index(trimmed.attention_mask).tolist() == [4, 4, 2]


def test_scored_token_of_a_right_padded_pair() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0]


BASE = ["actor.model.path=/m", "data.train_files=[t.jsonl]", "rollout.n=2"]


def test_config_reward_model_needs_a_path() -> None:
    assert load_config(None, BASE).reward_model is None
    assert load_config(None, [*BASE, "reward_model.path=/rm"]).reward_model.path == "/rm"
    with pytest.raises(ConfigError, match="reward_model is set but reward_model.path is not"):
        load_config(None, [*BASE, "reward_model.dtype=float32"])


def test_rm_recipe_loads() -> None:
    cfg = load_config("recipes/ppo_rm_arithmetic_tiny.yaml", ["reward_model.path=/rm", "actor.model.path=/m",
                                                               "critic.model.path=/m", "data.train_files=[t]"])
    assert cfg.trainer.algorithm == "ppo" and cfg.reward_model.path == "/rm"


def test_train_config_checks_batch_sizes() -> None:
    ok = {"model_path": "/m", "train_files": ["t"], "out_dir": "/o"}
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by num_workers=4"):
        RewardModelTrainConfig(**ok, batch_size=6, num_workers=4)
    with pytest.raises(ValueError, match="batch_size / num_workers = 8 is not divisible by micro_batch_size=3"):
        RewardModelTrainConfig(**ok, batch_size=16, num_workers=2, micro_batch_size=3)
    with pytest.raises(ValueError, match="train_files is empty"):
        RewardModelTrainConfig(model_path="/m", train_files=[], out_dir="/o")
    engine = RewardModelTrainConfig(**ok).engine_config()
    assert engine.value_head and not engine.head_bias


def _folder(tmp_path, config: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_reward_model_folder_must_be_a_one_label_sequence_classifier(tmp_path) -> None:
    check_reward_model_folder(_folder(tmp_path, {"architectures": ["Qwen2ForSequenceClassification"]}))
    with pytest.raises(ValueError, match=r"holds \['Qwen2ForCausalLM'\], not a \*ForSequenceClassification"):
        check_reward_model_folder(_folder(tmp_path, {"architectures": ["Qwen2ForCausalLM"]}))
    two = {"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "a", "1": "b"}}
    with pytest.raises(ValueError, match="the classifier has 2 labels"):
        check_reward_model_folder(_folder(tmp_path, two))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_reward_model_folder(str(tmp_path / "nowhere"))
