"""A metric named ``*_max`` is a maximum wherever parts are combined (micro-batches in the
engine: tests/unit/test_engine_functions.py; ranks and mini-batches here), ``*_min`` a minimum,
everything else a mean; and the rollout's max |delta| ignores what masked positions hold."""

from __future__ import annotations

import math

import pytest
import torch

from flowrl.batch import Batch
from flowrl.drivers.steps import rollout_metrics, update_metrics
from flowrl.keys import Keys
from flowrl.trainer.tracking import mean_metrics


def test_metric_reduction_by_name() -> None:
    from flowrl.algos import metric_reduction

    assert metric_reduction("actor/rollout_logprob_diff_max") == "max"
    assert metric_reduction("reward/max") == "max"
    assert metric_reduction("critic/score_min") == "min"
    assert metric_reduction("reward/min") == "min"
    for name in ("actor/ppo_kl", "actor/maximum", "perf/max_tokens", "timing/step"):
        assert metric_reduction(name) == "mean", name


def test_reduce_metric_of_floats_and_device_tensors() -> None:
    from flowrl.algos import reduce_metric

    assert reduce_metric("a_max", [1.0, 4.0, 2.0]) == 4.0
    assert reduce_metric("a_min", [1.0, -4.0, 2.0]) == -4.0
    assert reduce_metric("a", [1.0, 4.0, 1.0]) == 2.0
    parts = [torch.tensor(1.0), 4.0, torch.tensor(2.0)]  # tensors and floats, as losses return them
    assert float(reduce_metric("a_max", parts)) == 4.0
    assert float(reduce_metric("a", parts)) == pytest.approx(7 / 3)
    with pytest.raises(ValueError, match="no values for metric 'a_max'"):
        reduce_metric("a_max", [])


def test_mean_metrics_takes_max_and_min_of_max_and_min_keys() -> None:
    per_rank = [
        {"actor/rollout_logprob_diff_max": 0.5, "actor/x_min": 1.0, "actor/ppo_kl": 1.0},
        {"actor/rollout_logprob_diff_max": 2.0, "actor/x_min": -1.0, "actor/ppo_kl": 3.0},
        {"actor/rollout_logprob_diff_max": torch.tensor(1.0)},
    ]
    assert mean_metrics(per_rank) == {
        "actor/rollout_logprob_diff_max": 2.0,
        "actor/x_min": -1.0,
        "actor/ppo_kl": 2.0,
    }


def test_update_metrics_max_over_ranks_and_mini_batches() -> None:
    key = "actor/rollout_logprob_diff_max"
    rank0 = [{key: 0.1, "actor/ppo_kl": 0.0}, {key: 0.9}]  # mini-batch steps of rank 0
    rank1 = [{key: 0.3, "actor/ppo_kl": 0.2}, {key: 0.2}]
    out = update_metrics([rank0, rank1])
    assert out[key] == 0.9
    assert out["actor/ppo_kl"] == pytest.approx(0.1)
    assert out["actor/first_ppo_kl"] == pytest.approx(0.1)


def test_rollout_metrics_ignore_nan_and_inf_at_masked_positions() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    nan, inf = float("nan"), float("inf")
    old = torch.tensor([[-1.0, -2.0, nan, -inf], [-0.5, inf, 0.0, 0.0], [0.0] * 4])
    rollout = torch.tensor([[-1.1, -1.7, -1.0, 0.0], [-0.5, -1.0, nan, -inf], [nan] * 4])
    batch = Batch(
        {
            Keys.RESPONSE_MASK: mask,
            Keys.SCORES: torch.tensor([1.0, 0.0, 0.5]),
            Keys.TRUNCATED: torch.tensor([False, False, True]),
            Keys.OLD_LOGPROBS: old,
            Keys.ROLLOUT_LOGPROBS: rollout,
        }
    )
    metrics = rollout_metrics(batch)
    # valid delta = old - rollout: 0.1, -0.3, 0.0
    assert metrics["rollout/logprob_diff_max"] == pytest.approx(0.3)
    assert metrics["rollout/logprob_diff_mean"] == pytest.approx(0.4 / 3)
    ratio_err = (abs(math.exp(0.1) - 1) + abs(math.exp(-0.3) - 1)) / 3
    assert metrics["rollout/prob_ratio_err"] == pytest.approx(ratio_err)
    assert all(math.isfinite(v) for v in metrics.values())
