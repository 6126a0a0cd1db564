"""Pure functions of the engines, with hand-computed expectations (no FSDP, no vLLM)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from flowrl.batch import Batch
from flowrl.engines.optim import OptimizerConfig, lr_factor
from flowrl.engines.sequences import entropy_from_logits, model_inputs, response_lengths, token_logprobs
from flowrl.engines.vllm_rollout import prompt_token_lists, response_fields
from flowrl.keys import Keys


def two_rows(response_mask: list[list[float]]) -> Batch:
    return Batch(
        {
            Keys.PROMPT_IDS: torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9]]),
            Keys.PROMPT_MASK: torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]),
            Keys.RESPONSE_IDS: torch.tensor([[10, 11, 0], [12, 0, 0]]),
            Keys.RESPONSE_MASK: torch.tensor(response_mask),
        }
    )


def test_response_lengths_end_at_last_masked_token() -> None:
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert response_lengths(mask).tolist() == [3, 0, 4]


def test_model_inputs_untrimmed() -> None:
    inputs = model_inputs(two_rows([[1, 1, 0], [1, 0, 0]]), trim=False)
    assert inputs.input_ids.tolist() == [[0, 0, 5, 6, 10, 11, 0], [0, 7, 8, 9, 12, 0, 0]]
    assert inputs.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0]]
    assert inputs.position_ids.tolist() == [[0, 0, 0, 1, 2, 3, 3], [0, 0, 1, 2, 3, 3, 3]]
    assert inputs.response_valid.tolist() == [[True, True, False], [True, False, False]]
    assert inputs.response_width == 3


def test_model_inputs_trims_all_padding_columns() -> None:
    inputs = model_inputs(two_rows([[1, 1, 0], [1, 0, 0]]), trim=True)
    assert inputs.input_ids.tolist() == [[0, 5, 6, 10, 11], [7, 8, 9, 12, 0]]
    assert inputs.position_ids.tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 3]]
    assert inputs.response_ids.tolist() == [[10, 11], [12, 0]]
    assert inputs.response_width == 3


def test_masked_token_inside_a_response_still_attends() -> None:
    inputs = model_inputs(two_rows([[1, 0, 1], [1, 0, 0]]), trim=False)  # row 0: token 1 left out of the loss
    assert inputs.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_token_logprobs_apply_temperature() -> None:
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])  # [1, 2, 3]
    targets = torch.tensor([[2, 1]])
    got = token_logprobs(logits, targets, temperature=0.5)
    z = torch.tensor([2.0, 4.0, 6.0])
    assert got[0, 0].item() == pytest.approx(6.0 - math.log(z.exp().sum().item()), abs=1e-6)  # fp32
    assert got[0, 1].item() == pytest.approx(-math.log(3.0), abs=1e-6)


def test_entropy_of_uniform_and_of_one_hot() -> None:
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    got = entropy_from_logits(logits, temperature=1.0)
    assert got[0, 0].item() == pytest.approx(math.log(4.0), abs=1e-6)
    assert got[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_lr_factor_warmup_then_cosine() -> None:
    cfg = OptimizerConfig(lr_schedule="cosine", warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    got = [lr_factor(s, cfg) for s in range(8)]
    want = [
        0.5,
        1.0,
        1.0,
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
        0.55,
        0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4)),
        0.1,
        0.1,
    ]
    assert got == pytest.approx(want)
    assert [lr_factor(s, OptimizerConfig()) for s in range(3)] == [1.0, 1.0, 1.0]


def test_optimizer_config_rejects_bad_schedule() -> None:
    with pytest.raises(ValueError, match="lr_schedule"):
        OptimizerConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="total_steps"):
        OptimizerConfig(lr_schedule="cosine", warmup_steps=5, total_steps=5)


def test_prompt_token_lists_strip_left_padding() -> None:
    assert prompt_token_lists(two_rows([[1, 0, 0], [1, 0, 0]])) == [[5, 6], [7, 8, 9]]


@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Completion:
    token_ids: list[int]
    logprobs: list[dict[int, _Logprob]]
    finish_reason: str


def test_response_fields_pad_mask_and_truncation() -> None:
    completions = [
        _Completion([7, 1], [{7: _Logprob(-0.5)}, {1: _Logprob(-1.5)}], "stop"),
        _Completion([8, 9, 9], [{8: _Logprob(-0.1)}, {9: _Logprob(-0.2)}, {9: _Logprob(-0.3)}], "length"),
    ]
    fields = response_fields(completions, width=3, pad_token_id=0)
    assert fields[Keys.RESPONSE_IDS].tolist() == [[7, 1, 0], [8, 9, 9]]
    assert fields[Keys.RESPONSE_MASK].tolist() == [[1, 1, 0], [1, 1, 1]]
    want = torch.tensor([[-0.5, -1.5, 0.0], [-0.1, -0.2, -0.3]])
    assert torch.equal(fields[Keys.ROLLOUT_LOGPROBS], want)
    assert fields[Keys.TRUNCATED].tolist() == [False, True]
    assert fields[Keys.FINISH_REASON] == ["stop", "length"]


class DrawingEngine:
    """Stands in for ``vllm.LLM`` in the seeding test: each generate draws from every RNG vLLM may use."""

    def generate(self, requests: list, params: object, use_tqdm: bool) -> list:
        import random

        import numpy as np

        return [torch.rand(3).tolist(), np.random.randint(0, 2**62, size=3).tolist(), random.random()]


def _replica_rank_draws(caller_seed: int) -> tuple[list, list, bool]:
    """Two generate calls of a T=2 rollout whose caller's RNGs were seeded with ``caller_seed``."""
    import random

    import numpy as np

    from flowrl.engines.vllm_rollout import VLLMRollout, VLLMRolloutConfig

    rollout = object.__new__(VLLMRollout)
    rollout.config, rollout.llm, rollout._calls = (
        VLLMRolloutConfig(model_path="-", seed=7, tensor_parallel_size=2),
        DrawingEngine(),
        0,
    )
    torch.manual_seed(caller_seed), np.random.seed(caller_seed), random.seed(caller_seed)
    expected = (torch.rand(1).item(), np.random.rand(), random.random())
    torch.manual_seed(caller_seed), np.random.seed(caller_seed), random.seed(caller_seed)
    first, second = rollout._sample([], None), rollout._sample([], None)
    untouched = (torch.rand(1).item(), np.random.rand(), random.random()) == expected
    return first, second, untouched


def test_replica_ranks_seed_every_rng_vllm_draws_from() -> None:
    """The GPU model runner seeds unseeded requests from NumPy: every RNG must agree across a replica."""
    rank0, rank1 = _replica_rank_draws(100), _replica_rank_draws(101)  # the trainers' RNGs differ
    assert rank0[:2] == rank1[:2]  # same draws, call by call, from torch, NumPy and Python
    assert rank0[0] != rank0[1]  # each call draws anew
    assert rank0[2] and rank1[2]  # the caller's generators are given back as they were
