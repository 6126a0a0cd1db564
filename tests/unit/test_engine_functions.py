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


# ---- FSDPEngine.accumulate_gradients: the normaliser and the metrics (no FSDP) -------------
class _OneParameterEngine:
    """What ``FSDPEngine.accumulate_gradients`` uses of ``self``, on one rank without FSDP:
    the "model" has one weight w and its log-probs are w * OLD_LOGPROBS."""

    dp_size = 1
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.ones_(self.model.weight)  # w = 1

    def _micro_batches(self, batch: Batch, micro_batch_size: int) -> list[Batch]:
        return batch.split(micro_batch_size)

    def _all_gather_floats(self, values: list[float]) -> torch.Tensor:
        return torch.tensor([values], dtype=torch.float64)  # [W=1, n]

    def _forward(self, micro: Batch, temperature: float, with_entropy: bool) -> dict[str, torch.Tensor]:
        return {Keys.LOGPROBS: self.model.weight[0, 0] * micro[Keys.OLD_LOGPROBS]}  # [b, R]


def _batch_with_an_empty_response(rows: int = 8, width: int = 5) -> Batch:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    lengths[2] = 0  # an empty response: no token counts
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()  # [B, R]
    return Batch({Keys.OLD_LOGPROBS: torch.randn(rows, width, generator=g), Keys.RESPONSE_MASK: mask})


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_engine_normaliser_matches_aggregate_of_the_whole_batch(mode: str, monkeypatch) -> None:
    """With an empty-response row, the engine's summed micro-batch losses and the gradient
    equal ``aggregate`` over the whole batch: one definition of N_seqs (``loss_counts``)."""
    from flowrl.algos import aggregate
    from flowrl.engines.fsdp import FSDPEngine

    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *args, **kwargs: None)
    batch, engine = _batch_with_an_empty_response(), _OneParameterEngine()

    def loss_fn(micro: Batch, out: dict[str, torch.Tensor], norm) -> tuple[torch.Tensor, dict]:
        mask = micro[Keys.RESPONSE_MASK]
        return aggregate(out[Keys.LOGPROBS], mask, mode, norm.global_tokens, norm.global_seqs), {}

    result = FSDPEngine.accumulate_gradients(engine, batch, loss_fn, 2)  # type: ignore[arg-type]
    w = torch.ones((), requires_grad=True)
    whole = aggregate(w * batch[Keys.OLD_LOGPROBS], batch[Keys.RESPONSE_MASK], mode)
    whole.backward()
    assert abs(result["loss"] - whole.item()) <= 1e-6
    assert abs(engine.model.weight.grad.item() - w.grad.item()) <= 1e-6


def test_engine_reduces_max_and_min_metrics_over_micro_batches(monkeypatch) -> None:
    """A metric named ``*_max`` is the max over micro-batches, not the mean of their maxima."""
    from flowrl.engines.fsdp import FSDPEngine

    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *args, **kwargs: None)
    parts = iter([1.0, 4.0, 2.0, 3.0])

    def loss_fn(micro: Batch, out: dict[str, torch.Tensor], norm) -> tuple[torch.Tensor, dict]:
        v = next(parts)
        metrics = {"rollout_logprob_diff_max": torch.tensor(v), "score_min": -v, "ppo_kl": v}
        return out[Keys.LOGPROBS].sum() * 0.0, metrics

    engine, batch = _OneParameterEngine(), _batch_with_an_empty_response()
    result = FSDPEngine.accumulate_gradients(engine, batch, loss_fn, 2)  # type: ignore[arg-type]
    assert result["rollout_logprob_diff_max"] == 4.0
    assert result["score_min"] == -4.0
    assert result["ppo_kl"] == 2.5


def test_engine_counts_of_rollout_sequence_and_pair_batches() -> None:
    """Tokens and sequences each batch kind adds to the ``Normalizer``."""
    from flowrl.algos import loss_counts
    from flowrl.engines.fsdp import _loss_counts

    rollout = _batch_with_an_empty_response()
    mask = rollout[Keys.RESPONSE_MASK]
    assert _loss_counts(rollout) == tuple(float(c) for c in loss_counts(mask)) == (mask.sum().item(), 7.0)
    loss_mask = torch.tensor([[0.0, 1, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]])  # SFT: row 1 has no target
    sft = Batch({Keys.INPUT_IDS: torch.ones(3, 4, dtype=torch.long), Keys.LOSS_MASK: loss_mask})
    assert _loss_counts(sft) == (3.0, 2.0)
    pairs = Batch(
        {
            Keys.CHOSEN_IDS: torch.ones(2, 3, dtype=torch.long),
            Keys.CHOSEN_MASK: torch.tensor([[1, 1, 0], [1, 1, 1]]),
            Keys.REJECTED_IDS: torch.ones(2, 3, dtype=torch.long),
            Keys.REJECTED_MASK: torch.tensor([[1, 0, 0], [1, 1, 0]]),
        }
    )
    assert _loss_counts(pairs) == (8.0, 2.0)  # both sequences' tokens; every pair counts
