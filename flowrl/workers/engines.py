"""A worker's view of the run config and its engines, built by the backends the config names.

Workers receive the run config as a plain dict (cheap to pickle). ``worker_config`` reads it
back and imports ``trainer.plugins`` (and a driver named by module path) first, so estimators, losses and engines registered by
the user's modules exist in this process before anything is built.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from flowrl.engines.base import ROLLOUT_ENGINES, TRAIN_ENGINES, RolloutEngine, TrainEngine
from flowrl.plugins import load_plugins, plugin_modules


def worker_config(cfg: DictConfig | dict[str, Any]) -> DictConfig:
    """The run config as a DictConfig, after importing the plugins it names."""
    config = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    load_plugins(plugin_modules(config.trainer))
    return config


def build_train_engine(
    cfg: DictConfig, model: DictConfig, optim: DictConfig | None, value_head: bool, head_bias: bool = True
) -> TrainEngine:
    """The ``actor.backend`` engine for the policy, the reference (``optim=None``), the critic
    or the reward model (``value_head`` without ``head_bias``)."""
    return TRAIN_ENGINES.build(cfg.actor.backend, cfg, model, optim, value_head, head_bias)


def build_rollout(cfg: DictConfig, rank: int) -> RolloutEngine:
    """The ``rollout.backend`` engine of this rank."""
    return ROLLOUT_ENGINES.build(cfg.rollout.backend, cfg, rank)
