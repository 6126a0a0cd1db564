"""Run one function on several local ranks (torch.multiprocessing spawn, gloo on 127.0.0.1).

Each rank gets the usual launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and one CPU thread; the engines join the world from them. The function's
return value (anything picklable) comes back as one list entry per rank.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowrl.engines.distributed import free_port


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """``fn(rank, *args)`` on ``world_size`` spawned processes; their results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size, join=True)
        return [pickle.loads(Path(out_dir, f"rank{r}.pkl").read_bytes()) for r in range(world_size)]


def run_plain(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in one fresh process with no launcher variables and no process group."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        proc = ctx.Process(target=_plain_entry, args=(fn, out_dir, args))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"run_plain: {getattr(fn, '__name__', fn)} exited with code {proc.exitcode}")
        return pickle.loads(Path(out_dir, "result.pkl").read_bytes())


def _plain_entry(fn: Callable[..., Any], out_dir: str, args: tuple) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    torch.set_num_threads(1)
    Path(out_dir, "result.pkl").write_bytes(pickle.dumps(fn(*args)))


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    result = fn(rank, *args)
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    if dist.is_initialized():
        dist.barrier()  # vLLM's exit hook tears the groups down; destroying them here first makes it fail
