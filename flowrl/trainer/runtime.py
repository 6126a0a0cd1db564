"""Everything a driver needs, built from the run config: worker groups, data, rewards, metrics.

A driver calls ``build_runtime(cfg)`` once and then only uses what it returns; it never
touches Ray, weights or devices itself.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from flowrl.algos import get_estimator
from flowrl.batch import Batch
from flowrl.controller import WorkerGroup
from flowrl.data import DataLoader, PromptDataset
from flowrl.keys import Keys
from flowrl.rewards import RewardRunner
from flowrl.trainer.placement import announce, connect_ray, hang_timeout_for, place_workers, shutdown_groups
from flowrl.trainer.preflight import check_run_inputs, load_inputs
from flowrl.trainer.split_rollout import AheadLoader, SplitRollout, step_seeds
from flowrl.trainer.tracking import Tracker
from flowrl.workers.actor_rollout import ActorRollout
from flowrl.workers.critic import Critic
from flowrl.workers.reference import Reference
from flowrl.workers.reward_model import RewardModel
from flowrl.workers.rollout import RolloutWorker
from flowrl.workers.teacher import Teacher


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
    teacher: WorkerGroup | None = None  # the distillation teacher (teacher.path); None: no teacher
    split: SplitRollout | None = None  # placement.rollout_workers > 0: rollout on workers of its own
    groups: dict[str, WorkerGroup] = field(default_factory=dict)
    step: int = 0  # the training step under way (set by the loop); seeds its rollouts
    short_steps: int = 0  # steps that dynamic sampling left short of informative groups (this process)
    _rollouts_in_step: int = 0
    _slowest_step_s: float = 0.0

    def begin_step(self, step: int) -> None:
        self.step, self._rollouts_in_step = step, 0
        if self.split is not None:
            self.split.begin(step)

    def rollout_seeds(self, n_prompts: int) -> torch.Tensor:
        """One sampling seed per prompt, a function of (trainer.seed, step, rollout call in the
        step, prompt index) only, so a resumed run samples what an uninterrupted one did.  -> [B]"""
        seeds = step_seeds(int(self.cfg.trainer.seed), self.step, self._rollouts_in_step, n_prompts)  # [B]
        self._rollouts_in_step += 1
        return seeds

    def generate(self, prompts: Batch, n: int, temperature: float | None = None) -> Batch:
        """``n`` responses per prompt from the current policy: the actor's engines, or the rollout workers."""
        if self.split is not None:
            return self.split.generate(prompts, n=n, temperature=temperature)
        return self.actor.generate(prompts, n=n, temperature=temperature)

    def next_prompts(self) -> Batch:
        """The next training prompts; a new epoch starts when one ends."""
        batch = self.train_data.next_batch()
        if batch is None:
            raise RuntimeError("the training data is exhausted; raise the sampler's num_epochs")
        return batch

    def step_timed(self, seconds: float) -> None:
        """With ``trainer.hang_timeout_s: null``, the groups' hang timeout follows the slowest step."""
        self._slowest_step_s = max(self._slowest_step_s, seconds)
        if self.cfg.trainer.hang_timeout_s is None:
            for group in self.groups.values():
                group.hang_timeout_s = hang_timeout_for(self._slowest_step_s)

    def record_run(self) -> None:
        """Write ``config.yaml`` and ``processes.json`` (for operators and fault tests) into the run
        directory: called once a resume has been validated, so a failed attempt overwrites nothing."""
        run_dir = self.cfg.trainer.run_dir
        OmegaConf.save(self.cfg, os.path.join(run_dir, "config.yaml"))
        with open(os.path.join(run_dir, "processes.json"), "w") as f:
            rollout = {} if self.split is None else {"rollout": self.split.rollout.pids}
            json.dump({"driver": os.getpid(), "workers": self.actor.pids, "logs": self.actor.log_paths} | rollout, f)

    def shutdown(self) -> None:
        self.rewards.close()
        self.tracker.close()
        shutdown_groups(self.groups)  # the actor's processes (and every colocated role), separate roles'


def needs_reference(cfg: DictConfig) -> bool:
    """A KL term, or an estimator that reads the reference's log-probs, needs the reference policy."""
    estimator_reads = Keys.REF_LOGPROBS in get_estimator(cfg.algorithm.advantage.estimator).needs
    return bool(cfg.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward or estimator_reads)


def reference_is_actor_base(cfg: DictConfig) -> bool:
    """With LoRA and no ``reference.path`` the reference policy is the actor's base model: the
    actor group computes its log-probs with the adapters disabled, and no ``Reference`` role
    (a second copy of the weights) is built."""
    return cfg.actor.lora.rank > 0 and (cfg.reference is None or not cfg.reference.path)


def build_runtime(cfg: DictConfig) -> Runtime:
    """Start Ray and the colocated workers, load the data, open the reward runner and the tracker.

    The rule-reward runner is opened even with a reward model: validation accuracy is
    always measured by the rules (the ground truth), training rewards by the model."""
    t = cfg.trainer
    tokenizer = check_run_inputs(cfg)  # model folders, tokenizer, devices, resume target, data:
    tokenizer, loader, val = load_inputs(cfg, tokenizer)  # all before any worker starts
    ray_started = time.monotonic()
    connect_ray(cfg)  # a local cluster, or the one placement.ray_address names
    started = time.monotonic()
    roles: dict[str, Any] = {"actor": ActorRollout}
    ref_in_actor = needs_reference(cfg) and reference_is_actor_base(cfg)
    if needs_reference(cfg) and not ref_in_actor:
        roles["ref"] = Reference
    if cfg.critic.enable:
        roles["critic"] = Critic
    if cfg.reward_model is not None:
        roles["rm"] = RewardModel
    if cfg.teacher is not None:
        roles["teacher"] = Teacher
    if cfg.placement.rollout_workers > 0:
        roles["rollout"] = RolloutWorker
    groups = place_workers(cfg, roles)  # colocated with the actor unless placement.separate says not
    for group in groups.values():
        group.init_model(cfg)  # the typed, read-only config as loaded
    announce(cfg, f"workers ready in {time.monotonic() - started:.1f} s (Ray: {started - ray_started:.1f} s)")

    split = None
    if "rollout" in groups:
        loader = AheadLoader(loader)
        split = SplitRollout(cfg, groups["actor"], groups["rollout"], loader)
    rewards = RewardRunner.from_config(OmegaConf.to_object(cfg.reward))
    os.makedirs(t.run_dir, exist_ok=True)
    tracker = Tracker(t.run_dir, list(t.loggers), OmegaConf.to_container(cfg, resolve=True), total_steps=t.total_steps, quiet=t.quiet)
    return Runtime(
        cfg=cfg,
        actor=groups["actor"],
        ref=groups["actor"] if ref_in_actor else groups.get("ref"),
        critic=groups.get("critic"),
        train_data=loader,
        val_data=val,
        rewards=rewards,
        tracker=tracker,
        tokenizer=tokenizer,
        rm=groups.get("rm"),
        teacher=groups.get("teacher"),
        groups=groups,
        split=split,
    )
