"""The split placement's waits end in a clear error naming the side that did not answer, never a hang:
the trainer waiting for a rollout batch (a real Ray call that does not return in time), and a rollout
worker waiting for a policy version the trainer never sends."""

from __future__ import annotations

import time

import pytest
import torch
from omegaconf import OmegaConf

from flowrl.batch import Batch
from flowrl.controller import Dispatch, ResourcePool, Worker, WorkerGroup, init_ray, register
from flowrl.trainer.split_rollout import RolloutWaitTimeout, SplitRollout
from flowrl.workers.rollout import RolloutVersionTimeout, RolloutWorker


class Slow(Worker):
    @register(Dispatch.DP_COMPUTE, blocking=False)
    def submit_generate(self, prompts: Batch, seconds: float) -> Batch:
        time.sleep(seconds)
        return prompts


@pytest.fixture(scope="module")
def group():
    init_ray(num_cpus=2)
    pool = ResourcePool(1, num_cpus_per_bundle=1)
    g = WorkerGroup(pool, Slow)
    yield g
    g.shutdown()
    pool.shutdown()


def test_the_trainer_stops_waiting_for_a_stuck_rollout_and_names_it(group) -> None:
    split = SplitRollout.__new__(SplitRollout)  # its waiting alone: no trainer group needed
    split.timeout_s = 1.0
    future = group.submit_generate(Batch({"x": torch.zeros(2)}), seconds=30.0)
    start = time.monotonic()
    with pytest.raises(RolloutWaitTimeout) as e:
        split._wait(future, "the rollout of step 3")
    assert time.monotonic() - start < 10
    assert "for the rollout of step 3: rollout workers [0] did not answer" in str(e.value)
    assert "placement.sync_timeout_s" in str(e.value)


def test_a_rollout_worker_stops_waiting_for_a_version_that_never_comes() -> None:
    import queue

    worker = RolloutWorker.__new__(RolloutWorker)  # its inbox alone: no vLLM engine needed
    worker.cfg = OmegaConf.create({"placement": {"sync_timeout_s": 1.0}})
    worker.inbox, worker.version = queue.Queue(), 4
    worker.inbox.put((5, []))
    assert worker._newest(block_until=5) == (5, [])  # there: taken at once
    start = time.monotonic()
    with pytest.raises(RolloutVersionTimeout) as e:
        worker._newest(block_until=6)
    assert 0.9 < time.monotonic() - start < 10
    assert "for policy version 6 and has 4" in str(e.value) and "rollout worker" in str(e.value)
