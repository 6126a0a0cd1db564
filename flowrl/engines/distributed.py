"""The process group the engines run in.

Every engine works inside one ``torch.distributed`` world: gloo on CPU, NCCL on GPU.
A launcher (Ray workers, torchrun, ``torch.multiprocessing.spawn``) sets the usual
environment variables ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (and
``LOCAL_RANK``); a plain Python process with none of them gets a world of one.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join (or create) the default process group; a no-op when one exists.

    With no ``RANK``/``WORLD_SIZE`` in the environment this makes a world of one on a
    free local port and writes the variables back, so that later users (vLLM's
    ``external_launcher`` reads ``RANK`` and ``LOCAL_RANK``) see a consistent picture.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) if device.index is None else device.index)
    dist.init_process_group(
        backend=backend_for(device),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timedelta(seconds=timeout_s),
    )


def world() -> tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) when there is none."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()
