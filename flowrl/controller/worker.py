"""Worker: the base class of every role that runs inside a group's processes."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from flowrl.controller.dispatch import DispatchInfo


class Worker:
    """A role in a worker group. Subclasses add methods decorated with ``@register``.

    The group starts one process per rank and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` before the worker is built;
    the properties below read them (a worker built outside a group is rank 0 of 1).
    Several roles colocated in one process see the same values and the same
    ``torch.distributed`` world.
    """

    @property
    def rank(self) -> int:
        return int(os.environ.get("RANK", "0"))

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def master_addr(self) -> str:
        return os.environ.get("MASTER_ADDR", "127.0.0.1")

    @property
    def master_port(self) -> int:
        return int(os.environ.get("MASTER_PORT", "29500"))

    def dispatch_info(self) -> DispatchInfo:
        """This rank's data-parallel place. Override when ranks are tensor-parallel replicas.

        The group asks once, on the first DP_COMPUTE call, and caches the answer.
        """
        return DispatchInfo(dp_rank=self.rank, dp_size=self.world_size, is_collect=True)

    def init_distributed(self, backend: str | None = None, timeout_s: float = 1800.0) -> None:
        """Join the group's ``torch.distributed`` world (idempotent; colocated roles share it).

        ``backend`` defaults to gloo on CPU and to ``cpu:gloo,cuda:nccl`` when CUDA is
        available (NCCL for GPU tensors, gloo for the CPU ones, e.g. offloaded state).
        """
        if dist.is_initialized():
            if dist.get_rank() != self.rank or dist.get_world_size() != self.world_size:
                raise RuntimeError(
                    f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                    f"{dist.get_world_size()}, but this worker is rank {self.rank} of {self.world_size}"
                )
            return
        cuda = torch.cuda.is_available()
        if backend is None:
            backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        if cuda and "nccl" in backend:
            # Ray shows each process only its own GPU(s): the local index wraps onto them.
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{self.master_addr}:{self.master_port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
