"""Config dataclasses of the pure algorithm functions.

These hold the defaults of everything in :mod:`flowrl.algos`; the project config
nests them (``algorithm.advantage``, ``actor.policy_loss``, ``algorithm.kl_ctrl``)
and recipes only override fields. Functions take the values, never read globals.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdvantageConfig:
    """How advantages and returns are computed (see :mod:`flowrl.algos.advantages`)."""

    estimator: str = "grpo"  # a name registered with @register_estimator
    gamma: float = 1.0  # discount (gae, reinforce_pp)
    lam: float = 1.0  # GAE lambda
    whiten: bool = True  # gae: whiten advantages over the batch's valid tokens
    norm_by_std: bool = True  # grpo: divide by the group std (False = Dr. GRPO)
    eps: float = 1e-6  # added to the std before dividing (grpo)


@dataclass
class PolicyLossConfig:
    """Which policy loss and its knobs (see :mod:`flowrl.algos.losses`)."""

    name: str = "ppo_clip"  # a name registered with @register_policy_loss
    clip_low: float = 0.2  # ratio lower bound is 1 - clip_low
    clip_high: float = 0.2  # ratio upper bound is 1 + clip_high (DAPO clip-higher: 0.28)
    dual_clip_c: float | None = None  # dual-clip constant c > 1 for negative advantages (e.g. 3.0)
    tis_cap: float | None = None  # truncated importance sampling vs rollout log-probs (e.g. 2.0)


@dataclass
class KLControllerConfig:
    """KL penalty in the reward: coefficient schedule and estimator (see :mod:`flowrl.algos.kl`)."""

    kind: str = "fixed"  # "fixed" or "adaptive"
    kl_coef: float = 0.001  # the (initial) coefficient beta
    target_kl: float = 0.1  # adaptive: the KL the controller steers towards
    horizon: int = 10000  # adaptive: samples over which the error is corrected
    estimator: str = "k1"  # per-token KL estimator: k1, k2/mse, k3/low_var_kl, abs
