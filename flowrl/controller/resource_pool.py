"""ResourcePool: bundles of CPU (and GPU) reserved through a Ray placement group."""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class ResourcePool:
    """``num_bundles`` bundles, one per rank, reserved before any worker starts.

    Each bundle holds ``num_cpus_per_bundle`` CPUs and, with ``use_gpu``, one GPU. Up to
    ``max_colocate_count`` groups of processes may be placed on the pool (for example an
    actor group and a critic group sharing the GPUs); each process then asks for
    ``1 / max_colocate_count`` of its bundle. Several roles in *one* process need no
    colocate count: use ``WorkerGroup.colocated``.

    With ``nnodes > 1`` the bundles are spread over that many Ray nodes, ``num_bundles /
    nnodes`` on each, in rank order: bundles ``[0, k)`` on the first node (the driver's,
    when it fits), ``[k, 2k)`` on the next, ... so ranks that form a tensor-parallel group
    stay on one machine. Each bundle is pinned to its node with a label selector on
    ``ray.io/node-id``; ``node_ids`` says which node holds each bundle.

    Asking for more than the cluster has fails at once; asking for more than is free now
    fails after ``ready_timeout_s`` with the figures.
    """

    def __init__(
        self,
        num_bundles: int,
        *,
        use_gpu: bool = False,
        num_cpus_per_bundle: float = 1.0,
        max_colocate_count: int = 1,
        strategy: str = "PACK",
        ready_timeout_s: float = 30.0,
        nnodes: int = 1,
    ) -> None:
        if num_bundles < 1 or max_colocate_count < 1:
            raise ValueError(
                f"ResourcePool: num_bundles={num_bundles} and "
                f"max_colocate_count={max_colocate_count} must be >= 1"
            )
        if nnodes < 1 or num_bundles % nnodes != 0:
            raise ValueError(f"ResourcePool: num_bundles={num_bundles} must split evenly over nnodes={nnodes}")
        if not ray.is_initialized():
            raise RuntimeError("ResourcePool: Ray is not running; call flowrl.controller.init_ray() first")
        self.num_bundles = num_bundles
        self.use_gpu = use_gpu
        self.num_cpus_per_bundle = num_cpus_per_bundle
        self.max_colocate_count = max_colocate_count
        self.nnodes = nnodes
        self._groups = 0
        self._check_cluster()
        self.node_ids: list[str] | None = self._pick_nodes() if nnodes > 1 else None
        self.placement_group = self._reserve(strategy, ready_timeout_s)

    @property
    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": float(self.num_cpus_per_bundle)}
        if self.use_gpu:
            bundle["GPU"] = 1.0
        return bundle

    @property
    def world_size(self) -> int:
        return self.num_bundles

    def _asked(self) -> str:
        total = ", ".join(f"{v * self.num_bundles:g} {k}" for k, v in self.bundle.items())
        return f"{self.num_bundles} bundles of {self.bundle} = {total}"

    def _check_cluster(self) -> None:
        total, free = ray.cluster_resources(), ray.available_resources()
        short = {
            k: v * self.num_bundles
            for k, v in self.bundle.items()
            if v * self.num_bundles > total.get(k, 0.0)
        }
        largest = {
            k: max((n["Resources"].get(k, 0.0) for n in ray.nodes() if n["Alive"]), default=0.0)
            for k in self.bundle
        }
        too_big = {k: v for k, v in self.bundle.items() if v > largest[k]}
        if short or too_big:
            have = {
                k: f"{total.get(k, 0.0):g} ({free.get(k, 0.0):g} free, {largest[k]:g} on the largest node)"
                for k in self.bundle
            }
            raise RuntimeError(
                f"ResourcePool: asked for {self._asked()}, cluster has {have}. "
                "Use fewer workers or a smaller "
                "num_cpus_per_bundle, or start Ray with more resources (init_ray(num_cpus=..., num_gpus=...))"
            )

    def _pick_nodes(self) -> list[str]:
        """The node of each bundle: ``nnodes`` alive nodes that each fit their share, driver's first."""
        per_node = self.num_bundles // self.nnodes
        alive = [n for n in ray.nodes() if n["Alive"]]
        fits = [n for n in alive if all(n["Resources"].get(k, 0.0) >= v * per_node for k, v in self.bundle.items())]
        driver = ray.get_runtime_context().get_node_id()
        fits.sort(key=lambda n: (n["NodeID"] != driver, n["NodeManagerAddress"], n["NodeID"]))
        if len(fits) < self.nnodes:
            have = [{k: n["Resources"].get(k, 0.0) for k in self.bundle} for n in alive]
            raise RuntimeError(
                f"ResourcePool: {self.nnodes} nodes with {per_node} bundles of {self.bundle} each are needed, "
                f"but only {len(fits)} of the {len(alive)} alive nodes have room (per node: {have}). "
                "Start Ray on more machines (docs/scaling.md) or lower placement.nnodes"
            )
        chosen = [n["NodeID"] for n in fits[: self.nnodes]]
        return [chosen[i // per_node] for i in range(self.num_bundles)]

    def _reserve(self, strategy: str, timeout_s: float) -> PlacementGroup:
        if self.node_ids is None:
            pg = placement_group([self.bundle] * self.num_bundles, strategy=strategy)
        else:
            selectors = [{"ray.io/node-id": node} for node in self.node_ids]
            pg = placement_group([self.bundle] * self.num_bundles, strategy=strategy, bundle_label_selector=selectors)
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(pg)
            free = {k: ray.available_resources().get(k, 0.0) for k in self.bundle}
            raise RuntimeError(
                f"ResourcePool: could not reserve {self._asked()} within {timeout_s:g} s; free now: {free}. "
                "Other placement groups or actors hold the rest: shut them down, or ask for less"
            )
        return pg

    def actor_options(self, bundle_index: int) -> dict[str, Any]:
        """``.options(...)`` for the process of one group on one bundle."""
        share = 1.0 / self.max_colocate_count
        return {
            "num_cpus": self.num_cpus_per_bundle * share,
            "num_gpus": share if self.use_gpu else 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group,
                placement_group_bundle_index=bundle_index,
                placement_group_capture_child_tasks=True,
            ),
        }

    def claim(self, who: str) -> None:
        """Account for one more group of processes on the pool (refused past max_colocate_count)."""
        if self._groups >= self.max_colocate_count:
            raise RuntimeError(
                f"ResourcePool: {who} would be group {self._groups + 1} on a pool with max_colocate_count="
                f"{self.max_colocate_count}; put the roles in one process (WorkerGroup.colocated), or "
                "create the pool with a larger max_colocate_count"
            )
        self._groups += 1

    def release(self) -> None:
        self._groups = max(0, self._groups - 1)

    def shutdown(self) -> None:
        """Give the bundles back (the groups on the pool must be shut down first)."""
        remove_placement_group(self.placement_group)

    def __repr__(self) -> str:
        return f"ResourcePool({self._asked()}, max_colocate_count={self.max_colocate_count}, nnodes={self.nnodes})"
