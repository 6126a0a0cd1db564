"""Advantage estimators: ``fn(batch, cfg) -> (advantages [B, R], returns [B, R])``.

Each estimator is registered by name with the batch keys it reads; the tensor math lives
in a pure function of tensors next to it (``gae_advantages``, ``group_baseline`` ...).
Outputs are zero wherever the response mask is 0. Sequence-level estimators return
the advantages as returns too (no critic is trained on them).
"""

from __future__ import annotations

import torch

from flowrl.batch import Batch
from flowrl.keys import Keys

from .config import AdvantageConfig
from .masked import float_dtype, masked_whiten, zero_invalid
from .registry import check_estimator_inputs, get_estimator, register_estimator

Pair = tuple[torch.Tensor, torch.Tensor]


# ---- pure tensor functions ------------------------------------------------------
def gae_advantages(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> Pair:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438).

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1},     returns_t = A_t + V_t

    t and t+1 run over valid tokens only: masked positions are skipped (a masked
    position carries the next valid token's V and A through), and after the last
    valid token V = A = 0 (no bootstrap). Inputs [B, R]; outputs [B, R], 0 where masked.
    What rewards and values hold at masked positions (NaN, inf) never reaches a valid one.
    """
    valid = mask > 0  # [B, R]
    rewards, values = zero_invalid(token_rewards, mask), zero_invalid(values, mask)  # [B, R]
    next_value = torch.zeros_like(values[:, 0])  # [B]
    next_adv = torch.zeros_like(values[:, 0])  # [B]
    advantages = torch.zeros_like(values)  # [B, R]
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [B]
        adv = delta + gamma * lam * next_adv  # [B]
        advantages[:, t] = torch.where(valid[:, t], adv, 0.0)
        next_adv = torch.where(valid[:, t], adv, next_adv)  # [B]
        next_value = torch.where(valid[:, t], values[:, t], next_value)  # [B]
    returns = zero_invalid(advantages + values, mask)  # [B, R]
    return advantages, returns


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Return-to-go G_t = r_t + gamma * G_{t+1} over valid tokens (masked ones skipped) [B, R]."""
    valid = mask > 0  # [B, R]
    rewards = zero_invalid(token_rewards, mask)  # [B, R]
    next_ret = torch.zeros_like(rewards[:, 0])  # [B]
    returns = torch.zeros_like(rewards)  # [B, R]
    for t in reversed(range(rewards.shape[1])):
        ret = rewards[:, t] + gamma * next_ret  # [B]
        returns[:, t] = torch.where(valid[:, t], ret, 0.0)
        next_ret = torch.where(valid[:, t], ret, next_ret)  # [B]
    return returns


def informative_groups(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per sample: does its group's score vary?  [B], [B] -> [B] bool.

    A group whose scores are all equal has advantage exactly 0 under every group baseline
    (grpo, rloo): it carries no signal (DAPO's dynamic sampling drops it). The test is exact:
    max == min over the group, no tolerance. A NaN score makes its group informative.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)  # [B] in 0..G-1
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    x = scores.double()  # [B]
    start = torch.full((n_groups,), torch.inf, dtype=x.dtype)  # [G]
    high = (-start).scatter_reduce(0, inverse, x, reduce="amax")  # [G]
    low = start.scatter_reduce(0, inverse, x, reduce="amin")  # [G]
    return ~(high == low)[inverse]  # [B]


def _group_moments(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sample float64 (group mean, r_i - mean_g, unbiased group variance, group size) -> 4 x [B].

        d_i = r_i - r_first(g)        (r_first: the group's first element; 0 for every tie)
        mean_g = r_first + sum_g d / n_g,     r_i - mean_g = d_i - sum_g d / n_g

    Summing deviations from a member of the group, not raw scores, makes a tied group's
    centered values exactly 0 (and its mean exactly the tied value) in every dtype.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)  # [B] in 0..G-1
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    x = scores.double()  # [B]
    positions = torch.arange(x.numel(), device=x.device)  # [B]
    first = torch.full((n_groups,), x.numel(), dtype=positions.dtype, device=x.device)  # [G]
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")  # [G] first member
    ref = x[first].detach()[inverse]  # [B]
    dev = x - ref  # [B]
    zeros = x.new_zeros(n_groups)  # [G]
    size = zeros.index_add(0, inverse, torch.ones_like(x))  # [G]
    shift = (zeros.index_add(0, inverse, dev) / size)[inverse]  # [B] mean_g - r_first
    centered = dev - shift  # [B]
    var = zeros.index_add(0, inverse, centered**2) / (size - 1).clamp(min=1)  # [G]
    var = var[inverse]  # [B]
    centered = torch.where(var > 0, centered, 0.0)  # a zero-variance group is exactly 0
    return ref + shift, centered, var, size[inverse]


def group_stats(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-sample (group mean, group unbiased std, group size) of ``scores`` [B] -> 3 x [B].

    Group ids are any integers; samples sharing an id form a group of any size.
    The std of a group of one is 0. Computed in float64 around a member of each group
    (``_group_moments``), so a tied group has exactly its value as mean and std 0.
    """
    mean, _, var, size = _group_moments(scores, group_ids)  # [B] each
    dtype = float_dtype(scores)
    return mean.to(dtype), var.sqrt().to(dtype), size.to(dtype)


def grpo_scores(scores: torch.Tensor, group_ids: torch.Tensor, norm_by_std: bool, eps: float) -> torch.Tensor:
    """GRPO outcome advantage per sequence [B] (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300).

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)     (norm_by_std=True)
        A_i =  r_i - mean_g(r)                          (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783)

    std is the unbiased group std; a group of one, or of equal scores, gets A = 0 exactly.
    """
    _, centered, var, _ = _group_moments(scores, group_ids)  # [B] each, float64
    adv = centered / (var.sqrt() + eps) if norm_by_std else centered  # [B]
    return adv.to(float_dtype(scores))


def rloo_scores(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO advantage per sequence [B] (Ahmadian et al. 2024, arXiv:2402.14740).

        A_i = r_i - 1/(n-1) * sum_{j != i} r_j  =  n/(n-1) * (r_i - mean_g(r))

    A group of one, or of equal scores, gets A = 0 exactly.
    """
    _, centered, _, size = _group_moments(scores, group_ids)  # [B] each, float64
    return (centered * size / (size - 1).clamp(min=1)).to(float_dtype(scores))


def broadcast_to_tokens(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-sequence value [B] repeated over the valid tokens of its response -> [B, R]."""
    return zero_invalid(seq_adv[:, None].expand(mask.shape), mask)


# ---- registered estimators over a Batch -------------------------------------------
def _scores(batch: Batch, key: str = Keys.SCORES) -> torch.Tensor:
    scores: torch.Tensor = batch[key]
    if scores.dim() != 1:
        raise ValueError(f"batch[{key!r}] must be [B] (one score per sequence), got {tuple(scores.shape)}")
    return scores.float()


@register_estimator("gae", needs=(Keys.TOKEN_REWARDS, Keys.VALUES, Keys.RESPONSE_MASK))
def gae(batch: Batch, cfg: AdvantageConfig) -> Pair:
    """GAE(gamma, lam) with a critic; advantages whitened over valid tokens if ``cfg.whiten``."""
    mask = batch[Keys.RESPONSE_MASK]
    adv, ret = gae_advantages(batch[Keys.TOKEN_REWARDS], batch[Keys.VALUES], mask, cfg.gamma, cfg.lam)
    if cfg.whiten:
        adv = zero_invalid(masked_whiten(adv, mask), mask)
    return adv, ret


@register_estimator("grpo", needs=(Keys.SCORES, Keys.GROUP_IDS, Keys.RESPONSE_MASK))
def grpo(batch: Batch, cfg: AdvantageConfig) -> Pair:
    """GRPO / Dr. GRPO group-normalized outcome advantage on every valid token."""
    seq_adv = grpo_scores(_scores(batch), batch[Keys.GROUP_IDS], cfg.norm_by_std, cfg.eps)  # [B]
    adv = broadcast_to_tokens(seq_adv, batch[Keys.RESPONSE_MASK])
    return adv, adv


@register_estimator("rloo", needs=(Keys.SCORES, Keys.GROUP_IDS, Keys.RESPONSE_MASK))
def rloo(batch: Batch, cfg: AdvantageConfig) -> Pair:
    """RLOO leave-one-out baseline on every valid token."""
    adv = broadcast_to_tokens(rloo_scores(_scores(batch), batch[Keys.GROUP_IDS]), batch[Keys.RESPONSE_MASK])
    return adv, adv


@register_estimator("remax", needs=(Keys.SCORES, Keys.BASELINE_SCORES, Keys.RESPONSE_MASK))
def remax(batch: Batch, cfg: AdvantageConfig) -> Pair:
    """ReMax (Li et al. 2023, arXiv:2310.10505): A_t = r(x, y) - r(x, y_greedy) on every valid token."""
    seq_adv = _scores(batch) - _scores(batch, Keys.BASELINE_SCORES)  # [B]
    adv = broadcast_to_tokens(seq_adv, batch[Keys.RESPONSE_MASK])
    return adv, adv


@register_estimator("reinforce_pp", needs=(Keys.TOKEN_REWARDS, Keys.RESPONSE_MASK))
def reinforce_pp(batch: Batch, cfg: AdvantageConfig) -> Pair:
    """REINFORCE++ (Hu et al. 2025, arXiv:2501.03262).

        G_t = sum_{s >= t} gamma^(s-t) r_s    (token rewards, KL penalty included)
        A_t = (G_t - mean(G)) / std(G)         (mean, std over the batch's valid tokens)

    Returns are the un-whitened G.
    """
    mask = batch[Keys.RESPONSE_MASK]
    ret = discounted_returns(batch[Keys.TOKEN_REWARDS], mask, cfg.gamma)  # [B, R]
    adv = zero_invalid(masked_whiten(ret, mask), mask)  # [B, R]
    return adv, ret


@register_estimator("reinforce_pp_baseline", needs=(Keys.SCORES, Keys.GROUP_IDS, Keys.RESPONSE_MASK))
def reinforce_pp_baseline(batch: Batch, cfg: AdvantageConfig) -> Pair:
    """REINFORCE++-baseline (Hu et al. 2025, arXiv:2501.03262).

    A_i = r_i - mean_g(r),   then whitened over the batch's valid tokens.
    """
    mask = batch[Keys.RESPONSE_MASK]
    centered = grpo_scores(_scores(batch), batch[Keys.GROUP_IDS], norm_by_std=False, eps=0.0)  # [B]
    adv = broadcast_to_tokens(centered, mask)  # [B, R]
    adv = zero_invalid(masked_whiten(adv, mask), mask)
    return adv, adv


def compute_advantages(batch: Batch, cfg: AdvantageConfig) -> Pair:
    """Run the estimator named ``cfg.estimator`` after checking the batch has what it needs."""
    check_estimator_inputs(cfg.estimator, batch.keys())
    return get_estimator(cfg.estimator).fn(batch, cfg)
