"""GRPO: group-relative policy optimization (Shao et al., 2024, arXiv:2402.03300).

For each prompt, sample a group of G responses, score them, and use each response's
score relative to its group as the advantage of all of its tokens:

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

then take clipped policy-gradient steps on those advantages. No critic.

Deviations from the paper:
- The KL to the reference is optional (``actor.use_kl_loss``, k3 estimator as in the
  paper); off by default, as in DAPO and Dr. GRPO, and then no reference model is loaded.
- ``algorithm.advantage.norm_by_std=false`` drops the std division (Dr. GRPO).
- Loss aggregation is configurable (``actor.loss_agg_mode``); the paper averages tokens
  per sequence, then sequences (``seq-mean-token-mean``); the default here is
  ``token-mean`` over the whole mini-batch (DAPO), which does not favour short answers.
- One rollout batch may be split into several mini-batch updates (``actor.mini_batch_size``).
"""

from __future__ import annotations

from omegaconf import DictConfig

from flowrl.algos import compute_advantages
from flowrl.drivers import steps
from flowrl.drivers.registry import DriverSpec
from flowrl.keys import Keys
from flowrl.trainer import loop
from flowrl.trainer.runtime import Runtime
from flowrl.trainer.tracking import Timer

SPEC = DriverSpec()  # what config validation asks of this driver


def train_step(rt: Runtime) -> dict[str, float]:
    timer = Timer()
    batch, metrics = steps.collect(rt, timer, n=rt.cfg.rollout.n)

    # ALGO LOGIC: the sequence score relative to its group is every token's advantage
    batch[Keys.TOKEN_REWARDS], _ = steps.token_rewards(batch, None, "k1")
    batch[Keys.ADVANTAGES], batch[Keys.RETURNS] = compute_advantages(batch, rt.cfg.algorithm.advantage)

    return steps.learn(rt, timer, batch, metrics)


def main(cfg: DictConfig) -> dict[str, float]:
    """Train for ``trainer.total_steps``; returns the validation metrics before and after."""
    return loop.run(cfg, train_step)
