"""Everything a driver needs, built from the run config: worker groups, data, rewards, metrics.

A driver calls ``build_runtime(cfg)`` once and then only uses what it returns; it never
touches Ray, weights or devices itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from flowrl.batch import Batch
from flowrl.controller import WorkerGroup
from flowrl.data import DataLoader, PromptDataset
from flowrl.placement import connect_ray, place_workers, shutdown_groups
from flowrl.rewards import RewardRunner
from flowrl.tracking import Tracker
from flowrl.workers.actor_rollout import ActorRollout
from flowrl.workers.critic import Critic
from flowrl.workers.reference import Reference
from flowrl.workers.reward_model import RewardModel


@dataclass
class Runtime:
    cfg: DictConfig
    actor: WorkerGroup
    ref: WorkerGroup | None
    critic: WorkerGroup | None
    train_data: DataLoader
    val_data: PromptDataset | None
    rewards: RewardRunner
    tracker: Tracker
    tokenizer: Any
    rm: WorkerGroup | None = None  # a learned reward model; None: the rule rewards score
    groups: dict[str, WorkerGroup] = field(default_factory=dict)

    def next_prompts(self) -> Batch:
        """The next training prompts; a new epoch starts when one ends."""
        batch = self.train_data.next_batch()
        if batch is None:
            raise RuntimeError("the training data is exhausted; raise the sampler's num_epochs")
        return batch

    def shutdown(self) -> None:
        self.rewards.close()
        self.tracker.close()
        shutdown_groups(self.groups)  # the actor's processes (and every colocated role), separate roles'


def needs_reference(cfg: DictConfig) -> bool:
    return bool(cfg.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward)


def build_runtime(cfg: DictConfig) -> Runtime:
    """Start Ray and the colocated workers, load the data, open the reward runner and the tracker.

    The rule-reward runner is opened even with a reward model: validation accuracy is
    always measured by the rules (the ground truth), training rewards by the model."""
    t = cfg.trainer
    connect_ray(cfg)  # a local cluster, or the one placement.ray_address names
    roles: dict[str, Any] = {"actor": ActorRollout}
    if needs_reference(cfg):
        roles["ref"] = Reference
    if cfg.critic.enable:
        roles["critic"] = Critic
    if cfg.reward_model is not None:
        roles["rm"] = RewardModel
    groups = place_workers(cfg, roles)  # colocated with the actor unless placement.separate says not
    config = OmegaConf.to_container(cfg, resolve=True)
    for group in groups.values():
        group.init_model(config)

    tokenizer = AutoTokenizer.from_pretrained(cfg.actor.model.path)
    prompts_cfg = OmegaConf.to_object(cfg.data.prompts)
    train = PromptDataset(list(cfg.data.train_files), tokenizer, prompts_cfg)
    val = PromptDataset(list(cfg.data.val_files), tokenizer, prompts_cfg) if cfg.data.val_files else None
    loader = DataLoader(train, cfg.data.train_batch_size, seed=t.seed, shuffle=cfg.data.shuffle)
    rewards = RewardRunner.from_config(OmegaConf.to_object(cfg.reward))
    os.makedirs(t.run_dir, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(t.run_dir, "config.yaml"))
    tracker = Tracker(t.run_dir, list(t.loggers), config, total_steps=t.total_steps, quiet=t.quiet)
    return Runtime(
        cfg=cfg,
        actor=groups["actor"],
        ref=groups.get("ref"),
        critic=groups.get("critic"),
        train_data=loader,
        val_data=val,
        rewards=rewards,
        tracker=tracker,
        tokenizer=tokenizer,
        rm=groups.get("rm"),
        groups=groups,
    )
