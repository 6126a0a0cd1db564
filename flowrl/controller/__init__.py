"""The single controller: call a group of Ray workers like a function.

    class Doubler(Worker):
        @register(Dispatch.DP_COMPUTE)
        def double(self, batch: Batch) -> Batch: ...

    init_ray(num_cpus=4)
    group = WorkerGroup(ResourcePool(2, num_cpus_per_bundle=0.5), Doubler)
    out = group.double(batch)  # split over 2 ranks, run, concatenated back

See docs/architecture.md for the flow, the dispatch modes, colocation, futures and errors.
"""

from flowrl.controller.dispatch import (
    Dispatch,
    DispatchInfo,
    DPContext,
    DPLayout,
    Execute,
    Layout,
    Plan,
    get_dispatch_mode,
    register,
    register_dispatch_mode,
)
from flowrl.controller.errors import WorkerError
from flowrl.controller.future import DataFuture
from flowrl.controller.ray_init import init_ray
from flowrl.controller.resource_pool import ResourcePool
from flowrl.controller.worker import Worker
from flowrl.controller.worker_group import GroupMethod, WorkerGroup

__all__ = [
    "DPContext",
    "DPLayout",
    "DataFuture",
    "Dispatch",
    "DispatchInfo",
    "Execute",
    "GroupMethod",
    "Layout",
    "Plan",
    "ResourcePool",
    "Worker",
    "WorkerError",
    "WorkerGroup",
    "get_dispatch_mode",
    "init_ray",
    "register",
    "register_dispatch_mode",
]
