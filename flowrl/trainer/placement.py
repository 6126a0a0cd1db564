"""Placement: which Ray cluster, which machines, and which roles share the actor's devices.

The ``placement`` section of the run config decides it (docs/scaling.md):

- ``ray_address``: ``None`` starts a Ray cluster in the driver's process tree; ``"auto"``
  (or ``"ip:port"``) joins one started with ``ray start`` on each machine.
- ``nnodes``: the actor's ``trainer.num_workers`` workers spread evenly over that many
  machines, ranks in machine order (a tensor-parallel rollout replica never spans two).
- ``separate``: roles (``critic``, ``reward_model``) that get ``separate_workers`` workers
  of their own instead of living in the actor's processes. Everything else (actor,
  rollout, reference) is colocated: one process per device holds all of them.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig

from flowrl.controller import ResourcePool, WorkerGroup, init_ray
from flowrl.controller.worker import Worker

ROLE_OF = {"critic": "critic", "reward_model": "rm"}  # placement.separate name -> runtime role


def total_workers(cfg: DictConfig) -> int:
    """Devices (GPU) or CPU bundles the run reserves: the actor's plus each separate role's."""
    p = cfg.placement
    return cfg.trainer.num_workers + p.separate_workers * len(p.separate)


def connect_ray(cfg: DictConfig) -> dict[str, float]:
    """Join ``placement.ray_address``, or start a local cluster sized for the run; its resources."""
    p, t = cfg.placement, cfg.trainer
    return connect(p.ray_address, total_workers(cfg) if t.use_gpu else None)


def connect(ray_address: str | None, num_gpus: int | None) -> dict[str, float]:
    """Join the cluster at ``ray_address`` ("auto", "ip:port"), or start a local one with ``num_gpus``."""
    if ray_address:
        return init_ray(address=ray_address)
    return init_ray(num_gpus=num_gpus)


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

    ``roles`` maps runtime role names (``actor``, ``ref``, ``critic``, ``rm``) to worker
    classes, in build order. Returns one group view per role.
    """
    p, t = cfg.placement, cfg.trainer
    separate = {ROLE_OF[name] for name in p.separate}
    shared = {role: cls for role, cls in roles.items() if role not in separate}
    pool = ResourcePool(
        t.num_workers, use_gpu=t.use_gpu, num_cpus_per_bundle=p.cpus_per_worker, nnodes=p.nnodes
    )
    groups = WorkerGroup.colocated(pool, shared, hang_timeout_s=t.hang_timeout_s)
    for role, cls in roles.items():
        if role in separate:
            own = ResourcePool(p.separate_workers, use_gpu=t.use_gpu, num_cpus_per_bundle=p.cpus_per_worker)
            groups |= WorkerGroup.colocated(own, {role: cls}, hang_timeout_s=t.hang_timeout_s)
    return groups


def shutdown_groups(groups: Mapping[str, WorkerGroup]) -> None:
    """Stop every group's processes and give its pool back (colocated views share both)."""
    by_pool = {id(group.pool): group for group in groups.values()}
    for group in by_pool.values():
        group.shutdown()
        group.pool.shutdown()
