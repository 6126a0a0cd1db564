"""A first look at flowrl's single controller: ``python -m flowrl.demo``.

Starts Ray on this machine's CPUs and a group of two worker processes, then calls it like
an object: one method on every rank, one that splits a batch of answers over the ranks and
scores them (the way a reward worker does), and one that sums over the ranks with
``torch.distributed`` (gloo). Takes well under a minute on two cores.
"""

from __future__ import annotations

import logging
import os
import time

import ray
import torch
import torch.distributed as dist

from flowrl.batch import Batch
from flowrl.controller import Dispatch, ResourcePool, Worker, WorkerGroup, init_ray, register
from flowrl.keys import Keys


class DemoWorker(Worker):
    @register(Dispatch.ONE_TO_ALL)
    def hello(self) -> str:
        return f"rank {self.rank} of {self.world_size}, pid {os.getpid()}"

    @register(Dispatch.DP_COMPUTE)
    def score(self, batch: Batch) -> Batch:
        """1.0 where the response equals the ground truth; tags each row with this rank."""
        hits = [
            float(r.strip() == str(g)) for r, g in zip(batch[Keys.RESPONSE_TEXT], batch[Keys.GROUND_TRUTH])
        ]
        scores = torch.tensor(hits)  # [B]
        return Batch({Keys.SCORES: scores}, {Keys.WORKER_TAG: [f"rank {self.rank}"] * len(batch)})

    @register(Dispatch.ONE_TO_ALL)
    def sum_over_ranks(self, value: float) -> float:
        self.init_distributed()
        t = torch.tensor([value])
        dist.all_reduce(t)
        return t.item()


def answers() -> Batch:
    questions = ["2 + 3", "7 * 6", "10 - 4", "9 / 3", "5 + 5"]
    responses = ["5", "42", "5", "3", "11"]
    truths = [5, 42, 6, 3, 10]
    return Batch(
        non_tensors={Keys.PROMPT_TEXT: questions, Keys.RESPONSE_TEXT: responses, Keys.GROUND_TRUTH: truths}
    )


def main() -> None:
    start = time.monotonic()
    init_ray(num_cpus=max(2, os.cpu_count() or 2), logging_level=logging.ERROR)
    group = WorkerGroup(ResourcePool(2, num_cpus_per_bundle=0.5), DemoWorker)
    print(f"started {group.world_size} workers in {time.monotonic() - start:.1f} s")

    print("\nONE_TO_ALL  group.hello():")
    for line in group.hello():
        print(f"  {line}")

    batch = answers()
    scored = group.score(batch)  # 5 rows: padded to 6, 3 per rank, padding stripped again
    print("\nDP_COMPUTE  group.score(batch of 5 answers):")
    for q, r, s, w in zip(
        batch[Keys.PROMPT_TEXT], batch[Keys.RESPONSE_TEXT], scored[Keys.SCORES], scored[Keys.WORKER_TAG]
    ):
        print(f"  {q:>7} = {r:<3} score {s.item():.0f}   (scored on {w})")

    print("\nONE_TO_ALL  group.sum_over_ranks(1.5), a torch.distributed all_reduce (gloo) over both ranks:")
    print(f"  results per rank: {group.sum_over_ranks(1.5)}")
    group.shutdown()
    ray.shutdown()
    print(f"\ndone in {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
