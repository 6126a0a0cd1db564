"""The checkpoint methods of a role that trains one engine (SFT, reward-model training)."""

from __future__ import annotations

from typing import Any

from flowrl.controller import Dispatch, register
from flowrl.engines.rng import load_rng, save_rng, worker_rng_path


class EngineCheckpoints:
    """``save`` / ``load`` of ``self.engine`` (model, optimizer, schedule) and this process's RNG
    state: what the loop's checkpointer calls on the group it names ``actor``."""

    engine: Any
    rank: int

    @register(Dispatch.ONE_TO_ALL)
    def save(self, path: str) -> None:
        """A resumable checkpoint (model, optimizer, schedule) with torch.distributed.checkpoint."""
        self.engine.save(path)

    @register(Dispatch.ONE_TO_ALL)
    def load(self, path: str) -> None:
        self.engine.load(path)

    @register(Dispatch.ONE_TO_ALL)
    def save_rng_state(self, checkpoint: str) -> None:
        save_rng(worker_rng_path(checkpoint, self.rank))

    @register(Dispatch.ONE_TO_ALL)
    def load_rng_state(self, checkpoint: str) -> None:
        load_rng(worker_rng_path(checkpoint, self.rank))
