"""The critic: a causal LM backbone with a scalar value head, trained on the returns."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from flowrl.algos import aggregate, value_loss
from flowrl.batch import Batch
from flowrl.controller import Dispatch, Worker, register
from flowrl.engines.base import Normalizer
from flowrl.keys import Keys
from flowrl.workers.checkpointing import EngineCheckpoints
from flowrl.workers.engines import build_train_engine, worker_config

Metrics = dict[str, float]


class Critic(EngineCheckpoints, Worker):
    """V(s_t) for every response token (PPO with GAE)."""

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self, config: DictConfig | dict[str, Any]) -> None:
        self.cfg = worker_config(config)
        self.init_distributed()
        c = self.cfg.critic
        self.engine = build_train_engine(self.cfg, c.model, c.optim, value_head=True)

    @register(Dispatch.DP_COMPUTE)
    def compute_values(self, batch: Batch) -> Batch:
        values = self.engine.compute_values(batch, self.cfg.critic.micro_batch_size)  # [B, R]
        return Batch({Keys.VALUES: values})

    @register(Dispatch.DP_COMPUTE)
    def update(self, batch: Batch) -> list[Metrics]:
        """``critic.epochs`` passes of mini-batch steps (the actor's mini-batch size) on the returns."""
        per_rank = self.cfg.actor.mini_batch_size // self.world_size
        history = []
        for _ in range(self.cfg.critic.epochs):
            for mini in batch.split(per_rank):
                metrics = self.engine.train_step(mini, self._loss, self.cfg.critic.micro_batch_size)
                history.append({f"critic/{k}": v for k, v in metrics.items()})
        return history

    def _loss(self, micro: Batch, out: dict[str, torch.Tensor], norm: Normalizer) -> tuple[torch.Tensor, Metrics]:
        c = self.cfg.critic
        mask = micro[Keys.RESPONSE_MASK]  # [b, R]
        loss, metrics = value_loss(out[Keys.VALUES], micro[Keys.VALUES], micro[Keys.RETURNS], mask, c.cliprange_value)
        total = aggregate(loss, mask, c.loss_agg_mode, norm.global_tokens, norm.global_seqs)
        return total, {k: float(v) for k, v in metrics.items()}
