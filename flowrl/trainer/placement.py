"""Placement: which Ray cluster, which machines, and which roles share the actor's devices.

The ``placement`` section of the run config decides it (docs/scaling.md):

- ``ray_address``: ``None`` starts a Ray cluster in the driver's process tree; ``"auto"``
  (or ``"ip:port"``) joins one started with ``ray start`` on each machine.
- ``nnodes``: the actor's ``trainer.num_workers`` workers spread evenly over that many
  machines, ranks in machine order (a tensor-parallel rollout replica never spans two).
- ``separate``: roles (``critic``, ``reward_model``, ``teacher``) that get ``separate_workers`` workers
  of their own instead of living in the actor's processes. Everything else (actor,
  rollout, reference) is colocated: one process per device holds all of them.
- ``cpus_per_worker``: CPUs reserved per worker; ``None`` shares a node's CPUs among the
  workers placed on it. Each worker runs that many torch threads (whole CPUs, at least 1),
  unless the driver's environment sets ``OMP_NUM_THREADS``, which then wins.

``trainer.worker_logs`` decides where the workers' own output goes: ``files`` (each process
its ``RUN_DIR/logs/worker_<rank>.log``, nothing of it on the console) or ``console``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping

from omegaconf import DictConfig

from flowrl.controller import ResourcePool, WorkerGroup, init_ray
from flowrl.controller.ray_init import QUIET, node_cpus
from flowrl.controller.worker import Worker

ROLE_OF = {"critic": "critic", "reward_model": "rm", "teacher": "teacher"}  # placement.separate name -> runtime role

def rollout_concurrency(max_staleness: int) -> int:
    """Calls a rollout worker serves at once: the K+1 queued generates, receive_weights and stats,
    so new weights are never held up behind the queue."""
    return max_staleness + 3



def total_workers(cfg: DictConfig) -> int:
    """Devices (GPU) or CPU bundles the run reserves: the actor's plus each separate role's."""
    p = cfg.placement
    return cfg.trainer.num_workers + p.separate_workers * len(p.separate) + p.rollout_workers


def workers_per_node(cfg: DictConfig) -> int:
    """Workers on the busiest node: the actor's share of a node, plus every separate role's
    workers (each such pool is packed onto one node, which may be the actor's)."""
    p = cfg.placement
    return cfg.trainer.num_workers // p.nnodes + p.separate_workers * len(p.separate) + p.rollout_workers


def announce(cfg: DictConfig, line: str) -> None:
    """One start-up line of flowrl's own on the console (stderr), unless ``trainer.quiet``."""
    if not cfg.trainer.quiet:
        print(f"flowrl: {line}", file=sys.stderr, flush=True)


FIRST_STEP_HANG_S = 1800.0  # before any step has been timed (start-up, the first rollout)
MIN_HANG_S = 300.0


def first_hang_timeout(setting: float | None) -> float | None:
    """The hang timeout a group starts with: the setting, or (null) the first-step allowance."""
    return FIRST_STEP_HANG_S if setting is None else setting


def hang_timeout_for(slowest_step_s: float) -> float:
    """The automatic hang timeout once steps have been timed: 10 x the slowest, at least 300 s."""
    return max(MIN_HANG_S, 10.0 * slowest_step_s)


def connect_ray(cfg: DictConfig) -> dict[str, float]:
    """Join ``placement.ray_address``, or start a local cluster sized for the run; its resources.

    With ``trainer.worker_logs=files`` Ray keeps its own lines and the workers' output off
    the console (``QUIET``)."""
    p, t = cfg.placement, cfg.trainer
    announce(cfg, f"joining Ray at {p.ray_address} ..." if p.ray_address else "starting Ray ...")
    return connect(p.ray_address, total_workers(cfg) if t.use_gpu else None, quiet=t.worker_logs == "files")


def connect(ray_address: str | None, num_gpus: int | None, quiet: bool = False) -> dict[str, float]:
    """Join the cluster at ``ray_address`` ("auto", "ip:port"), or start a local one with ``num_gpus``."""
    options = QUIET if quiet else {}
    if ray_address:
        return init_ray(address=ray_address, **options)
    return init_ray(num_gpus=num_gpus, **options)


def share_of_node(node_cpus: list[float], workers: int, nnodes: int = 1) -> float:
    """CPUs per worker when ``workers`` share a node: the CPUs of the ``nnodes``-th largest node
    (so ``nnodes`` nodes have that many) divided by ``workers``, rounded down to 1e-4 (Ray's unit).

    ``share_of_node([2.0], 2) == 1.0``; ``share_of_node([2.0], 3) == 0.6666``;
    ``share_of_node([64.0, 8.0, 32.0], 4, nnodes=2) == 8.0``. No node with CPUs: 1.0 (the
    pool's check then says what the cluster lacks).
    """
    sizes = sorted((c for c in node_cpus if c > 0), reverse=True)
    if not sizes:
        return 1.0
    node = sizes[min(nnodes, len(sizes)) - 1]
    return math.floor(node / max(workers, 1) * 1e4) / 1e4


def cpus_per_worker(cfg: DictConfig) -> float:
    """``placement.cpus_per_worker``, or (``null``) a node's CPUs shared by the workers on it,
    from the running Ray cluster's resources."""
    p = cfg.placement
    if p.cpus_per_worker is not None:
        return float(p.cpus_per_worker)
    return share_of_node(node_cpus(), workers_per_node(cfg), p.nnodes)


def worker_threads(cpus: float, environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """Torch (OpenMP) threads of a worker with ``cpus`` CPUs, and where the number comes from.

    ``OMP_NUM_THREADS`` set in the driver's environment (``environ``) wins: the user asked for
    it. Otherwise the worker's whole CPUs, at least 1 (what Ray itself would set).
    """
    given = environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) >= 1:
        return int(given), "OMP_NUM_THREADS"
    return max(1, math.floor(cpus)), "placement.cpus_per_worker"


def log_pattern(cfg: DictConfig, name: str) -> str | None:
    """``RUN_DIR/logs/<name>_{rank}.log`` with ``trainer.worker_logs=files``, else None."""
    if cfg.trainer.worker_logs != "files":
        return None
    return os.path.join(cfg.trainer.run_dir, "logs", f"{name}_{{rank}}.log")


def shown_log_files(pattern: str, n: int) -> str:
    """``runs/x/logs/worker_{0..3}.log`` (shell brace syntax: ``tail -f`` takes it as it is)."""
    return pattern.replace("{rank}", "0" if n == 1 else f"{{0..{n - 1}}}")


def place_one_role(
    cls: type[Worker], num_workers: int, use_gpu: bool, cpus_per_worker: float = 1.0, nnodes: int = 1
) -> WorkerGroup:
    """The worker group of a program with one role (SFT, reward-model training): ``num_workers``
    ranks spread evenly over ``nnodes`` machines. Its pool is ``group.pool`` (``shutdown_groups``)."""
    pool = ResourcePool(num_workers, use_gpu=use_gpu, num_cpus_per_bundle=cpus_per_worker, nnodes=nnodes)
    try:
        return WorkerGroup(pool, cls)
    except BaseException:
        pool.shutdown()
        raise


def place_workers(cfg: DictConfig, roles: Mapping[str, type[Worker]]) -> dict[str, WorkerGroup]:
    """Start the worker groups: the colocated roles on the actor's pool, each separate role on its own.

    ``roles`` maps runtime role names (``actor``, ``ref``, ``critic``, ``rm``, ``teacher``) to worker
    classes, in build order. Returns one group view per role.
    """
    p, t = cfg.placement, cfg.trainer
    separate = {ROLE_OF[name] for name in p.separate} | {"rollout"}  # rollout workers: split placement
    shared = {role: cls for role, cls in roles.items() if role not in separate}
    cpus = cpus_per_worker(cfg)
    options = {"hang_timeout_s": first_hang_timeout(t.hang_timeout_s), "env": {"OMP_NUM_THREADS": str(worker_threads(cpus)[0])}}
    announce_workers(cfg, list(shared), [role for role in roles if role in separate], cpus)
    pool = ResourcePool(t.num_workers, use_gpu=t.use_gpu, num_cpus_per_bundle=cpus, nnodes=p.nnodes)
    groups = WorkerGroup.colocated(pool, shared, log_path=log_pattern(cfg, "worker"), **options)
    for role, cls in roles.items():
        if role in separate:
            count = p.rollout_workers if role == "rollout" else p.separate_workers
            own = ResourcePool(count, use_gpu=t.use_gpu, num_cpus_per_bundle=cpus)
            threads = rollout_concurrency(p.max_staleness) if role == "rollout" else 1
            groups |= WorkerGroup.colocated(own, {role: cls}, log_path=log_pattern(cfg, role), concurrency=threads, **options)
    return groups


def announce_workers(cfg: DictConfig, shared: list[str], separate: list[str], cpus: float) -> None:
    """``starting 2 workers (actor, ref), 1 CPU thread each ...``, then where their output goes."""
    p, t = cfg.placement, cfg.trainer
    threads, source = worker_threads(cpus)
    count = {role: p.rollout_workers if role == "rollout" else p.separate_workers for role in separate}
    extra = "".join(f" + {plural(count[role], 'worker')} ({role})" for role in separate)
    why = " (from OMP_NUM_THREADS)" if source == "OMP_NUM_THREADS" else ""
    each = f"{plural(threads, 'CPU thread')} each{why}"
    announce(cfg, f"starting {plural(t.num_workers, 'worker')} ({', '.join(shared)}){extra}, {each} ...")
    pattern = log_pattern(cfg, "worker")
    if pattern is None:
        return
    files = [shown_log_files(pattern, t.num_workers)]
    files += [shown_log_files(log_pattern(cfg, role) or "", count[role]) for role in separate]
    announce(cfg, f"worker output: {' '.join(files)} (trainer.worker_logs=console shows it here)")


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def shutdown_groups(groups: Mapping[str, WorkerGroup]) -> None:
    """Stop every group's processes and give its pool back (colocated views share both)."""
    by_pool = {id(group.pool): group for group in groups.values()}
    for group in by_pool.values():
        group.shutdown()
        group.pool.shutdown()
