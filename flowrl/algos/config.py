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
    # distill: weight w of GRPO's task-reward advantage added to the distillation advantage
    # log pi_teacher - log pi_old of each token (0: pure distillation; > 0 needs rollout.n > 1)
    distill_reward_weight: float = 0.0


@dataclass
class PolicyLossConfig:
    """Which policy loss and its knobs (see :mod:`flowrl.algos.losses`)."""

    name: str = "ppo_clip"  # registered with @register_policy_loss: ppo_clip | pg | gspo | cispo | sapo
    clip_low: float = 0.2  # ratio lower bound is 1 - clip_low
    clip_high: float = 0.2  # ratio upper bound is 1 + clip_high (DAPO clip-higher: 0.28)
    dual_clip_c: float | None = None  # dual-clip constant c > 1 for negative advantages (e.g. 3.0)
    # gspo: the sequence ratio s_i is clipped to [1 - gspo_clip_low, 1 + gspo_clip_high]. The paper's
    # values (GSPO, Zheng et al. 2025, section 5.1): a length-normalized ratio moves far less than a token's
    gspo_clip_low: float = 3e-4
    gspo_clip_high: float = 4e-4  # gspo: upper bound of s_i is 1 + gspo_clip_high (paper: 4e-4)
    # cispo: the stop-gradient IS weight is clip(r, 1 - cispo_clip_low, 1 + cispo_clip_high); null: no
    # lower bound, as in MiniMax-M1 (2025)
    cispo_clip_low: float | None = None
    # cispo: MiniMax-M1 tunes only this bound and does not print its value; 0.28 is DAPO's upper bound
    cispo_clip_high: float = 0.28
    sapo_tau_pos: float = 1.0  # sapo: gate temperature for A > 0 (SAPO, Gao et al. 2025: 1.0)
    # sapo: gate temperature for A < 0; above tau_pos, negative-advantage tokens damp faster (paper: 1.05)
    sapo_tau_neg: float = 1.05
    # correction of the rollout-vs-trainer mismatch from the sampler's log-probs (flowrl.algos.importance):
    # none | tis (loss x min(pi_old / mu, tis_cap)) | seq_mask (drop a sequence whose geometric-mean ratio
    # leaves [mismatch_seq_low, mismatch_seq_high]) | token_mask (drop a token whose ratio leaves
    # [mismatch_token_low, mismatch_token_high])
    mismatch: str = "none"
    # truncated importance sampling cap C vs rollout log-probs (e.g. 2.0); set alone it means mismatch=tis;
    # with seq_mask / token_mask both apply
    tis_cap: float | None = None
    # seq_mask: lower end of the band of exp(mean_t(old_logp - rollout_logp)) (geometric-mean rejection,
    # verl's preset after Liu, Li et al. 2025: 0.999 and 1.001)
    mismatch_seq_low: float = 0.999
    mismatch_seq_high: float = 1.001  # seq_mask: upper end of the geometric-mean band
    mismatch_token_low: float = 0.5  # token_mask: lower end of the band of exp(old_logp - rollout_logp)
    mismatch_token_high: float = 2.0  # token_mask: upper end of the per-token band (masked IS, C = 2)
    # stop the run when the first rollout after a weight sync has mean |old_logprobs - rollout_logprobs| above
    # this (stale or corrupt rollout weights). null: 1e-2 when rollout.dtype and actor.model.dtype are both
    # float32, else 0.5, plus -log(top_p) with top_p < 1; none with top_k (importance.expected_logprob_diff)
    max_logprob_diff: float | None = None


@dataclass
class DynamicSamplingConfig:
    """DAPO's dynamic sampling: drop groups whose scores are all equal, sample more prompts."""

    # keep sampling prompts until the step holds data.train_batch_size groups whose scores are not all
    # equal (DAPO, Yu et al. 2025, arXiv:2503.14476); needs rollout.n > 1
    enable: bool = False
    # rounds of data.train_batch_size prompts per step at most, the first included; when the last round
    # leaves the step short, it trains on the informative groups it has (a warning says so)
    max_rounds: int = 4


@dataclass
class OverlongConfig:
    """DAPO's soft overlong punishment, added to each response's score (:func:`flowrl.algos.overlong_penalty`)."""

    # add -penalty_factor * (|y| - (L_max - buffer)) / buffer to the score of a response longer than
    # L_max - buffer, L_max = rollout.max_response_length (DAPO, Yu et al. 2025, eq. 13)
    enable: bool = False
    buffer: int = 16  # L_cache: the last tokens before rollout.max_response_length, where the penalty grows
    penalty_factor: float = 1.0  # the penalty at (and beyond) rollout.max_response_length


@dataclass
class KLControllerConfig:
    """KL penalty in the reward: coefficient schedule and estimator (see :mod:`flowrl.algos.kl`)."""

    kind: str = "fixed"  # "fixed" or "adaptive"
    kl_coef: float = 0.001  # the (initial) coefficient beta
    target_kl: float = 0.1  # adaptive: the KL the controller steers towards
    horizon: int = 10000  # adaptive: samples over which the error is corrected
    estimator: str = "k1"  # per-token KL estimator: k1, k2/mse, k3/low_var_kl, abs
