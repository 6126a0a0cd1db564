"""AdamW and its learning-rate schedule for the training engine."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "cosine")


@dataclass
class OptimizerConfig:
    """AdamW and its schedule (one step per mini-batch); ``total_steps=0`` lets the trainer fill it in."""

    lr: float = 1e-6  # peak learning rate
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.999  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator term
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # max global L2 norm; <= 0 turns clipping off (the norm is still reported)
    lr_schedule: str = "constant"  # constant | cosine (SCHEDULES)
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps to lr
    total_steps: int = 0  # cosine: steps from the start to the end of the decay
    min_lr_ratio: float = 0.0  # cosine: the final lr as a fraction of lr

    def __post_init__(self) -> None:
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"optim.lr_schedule={self.lr_schedule!r}: choose one of {SCHEDULES}")
        if self.lr_schedule == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"optim.total_steps={self.total_steps} must exceed optim.warmup_steps="
                f"{self.warmup_steps} for the cosine schedule"
            )


def lr_factor(step: int, config: OptimizerConfig) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps.

    Warmup: (step + 1) / warmup_steps for step < warmup_steps. Cosine then decays as
    min + (1 - min) * (1 + cos(pi * t)) / 2 with t the fraction of the decay done.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    t = min(1.0, (step - config.warmup_steps) / (config.total_steps - config.warmup_steps))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_optimizer(
    params: Iterable[torch.nn.Parameter], config: OptimizerConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    return optimizer, scheduler
