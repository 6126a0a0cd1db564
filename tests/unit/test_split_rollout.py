"""The split placement's bookkeeping without Ray: weight buckets, staleness figures, the loader's
checkpoint position while rollouts run ahead, and the config checks."""

from __future__ import annotations

import math

import pytest
import torch

from flowrl.batch import Batch
from flowrl.config import ConfigError, load_config
from flowrl.data.sampler import DataLoader
from flowrl.engines.inflight import continuation_seed
from flowrl.engines.weight_transfer import plan_buckets
from flowrl.trainer.split_rollout import AheadLoader, staleness_metrics, step_seeds


def test_buckets_cover_the_manifest_in_order_and_close_at_the_size() -> None:
    manifest = [("a", (4, 4)), ("b", (100,)), ("c", (2,)), ("big", (1000,)), ("d", (3, 3)), ("e", (1,))]
    buckets = plan_buckets(manifest, element_size=4, bucket_bytes=200)
    assert [i for b in buckets for i in b] == list(range(len(manifest)))
    for bucket in buckets[:-1]:  # every bucket but the last reached the size before closing
        assert sum(math.prod(manifest[i][1]) * 4 for i in bucket) >= 200
        # ... and closed as soon as it did: without its last tensor it was below the size
        assert sum(math.prod(manifest[i][1]) * 4 for i in bucket[:-1]) < 200
    assert [2, 3] in buckets  # a tensor above the size joins the open bucket, which then closes
    assert plan_buckets([("x", (2,))], 4, 10**9) == [[0]] and plan_buckets([], 4, 10) == []


def test_staleness_metrics_match_a_direct_count() -> None:
    versions = torch.tensor([[5, 5, 6, -1], [4, 6, 6, 6], [6, -1, -1, -1], [3, 3, 3, 3]])  # [B, R]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    m = staleness_metrics(versions, mask, trained=6, bound=2)
    lags = [6 - v for row, mrow in zip(versions.tolist(), mask.tolist()) for v, k in zip(row, mrow) if k and v >= 0]
    assert m["async/staleness_max"] == max(lags) == 2
    assert m["async/staleness_mean"] == pytest.approx(sum(lags) / len(lags))
    for k in range(3):
        assert m[f"async/staleness_{k}"] == pytest.approx(lags.count(k) / len(lags))
    # rows 0 and 1 mix versions; row 2 has one; row 3 has no valid token (not mixed)
    assert m["async/mixed_version_seq_frac"] == pytest.approx(2 / 4)
    assert staleness_metrics(versions, torch.zeros_like(mask), 6, 2) == {}


class Rows:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def collate(self, indices) -> Batch:
        return Batch({"i": torch.tensor(list(indices))})


def test_ahead_loader_checkpoints_the_oldest_untaken_batch() -> None:
    plain, ahead = DataLoader(Rows(12), 3, seed=1), AheadLoader(DataLoader(Rows(12), 3, seed=1))
    expected = [plain.next_batch()["i"].tolist() for _ in range(4)]
    before_third = DataLoader(Rows(12), 3, seed=1)
    before_third.next_batch(), before_third.next_batch()
    got = [ahead.draw()["i"].tolist() for _ in range(3)]  # steps 1..3 drawn ahead
    assert got == expected[:3]
    ahead.taken(), ahead.taken()  # steps 1 and 2 trained; step 3 still in the queue
    assert ahead.state_dict() == before_third.state_dict()  # a resume samples step 3's prompts again
    resumed = AheadLoader(DataLoader(Rows(12), 3, seed=1))
    resumed.load_state_dict(ahead.state_dict())
    assert resumed.draw()["i"].tolist() == expected[2] and resumed.draw()["i"].tolist() == expected[3]


def test_seeds_follow_the_step_not_the_call_time() -> None:
    assert torch.equal(step_seeds(0, 7, 0, 5), step_seeds(0, 7, 0, 5))
    assert not torch.equal(step_seeds(0, 7, 0, 5), step_seeds(0, 8, 0, 5))
    assert continuation_seed(11, 3) == continuation_seed(11, 3) != continuation_seed(11, 4)
    assert continuation_seed(None, 3) is None


BASE = ["actor.model.path=/m", "data.train_files=[/t]", "rollout.n=2"]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["placement.max_staleness=2"], "needs rollout workers of their own"),
        (["placement.rollout_workers=-1"], "placement.rollout_workers=-1 must be >= 0"),
        (["placement.rollout_workers=1", "placement.max_staleness=-1"], "placement.max_staleness=-1 must be >= 0"),
        (["placement.rollout_workers=1", "placement.sync_timeout_s=0"], "placement.sync_timeout_s=0.0 must be > 0"),
        (["placement.rollout_workers=1", "rollout.backend=hf"], "needs rollout.backend=vllm"),
        (["placement.rollout_workers=1", "rollout.multi_turn.enable=true"], "does not run multi-turn rollouts yet"),
        (["placement.rollout_workers=1", "actor.offload=true"], "actor.offload frees the device for a colocated"),
        (["placement.rollout_workers=1", "placement.max_staleness=1", "algorithm.dynamic_sampling.enable=true"],
         "sampling rounds ahead of the trainer is not supported"),
    ],
)
def test_split_settings_it_cannot_honour_are_refused_in_one_line(overrides, words) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + overrides)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_split_settings_load() -> None:
    cfg = load_config(None, BASE + ["placement.rollout_workers=2", "placement.max_staleness=3"])
    assert cfg.placement.rollout_workers == 2 and cfg.placement.max_staleness == 3
