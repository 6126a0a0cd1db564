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

from flowrl.drivers.ppo import main, train_step
from flowrl.drivers.registry import DriverSpec

# The step is PPO's (KL-penalized token rewards, then the configured estimator: here
# reinforce_pp's whitened returns-to-go); what differs is the recipe, not the program.
SPEC = DriverSpec(kl_in_reward=True)

__all__ = ["SPEC", "main", "train_step"]
