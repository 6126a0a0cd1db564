"""Learned reward models: scoring rollouts during RL, and training on preference pairs.

A reward-model folder is a Hugging Face ``*ForSequenceClassification`` with one label
(the format ``train_reward_model`` writes, and that of most published reward models).
The FSDP2 engine loads it as a backbone with a bias-free scalar head and reads the head
at the last real token of prompt + response: the response's EOS when it has one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from omegaconf import DictConfig

from flowrl.algos import bradley_terry_loss
from flowrl.batch import Batch
from flowrl.controller import Dispatch, Worker, register
from flowrl.engines.base import Normalizer
from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig
from flowrl.keys import Keys
from flowrl.workers.checkpointing import EngineCheckpoints, ProcessRNG
from flowrl.workers.engines import build_train_engine, worker_config

Metrics = dict[str, float]


def check_reward_model_folder(path: str, policy_path: str | None = None) -> None:
    """Refuse folders that are not one-label sequence classifiers, or whose vocabulary differs
    from the policy's (rollout token ids are scored as they are, never re-tokenized)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"reward_model.path={path}: no config.json there; name a Hugging Face model folder")
    with open(config_file) as f:
        hf_config = json.load(f)
    archs = hf_config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(
            f"reward_model.path={path} holds {archs or 'no architecture'}, not a *ForSequenceClassification: "
            "its score head would be random. Train one with flowrl.drivers.reward_model.train_reward_model"
        )
    labels = len(hf_config.get("id2label") or {}) or int(hf_config.get("num_labels", 1))
    if labels != 1:
        raise ValueError(f"reward_model.path={path}: the classifier has {labels} labels; a reward model has 1")
    if policy_path is not None:
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(path).get_vocab() != AutoTokenizer.from_pretrained(policy_path).get_vocab():
            raise ValueError(
                f"reward_model.path={path}: its tokenizer's vocabulary differs from the policy's "
                f"({policy_path}); the reward model scores the policy's token ids, so both must share one"
            )


class RewardModel(Worker):
    """Scores rollouts with a learned reward model; usually colocated with ``ActorRollout``."""

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self, config: DictConfig | dict[str, Any]) -> None:
        self.cfg = worker_config(config)
        if self.cfg.reward_model is None:
            raise ValueError("RewardModel.init_model: the run config has no reward_model section")
        check_reward_model_folder(self.cfg.reward_model.path, self.cfg.actor.model.path)
        self.init_distributed()
        self.engine = build_train_engine(self.cfg, self.cfg.reward_model, optim=None, value_head=True, head_bias=False)

    @register(Dispatch.DP_COMPUTE)
    def compute_scores(self, batch: Batch) -> Batch:
        """The reward model's score of prompt + response at the last response token.  -> SCORES [B]"""
        micro = self.cfg.reward_model.micro_batch_size or self.cfg.actor.micro_batch_size
        scores = self.engine.compute_sequence_scores(batch, micro)  # [B]
        return Batch({Keys.SCORES: scores})


def pair_loss(micro: Batch, out: dict[str, torch.Tensor], norm: Normalizer) -> tuple[torch.Tensor, Metrics]:
    """Bradley–Terry loss of a micro-batch of pairs, divided by the number of pairs in the step."""
    loss, metrics = bradley_terry_loss(out[Keys.CHOSEN_SCORES], out[Keys.REJECTED_SCORES])  # [b]
    return loss.sum() / norm.global_seqs, {k: float(v) for k, v in metrics.items()}


class RewardModelTrainer(EngineCheckpoints, ProcessRNG, Worker):
    """Trains a reward model on preference pairs (``flowrl.drivers.reward_model`` drives it)."""

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self, engine_config: FSDPEngineConfig, micro_batch_size: int) -> None:
        if not engine_config.value_head or engine_config.head_bias:
            raise ValueError("RewardModelTrainer: the engine needs value_head=True and head_bias=False")
        self.init_distributed()
        self.engine = FSDPEngine(engine_config)
        self.micro_batch_size = micro_batch_size

    @register(Dispatch.DP_COMPUTE)
    def update(self, pairs: Batch) -> Metrics:
        """One optimizer step on this rank's share of the pairs; loss, accuracy, margin, grad norm, lr."""
        metrics = self.engine.train_step(pairs, pair_loss, self.micro_batch_size)
        return {f"train/{k}": v for k, v in metrics.items()}

    @register(Dispatch.DP_COMPUTE)
    def compute_pair_scores(self, pairs: Batch) -> Batch:
        chosen, rejected = self.engine.compute_pair_scores(pairs, self.micro_batch_size)  # [B], [B]
        return Batch({Keys.CHOSEN_SCORES: chosen, Keys.REJECTED_SCORES: rejected})

    @register(Dispatch.ONE_TO_ALL)
    def save_hf(self, path: str) -> None:
        """A ``*ForSequenceClassification`` folder that ``RewardModel`` (and transformers) load."""
        self.engine.save_hf(path)
