"""The reference policy: forward-only log-probs of the initial (or a given) model.

With LoRA on the actor and no ``reference.path`` this role is not built: the actor group
computes the reference log-probs with its adapters disabled (``ActorRollout.compute_ref_logprobs``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from flowrl.batch import Batch
from flowrl.controller import Dispatch, Worker, register
from flowrl.engines.memory import STAGE_PEAKS
from flowrl.keys import Keys
from flowrl.workers.engines import build_train_engine, worker_config


class Reference(Worker):
    """Frozen policy for the KL terms; usually colocated with ``ActorRollout``."""

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self, config: DictConfig | dict[str, Any]) -> None:
        self.cfg = worker_config(config)
        self.init_distributed()
        ref = self.cfg.reference
        model = ref if ref is not None and ref.path else self.cfg.actor.model  # no path: the initial policy
        self.micro_batch_size = (ref.micro_batch_size if ref is not None else 0) or self.cfg.actor.micro_batch_size
        self.engine = build_train_engine(self.cfg, model, optim=None, value_head=False)

    @register(Dispatch.DP_COMPUTE)
    def compute_ref_logprobs(self, batch: Batch) -> Batch:
        with STAGE_PEAKS("ref"):
            logprobs, _ = self.engine.compute_logprobs(
                batch, self.cfg.rollout.temperature, self.micro_batch_size
            )
        return Batch({Keys.REF_LOGPROBS: logprobs})
