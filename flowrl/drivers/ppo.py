"""PPO for language models, as in InstructGPT (Ouyang et al., 2022, arXiv:2203.02155).

The reward of a response is its score on the last token minus a per-token KL penalty
to the reference policy, r_t = score·[t = T] - beta · KL_t; a critic estimates V(s_t);
GAE (Schulman et al., 2016) turns rewards and values into advantages and returns; the
policy takes clipped surrogate steps (Schulman et al., 2017) and the critic regresses
the returns with a clipped value loss.

Deviations from the paper:
- beta is fixed or adaptive (``algorithm.kl_ctrl``; Ziegler et al., 2019), the KL
  estimator is configurable (k1 by default, as in the paper).
- No pretraining-mix term (PPO-ptx).
- Advantages are whitened over the batch's valid tokens (``advantage.whiten``).
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

    # ALGO LOGIC: KL-penalized token rewards, then GAE with the critic's values
    estimator = rt.cfg.algorithm.kl_ctrl.estimator
    batch[Keys.TOKEN_REWARDS], kl_metrics = steps.token_rewards(batch, kl_ctrl, estimator)
    batch[Keys.ADVANTAGES], batch[Keys.RETURNS] = compute_advantages(batch, rt.cfg.algorithm.advantage)

    return steps.learn(rt, timer, batch, metrics | kl_metrics)


def main(cfg: DictConfig) -> dict[str, float]:
    """Train for ``trainer.total_steps``; returns the validation metrics before and after."""
    kl_ctrl = steps.kl_controller(cfg)
    state = {"kl_ctrl": kl_ctrl} if kl_ctrl is not None else {}
    return loop.run(cfg, lambda rt: train_step(rt, kl_ctrl), state)
