"""The body of one worker process: a Ray actor holding one instance of each colocated role."""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any

import ray
import torch

from flowrl.controller.errors import WorkerError

RoleSpec = tuple[type, tuple[Any, ...], dict[str, Any]]  # (worker class, init args, init kwargs)


class WorkerHost:
    """One process of a group. Roles are instances of Worker subclasses that share it.

    Construction is two-step so that the group can ask rank 0 for an address before any
    worker is built: ``setup`` sets the rank environment, then instantiates the roles.
    """

    def __init__(self) -> None:
        self._roles: dict[str, Any] = {}

    def node(self) -> tuple[str, str]:
        """(node IP address, Ray node id) of this process."""
        return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()

    def free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def setup(self, env: dict[str, str], roles: dict[str, RoleSpec]) -> int:
        """Set RANK, WORLD_SIZE, ... then build each role; returns this process's PID."""
        os.environ.update(env)
        if "OMP_NUM_THREADS" in env:  # torch is already imported here: tell it directly
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        for role, (cls, args, kwargs) in roles.items():
            self._roles[role] = self._run(role, cls.__name__, "__init__", cls, args, kwargs)
        return os.getpid()

    def call(self, role: str, method: str, *args: Any, **kwargs: Any) -> Any:
        instance = self._roles[role]
        return self._run(role, type(instance).__name__, method, getattr(instance, method), args, kwargs)

    def _run(self, role: str, cls_name: str, method: str, fn: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any worker error is reported to the driver
            rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
            where = f"{cls_name}.{method} (role {role!r}) failed on rank {rank} of {world}"
            message = (
                f"{where}: {type(e).__name__}: {e}\n\n"
                f"Worker traceback (rank {rank}, pid {os.getpid()}, node {ray.util.get_node_ip_address()}):\n"
                f"{traceback.format_exc()}"
            )
            rank_int = int(rank) if rank.isdigit() else -1
            raise WorkerError(
                message, method=method, role=role, rank=rank_int, remote_type=type(e).__name__
            ) from None
