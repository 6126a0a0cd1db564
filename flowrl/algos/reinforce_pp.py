"""REINFORCE++ (Hu et al., 2025, arXiv:2501.03262).

Token rewards are the score on the last token minus a per-token KL penalty to the
reference; the return-to-go G_t = sum_{s>=t} gamma^(s-t) r_s is whitened over the
whole batch's valid tokens and used as the advantage. No critic, and no per-prompt
group is needed (``reinforce_pp_baseline`` subtracts the group mean first, for k > 1).

Deviations from the paper:
- The KL penalty is in the reward (``algorithm.use_kl_in_reward``, on in the recipe), with
  a fixed or adaptive coefficient; the paper uses a fixed one.
- Mini-batch and clipping settings come from ``actor`` like every other driver.
"""

from __future__ import annotations

from omegaconf import DictConfig

from flowrl import steps
from flowrl.algos import compute_advantages
from flowrl.algos.config import AdvantageConfig
from flowrl.algos.kl import FixedKLController
from flowrl.keys import Keys
from flowrl.runtime import Runtime
from flowrl.tracking import Timer


def train_step(rt: Runtime, kl_ctrl: FixedKLController | None) -> dict[str, float]:
    timer = Timer()
    batch, metrics = steps.collect(rt, timer, n=rt.cfg.rollout.n)

    # ALGO LOGIC: KL-penalized token rewards, discounted and whitened over the batch
    estimator = rt.cfg.algorithm.kl_ctrl.estimator
    batch[Keys.TOKEN_REWARDS], kl_metrics = steps.token_rewards(batch, kl_ctrl, estimator)
    adv_cfg = AdvantageConfig(**rt.cfg.algorithm.advantage)
    batch[Keys.ADVANTAGES], batch[Keys.RETURNS] = compute_advantages(batch, adv_cfg)

    return steps.learn(rt, timer, batch, metrics | kl_metrics)


def main(cfg: DictConfig) -> dict[str, float]:
    """Train for ``trainer.total_steps``; returns the validation metrics before and after."""
    kl_ctrl = steps.kl_controller(cfg)
    state = {"kl_ctrl": kl_ctrl} if kl_ctrl is not None else {}
    return steps.run(cfg, lambda rt: train_step(rt, kl_ctrl), state)
