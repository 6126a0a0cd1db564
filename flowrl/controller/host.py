"""The body of one worker process: a Ray actor holding one instance of each colocated role."""

from __future__ import annotations

import os
import socket
import sys
import time
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

    With ``log_path`` the process first sends its own stdout and stderr to that file
    (``redirect_output``), so what vLLM, torch and Ray print in it never reaches the
    driver's console.
    """

    def __init__(self, log_path: str | None = None) -> None:
        if log_path is not None:
            redirect_output(log_path)
        self._log_path = log_path
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
        if self._log_path is not None:  # the head of this rank's log file
            rank, threads = env.get("RANK", "?"), torch.get_num_threads()
            print(f"flowrl: rank {rank}, torch threads: {threads}", flush=True)
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


def redirect_output(path: str) -> None:
    """Append this process's stdout and stderr to ``path`` from now on.

    The redirection is of file descriptors 1 and 2 (``os.dup2``), not of ``sys.stdout``:
    vLLM, torch and gloo also write from C and C++, which Python's streams never see.
    A header line marks where each process's output starts (a resumed run appends).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"==== flowrl worker process {os.getpid()} started {started} ====", flush=True)
