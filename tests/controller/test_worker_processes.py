"""What each worker process is given: its torch threads (placement.cpus_per_worker) and its own
log file for stdout and stderr (trainer.worker_logs=files), on a real local Ray cluster."""

import os
import sys

import pytest
import ray
import torch
from omegaconf import OmegaConf

from flowrl.config import Config
from flowrl.controller import Dispatch, ResourcePool, Worker, WorkerError, WorkerGroup, init_ray, register
from flowrl.trainer.placement import cpus_per_worker, place_workers, shutdown_groups, worker_threads


class Probe(Worker):
    @register(Dispatch.ONE_TO_ALL)
    def threads(self) -> tuple[int, str | None]:
        return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    @register(Dispatch.ONE_TO_ALL)
    def chatter(self) -> int:
        print(f"python stdout of rank {self.rank}", flush=True)
        print(f"python stderr of rank {self.rank}", file=sys.stderr, flush=True)
        os.write(1, f"fd-level write of rank {self.rank}\n".encode())  # what C code (vLLM, gloo) does
        return self.rank

    @register(Dispatch.ONE_TO_ALL)
    def crash(self) -> None:
        print("last words before the crash", flush=True)
        os._exit(3)


@pytest.fixture(scope="module")
def cluster():
    init_ray(num_cpus=2)  # the driver's OMP_NUM_THREADS=1 (tests/conftest.py) is in the cluster's env
    yield
    ray.shutdown()


def config(tmp_path, *overrides: str):
    base = [f"trainer.run_dir={tmp_path / 'run'}", *overrides]
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(base))


@pytest.mark.parametrize("workers, threads", [(1, 2), (2, 1)])
def test_worker_threads_follow_the_cpus_computed_at_placement(
    cluster, tmp_path, monkeypatch, capsys, workers, threads
):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # nothing exported: the CPUs decide
    cfg = config(tmp_path, f"trainer.num_workers={workers}")
    cpus = cpus_per_worker(cfg)
    assert cpus == 2.0 / workers  # the node's 2 CPUs shared by its workers
    assert worker_threads(cpus) == (threads, "placement.cpus_per_worker")
    groups = place_workers(cfg, {"actor": Probe})
    try:
        assert groups["actor"].threads() == [(threads, str(threads))] * workers
        assert groups["actor"].pool.num_cpus_per_bundle == cpus
    finally:
        shutdown_groups(groups)
    started = {
        1: "starting 1 worker (actor), 2 CPU threads each ...",
        2: "starting 2 workers (actor), 1 CPU thread each ...",
    }
    assert f"flowrl: {started[workers]}" in capsys.readouterr().err  # the run log states the threads


def test_an_exported_omp_num_threads_wins(cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = config(tmp_path, "trainer.num_workers=1")
    groups = place_workers(cfg, {"actor": Probe})
    try:
        assert groups["actor"].threads() == [(1, "1")]  # not the 2 its CPUs would give
    finally:
        shutdown_groups(groups)
    assert "1 CPU thread each (from OMP_NUM_THREADS)" in capsys.readouterr().err


def test_each_rank_writes_its_output_to_its_own_file(cluster, tmp_path):
    pool = ResourcePool(2, num_cpus_per_bundle=0.5)
    group = WorkerGroup(pool, Probe, log_path=str(tmp_path / "logs" / "w_{rank}.log"))
    try:
        assert group.log_paths == [str(tmp_path / "logs" / f"w_{r}.log") for r in (0, 1)]
        assert group.chatter() == [0, 1]
        for rank, path in enumerate(group.log_paths):
            text = open(path).read()
            assert text.startswith(f"==== flowrl worker process {group.pids[rank]} started ")
            for line in ("python stdout", "python stderr", "fd-level write"):
                assert f"{line} of rank {rank}\n" in text, (line, text)
    finally:
        group.shutdown()
        group.pool.shutdown()


def test_a_dead_process_error_names_its_log_file_and_shows_its_last_lines(cluster, tmp_path):
    pool = ResourcePool(1, num_cpus_per_bundle=0.5)
    group = WorkerGroup(pool, Probe, log_path=str(tmp_path / "w_{rank}.log"))
    with pytest.raises(WorkerError) as info:
        group.crash()
    message = str(info.value)
    assert "Probe.crash (role 'Probe') failed on rank 0 of 1: its worker process died" in message
    assert f"its output: {tmp_path / 'w_0.log'}" in message
    assert f"Last lines of {tmp_path / 'w_0.log'}:" in message and "last words before the crash" in message
    group.shutdown()
    group.pool.shutdown()


def test_a_log_path_without_rank_is_refused_for_several_ranks(cluster, tmp_path):
    pool = ResourcePool(2, num_cpus_per_bundle=0.5)
    with pytest.raises(ValueError, match=r"put \{rank\} in it"):
        WorkerGroup(pool, Probe, log_path=str(tmp_path / "one.log"))
    pool.shutdown()
