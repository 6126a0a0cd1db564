"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al., 2024, arXiv:2402.14740).

Sample k responses per prompt; the baseline of response i is the mean reward of the
other k - 1, so the advantage of every token of y_i is

    A_i = r_i - 1/(k-1) · sum_{j != i} r_j

which is unbiased (the baseline does not depend on y_i). No critic.

Deviations from the paper:
- Updates use the clipped surrogate; with one update per rollout the first mini-batch is
  exactly the REINFORCE gradient (ratio 1).
- The sequence reward has no KL penalty unless ``algorithm.use_kl_in_reward`` is set;
  then the sequence's summed token rewards (score - beta·KL) are the reward.
"""

from __future__ import annotations

from omegaconf import DictConfig

from flowrl.algos import compute_advantages
from flowrl.algos.kl import FixedKLController
from flowrl.drivers import steps
from flowrl.drivers.registry import DriverSpec
from flowrl.keys import Keys
from flowrl.trainer import loop
from flowrl.trainer.runtime import Runtime
from flowrl.trainer.tracking import Timer

SPEC = DriverSpec(kl_in_reward=True)  # what config validation asks of this driver


def train_step(rt: Runtime, kl_ctrl: FixedKLController | None) -> dict[str, float]:
    timer = Timer()
    batch, metrics = steps.collect(rt, timer, n=rt.cfg.rollout.n)

    # ALGO LOGIC: leave-one-out baseline over the k samples of each prompt
    rewards, kl_metrics = steps.token_rewards(batch, kl_ctrl, rt.cfg.algorithm.kl_ctrl.estimator)
    batch[Keys.TOKEN_REWARDS] = rewards
    if kl_ctrl is not None:
        batch[Keys.SCORES] = rewards.sum(-1)  # [B] score - beta * sum_t KL_t
    batch[Keys.ADVANTAGES], batch[Keys.RETURNS] = compute_advantages(batch, rt.cfg.algorithm.advantage)

    return steps.learn(rt, timer, batch, metrics | kl_metrics)


def main(cfg: DictConfig) -> dict[str, float]:
    """Train for ``trainer.total_steps``; returns the validation metrics before and after."""
    kl_ctrl = steps.kl_controller(cfg)
    state = {"kl_ctrl": kl_ctrl} if kl_ctrl is not None else {}
    return loop.run(cfg, lambda rt: train_step(rt, kl_ctrl), state)
