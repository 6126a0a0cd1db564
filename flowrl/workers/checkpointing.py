"""Checkpoint methods shared by the roles: an engine's state, and the process's RNG state."""

from __future__ import annotations

from typing import Any

from flowrl.controller import Dispatch, register
from flowrl.engines.rng import load_rng, save_rng, worker_rng_path


class EngineCheckpoints:
    """``save`` / ``load`` of ``self.engine`` (model, optimizer, schedule)."""

    engine: Any

    @register(Dispatch.ONE_TO_ALL)
    def save(self, path: str) -> None:
        """A resumable checkpoint (model, optimizer, schedule) with torch.distributed.checkpoint."""
        self.engine.save(path)

    @register(Dispatch.ONE_TO_ALL)
    def load(self, path: str) -> None:
        self.engine.load(path)



class ProcessRNG:
    """This process's RNG state (shared by its colocated roles): what the loop's checkpointer
    saves through the group it names ``actor``."""

    rank: int

    @register(Dispatch.ONE_TO_ALL)
    def save_rng_state(self, checkpoint: str) -> None:
        save_rng(worker_rng_path(checkpoint, self.rank))

    @register(Dispatch.ONE_TO_ALL)
    def load_rng_state(self, checkpoint: str) -> None:
        load_rng(worker_rng_path(checkpoint, self.rank))
