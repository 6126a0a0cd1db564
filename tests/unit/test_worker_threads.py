"""How many CPUs and torch threads each worker gets (flowrl/trainer/placement.py); no Ray."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from flowrl.config import Config, PlacementConfig
from flowrl.trainer.placement import (
    cpus_per_worker,
    log_pattern,
    share_of_node,
    shown_log_files,
    worker_threads,
    workers_per_node,
)


def config(*overrides: str):
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(list(overrides)))


@pytest.mark.parametrize(
    "node_cpus, workers, nnodes, expected",
    [
        ([2.0], 1, 1, 2.0),  # one worker takes the whole 2-core machine
        ([2.0], 2, 1, 1.0),
        ([2.0], 3, 1, 0.6666),  # rounded down to Ray's 1e-4 CPU: 3 bundles still fit
        ([16.0], 3, 1, 5.3333),
        ([0.0, 16.0], 2, 1, 8.0),  # a head node without CPUs does not count
        ([64.0, 8.0, 32.0], 4, 2, 8.0),  # two nodes must hold 4 each: the second largest has 32
        ([8.0], 2, 2, 4.0),  # fewer nodes than asked: the pool's own check will say so
        ([], 2, 1, 1.0),
    ],
)
def test_share_of_node(node_cpus, workers, nnodes, expected):
    assert share_of_node(node_cpus, workers, nnodes) == expected


def test_the_default_is_null_and_an_explicit_number_is_kept_without_asking_ray():
    assert PlacementConfig().cpus_per_worker is None
    assert cpus_per_worker(config("placement.cpus_per_worker=1.5")) == 1.5


def test_workers_per_node_counts_the_actors_share_and_separate_roles():
    assert workers_per_node(config("trainer.num_workers=2")) == 2
    separate = ("placement.separate=[critic]", "placement.separate_workers=2")
    cfg = config("trainer.num_workers=4", "placement.nnodes=2", *separate)
    assert workers_per_node(cfg) == 2 + 2


@pytest.mark.parametrize(
    "cpus, environ, expected",
    [
        (2.0, {}, (2, "placement.cpus_per_worker")),
        (1.0, {}, (1, "placement.cpus_per_worker")),
        (0.6666, {}, (1, "placement.cpus_per_worker")),  # at least one thread
        (5.3333, {}, (5, "placement.cpus_per_worker")),  # whole CPUs
        (8.0, {"OMP_NUM_THREADS": "1"}, (1, "OMP_NUM_THREADS")),  # the user's export wins
        (1.0, {"OMP_NUM_THREADS": "4"}, (4, "OMP_NUM_THREADS")),
        (2.0, {"OMP_NUM_THREADS": "0"}, (2, "placement.cpus_per_worker")),  # not a usable count: ignored
        (2.0, {"OMP_NUM_THREADS": ""}, (2, "placement.cpus_per_worker")),
    ],
)
def test_worker_threads(cpus, environ, expected):
    assert worker_threads(cpus, environ) == expected


def test_log_files_are_named_per_rank_in_the_run_dir_unless_on_the_console():
    cfg = config("trainer.run_dir=runs/x")
    assert log_pattern(cfg, "worker") == "runs/x/logs/worker_{rank}.log"
    assert shown_log_files("runs/x/logs/worker_{rank}.log", 2) == "runs/x/logs/worker_{0..1}.log"
    assert shown_log_files("runs/x/logs/critic_{rank}.log", 1) == "runs/x/logs/critic_0.log"
    assert log_pattern(config("trainer.worker_logs=console"), "worker") is None
