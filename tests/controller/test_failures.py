"""Failures on a real local Ray cluster: they surface in the driver, named and fast, never as a hang."""

import os
import re
import time

import pytest
import ray
import torch
import torch.distributed as dist

from flowrl.batch import Batch
from flowrl.controller import Dispatch, ResourcePool, Worker, WorkerError, WorkerGroup, init_ray, register
from flowrl.keys import Keys


class ErrWorker(Worker):
    @register(Dispatch.ONE_TO_ALL)
    def all_reduce(self, value: float) -> float:
        self.init_distributed()
        t = torch.tensor([value * (self.rank + 1)])
        dist.all_reduce(t)
        return t.item()

    @register(Dispatch.ONE_TO_ALL)
    def reject(self, x: int) -> None:
        raise ValueError(f"x={x} is not allowed on rank {self.rank}")

    @register(Dispatch.DP_COMPUTE, blocking=False)
    def broken_producer(self, batch: Batch) -> Batch:
        return batch.select("column_that_is_not_there")

    @register(Dispatch.DP_COMPUTE)
    def consume(self, batch: Batch) -> Batch:
        return batch

    @register(Dispatch.ONE_TO_ALL)
    def fail_while_peer_waits(self) -> float:
        if self.rank == 1:
            raise RuntimeError("rank 1 gives up before the all-reduce")
        t = torch.ones(1)
        dist.all_reduce(t)  # rank 0 waits here for a rank that never comes
        return t.item()


class Fragile(Worker):
    def __init__(self, fail: bool) -> None:
        if fail:
            raise RuntimeError("cannot load the model from /nowhere")

    @register(Dispatch.ONE_TO_ALL)
    def crash(self) -> None:
        os._exit(3)


@pytest.fixture(scope="module")
def cluster():
    init_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def errs(cluster):
    return WorkerGroup(ResourcePool(2, num_cpus_per_bundle=0.5), ErrWorker, failure_grace_s=1.0)


def test_a_raise_on_every_rank_names_method_rank_and_traceback(errs):
    assert errs.all_reduce(2.0) == [6.0, 6.0]  # 2*1 + 2*2 over two CPU ranks
    with pytest.raises(WorkerError) as info:
        errs.reject(5)
    e = info.value
    message = str(e)
    assert re.search(
        r"ErrWorker\.reject \(role 'ErrWorker'\) failed on rank [01] of 2: ValueError: x=5", message
    )
    assert "Traceback (most recent call last)" in message
    assert (
        'raise ValueError(f"x={x} is not allowed on rank {self.rank}")' in message
    )  # the worker's source line
    assert re.search(r"ranks \[[01]\] failed too", message)
    assert (e.method, e.role, e.remote_type) == ("reject", "ErrWorker", "ValueError") and e.rank in (0, 1)
    assert errs.all_reduce(1.0) == [3.0, 3.0]  # every rank finished: the group is still usable


def test_a_failed_future_is_reported_by_its_consumer_with_the_producers_name(errs):
    future = errs.broken_producer(Batch({Keys.SCORES: torch.zeros(4)}))
    with pytest.raises(WorkerError, match=r"ErrWorker\.broken_producer .* KeyError: .*missing keys"):
        errs.consume(future)
    assert not future.materialized
    assert errs.all_reduce(1.0) == [3.0, 3.0]


def test_fail_fast_when_the_pool_cannot_be_reserved(errs):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"asked for 9 bundles .* = 9 CPU, cluster has \{'CPU': '4 "):
        ResourcePool(9)
    with pytest.raises(
        RuntimeError, match=r"asked for 1 bundles .* = 0.5 CPU, 1 GPU, cluster has .*'GPU': '0 "
    ):
        ResourcePool(1, use_gpu=True, num_cpus_per_bundle=0.5)
    # 4 CPUs exist, but the group above holds one of them
    with pytest.raises(RuntimeError, match=r"could not reserve 4 bundles .* within 1 s; free now"):
        ResourcePool(4, ready_timeout_s=1.0)
    assert time.monotonic() - t0 < 10
    with pytest.raises(RuntimeError, match="max_colocate_count=1"):
        WorkerGroup(errs.pool, ErrWorker)


@pytest.mark.timeout(60)
def test_a_rank_blocked_in_a_collective_does_not_hang_the_driver(errs):
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        errs.fail_while_peer_waits()
    elapsed = time.monotonic() - t0
    message = str(info.value)
    assert "ErrWorker.fail_while_peer_waits (role 'ErrWorker') failed on rank 1 of 2" in message
    assert "rank 1 gives up before the all-reduce" in message and "Traceback" in message
    assert "Ranks [0] were still running 1 s after this failure" in message
    assert elapsed < 10, f"the failure took {elapsed:.1f} s to surface"
    with pytest.raises(WorkerError, match="was shut down"):
        errs.all_reduce(1.0)


@pytest.mark.timeout(120)
def test_constructor_failure_and_process_death(cluster):
    pool = ResourcePool(1, num_cpus_per_bundle=0.5)
    with pytest.raises(
        WorkerError, match=r"Fragile\.__init__ .* rank 0 of 1: RuntimeError: cannot load the model"
    ):
        WorkerGroup(pool, Fragile, args=(True,))
    group = WorkerGroup(pool, Fragile, args=(False,))  # the failed group gave its share back
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"Fragile\.crash .* rank 0 of 1: its worker process died"):
        group.crash()
    assert time.monotonic() - t0 < 30


class Napper(Worker):
    @register(Dispatch.ONE_TO_ALL)
    def nap(self, seconds_by_rank: list[float]) -> int:
        time.sleep(seconds_by_rank[self.rank])
        return self.rank


@pytest.mark.timeout(90)
def test_a_rank_that_hangs_while_alive_is_named_and_the_group_stopped(cluster):
    group = WorkerGroup(ResourcePool(2, num_cpus_per_bundle=0.5), Napper, hang_timeout_s=3.0)
    assert group.nap([0.0, 1.0]) == [0, 1]  # a peer 1 s late is within the limit
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        group.nap([0.0, 600.0])  # rank 1 never comes back
    elapsed = time.monotonic() - t0
    message = str(info.value)
    assert (
        "Napper.nap (role 'Napper'): ranks [1] were still running 3 s after ranks [0] had returned" in message
    )
    assert info.value.rank == 1 and info.value.method == "nap"
    assert 3.0 <= elapsed < 20, f"the hang took {elapsed:.1f} s to surface"
    with pytest.raises(WorkerError, match="was shut down"):
        group.nap([0.0, 0.0])
    group.pool.shutdown()
