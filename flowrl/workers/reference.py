"""The reference policy: forward-only log-probs of the initial (or a given) model."""

from __future__ import annotations

from typing import Any

from flowrl.batch import Batch
from flowrl.controller import Dispatch, Worker, register
from flowrl.engines.memory import STAGE_PEAKS
from flowrl.keys import Keys
from flowrl.workers.engines import build_train_engine, worker_config


class Reference(Worker):
    """Frozen policy for the KL terms; usually colocated with ``ActorRollout``."""

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self, config: dict[str, Any]) -> None:
        self.cfg = worker_config(config)
        self.init_distributed()
        model = self.cfg.reference if self.cfg.reference is not None else self.cfg.actor.model
        self.engine = build_train_engine(self.cfg, model, optim=None, value_head=False)

    @register(Dispatch.DP_COMPUTE)
    def compute_ref_logprobs(self, batch: Batch) -> Batch:
        with STAGE_PEAKS("ref"):
            logprobs, _ = self.engine.compute_logprobs(
                batch, self.cfg.rollout.temperature, self.cfg.actor.micro_batch_size
            )
        return Batch({Keys.REF_LOGPROBS: logprobs})
