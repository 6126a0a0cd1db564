"""Loss terms: each returns ``(loss [B, R] unreduced, metrics)``; ``aggregate`` reduces.

Metrics are 0-dim detached tensors (masked means over this batch's valid tokens), so
nothing here syncs with the device. Every loss is 0 where the mask is 0, whatever the
inputs hold there: each input goes through ``zero_invalid`` before any arithmetic, so a
NaN or inf at a masked position reaches neither the loss nor the gradient. The trainer
combines terms before aggregating: aggregate is linear, so
``aggregate(pg + c_kl * kl - c_ent * entropy)`` equals the same sum of aggregates.
"""

from __future__ import annotations

import torch

from .config import PolicyLossConfig
from .importance import mismatch_mode, mismatch_weights, rollout_mismatch
from .kl import kl_penalty
from .masked import masked_mean, masked_var, zero_invalid
from .registry import get_policy_loss, register_policy_loss

LossAndMetrics = tuple[torch.Tensor, dict[str, torch.Tensor]]
_LOG_RATIO_LIMIT = 20.0  # keeps exp(log ratio) finite


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = None,
) -> LossAndMetrics:
    """Clipped surrogate (Schulman et al. 2017, arXiv:1707.06347) with decoupled bounds.

        r_t  = exp(logp_t - old_logp_t)
        L_t  = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))
        L_t  = min(L_t, -c A_t)   where A_t < 0   (dual-clip, Ye et al. 2020, arXiv:1912.09729)

    clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476).
    Metrics: clipfrac (and its _low/_high parts), dual_clipfrac, ppo_kl = mean(old - new).
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"ppo_clip_loss: dual_clip_c={dual_clip_c} must be > 1 (typical: 3.0)")
    m = mask.to(logprobs.dtype)  # [B, R]
    logprobs, old_logprobs, advantages = (zero_invalid(x, mask) for x in (logprobs, old_logprobs, advantages))
    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)  # [B, R]
    ratio = torch.exp(log_ratio)  # [B, R]
    unclipped = -advantages * ratio  # [B, R]
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, R]
    loss = torch.maximum(unclipped, clipped)  # [B, R]
    is_clipped = clipped > unclipped  # [B, R]
    is_dual = torch.zeros_like(is_clipped)  # [B, R]
    if dual_clip_c is not None:
        bound = -advantages * dual_clip_c  # [B, R]
        is_dual = (advantages < 0) & (loss > bound)
        loss = torch.where(is_dual, bound, loss)
    metrics = {
        "clipfrac": masked_mean(is_clipped.to(m.dtype), m).detach(),
        "clipfrac_high": masked_mean((is_clipped & (advantages > 0)).to(m.dtype), m).detach(),
        "clipfrac_low": masked_mean((is_clipped & (advantages < 0)).to(m.dtype), m).detach(),
        "dual_clipfrac": masked_mean(is_dual.to(m.dtype), m).detach(),
        "ppo_kl": masked_mean(old_logprobs - logprobs, m).detach(),
    }
    return loss * m, metrics


def pg_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> LossAndMetrics:
    """Unclipped importance-weighted policy gradient: L_t = -A_t exp(logp_t - old_logp_t).

    On-policy (r = 1) its gradient is REINFORCE's -A_t grad log pi (Williams 1992).
    """
    m = mask.to(logprobs.dtype)  # [B, R]
    logprobs, old_logprobs, advantages = (zero_invalid(x, mask) for x in (logprobs, old_logprobs, advantages))
    ratio = torch.exp((logprobs - old_logprobs).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT))  # [B, R]
    metrics = {"ppo_kl": masked_mean(old_logprobs - logprobs, m).detach()}
    return -advantages * ratio * m, metrics


@register_policy_loss("ppo_clip")
def _ppo_clip(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
) -> LossAndMetrics:
    return ppo_clip_loss(
        logprobs, old_logprobs, advantages, mask, cfg.clip_low, cfg.clip_high, cfg.dual_clip_c
    )


@register_policy_loss("pg")
def _pg(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
) -> LossAndMetrics:
    return pg_loss(logprobs, old_logprobs, advantages, mask)


# ---- the 2025 policy losses: GSPO, CISPO, SAPO -----------------------------------------
def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> LossAndMetrics:
    """GSPO-token (Zheng et al. 2025, arXiv:2507.18071): one importance ratio per sequence.

        s_i     = exp( (1/|y_i|) sum_t log(pi(y_i,t) / pi_old(y_i,t)) )      (length-normalized)
        s_i,t   = sg[s_i] * pi(y_i,t) / sg[pi(y_i,t)]                         (value s_i)
        L_i,t   = max(-A_i,t s_i,t, -A_i,t clip(s_i,t, 1 - clip_low, 1 + clip_high))

    grad_logp(y_i,t) of -s_i,t A_i,t is -s_i A_i,t: every token of a sequence carries the same
    ratio (so with one advantage per sequence the whole sequence is clipped or none of it),
    and with A_i,t = A_i (GRPO) the gradient equals that of
    the sequence-level GSPO objective under seq-mean-token-mean aggregation, the
    paper's 1/G sum_i 1/|y_i| sum_t (set ``actor.loss_agg_mode: seq-mean-token-mean``).
    The bounds are small (paper: 3e-4, 4e-4) because s_i is length-normalized.
    Metrics: clipfrac (token fraction, and its _low/_high parts), ppo_kl = mean(old - new).
    """
    m = mask.to(logprobs.dtype)  # [B, R]
    logprobs, old_logprobs, advantages = (zero_invalid(x, mask) for x in (logprobs, old_logprobs, advantages))
    log_ratio = logprobs - old_logprobs  # [B, R]
    seq_log_ratio = masked_mean(log_ratio.detach(), mask, dim=-1)  # [B], 0 for an empty row
    seq_log_ratio = seq_log_ratio.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    # value s_i, gradient s_i * grad logp_t: sg[s_i] * pi / sg[pi] in log space
    ratio = torch.exp(seq_log_ratio[:, None] + logprobs - logprobs.detach())  # [B, R]
    unclipped = -advantages * ratio  # [B, R]
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, R]
    loss = torch.maximum(unclipped, clipped)  # [B, R]
    is_clipped = clipped > unclipped  # [B, R]
    metrics = {
        "clipfrac": masked_mean(is_clipped.to(m.dtype), m).detach(),
        "clipfrac_high": masked_mean((is_clipped & (advantages > 0)).to(m.dtype), m).detach(),
        "clipfrac_low": masked_mean((is_clipped & (advantages < 0)).to(m.dtype), m).detach(),
        "ppo_kl": masked_mean(-log_ratio, m).detach(),
    }
    return loss * m, metrics


def cispo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float | None = None,
    clip_high: float = 0.28,
) -> LossAndMetrics:
    """CISPO (MiniMax-M1, 2025, arXiv:2506.13585): clip the IS weight, never the token's gradient.

        r_t = exp(logp_t - old_logp_t),   w_t = clip(r_t, 1 - clip_low, 1 + clip_high)
        L_t = -sg(w_t) A_t logp_t                  (no lower bound when clip_low is None)

    The weight is a stop-gradient constant, so every token keeps the REINFORCE gradient
    -w_t A_t grad logp_t, also where r_t is out of the band (PPO would drop it). The paper
    normalizes by the batch's token count, 1 / sum_i |o_i| (``actor.loss_agg_mode: token-mean``).
    The loss value is -w A logp, not a surrogate of the return: compare runs by reward.
    Metrics: clipfrac (tokens whose weight was truncated), is_weight (mean w), ppo_kl.
    """
    m = mask.to(logprobs.dtype)  # [B, R]
    logprobs, old_logprobs, advantages = (zero_invalid(x, mask) for x in (logprobs, old_logprobs, advantages))
    log_ratio = logprobs - old_logprobs  # [B, R]
    ratio = torch.exp(log_ratio.detach().clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT))  # [B, R], no gradient
    low = 0.0 if clip_low is None else 1.0 - clip_low
    weight = ratio.clamp(low, 1.0 + clip_high)  # [B, R]
    loss = -weight * advantages * logprobs  # [B, R]
    metrics = {
        "clipfrac": masked_mean((weight != ratio).to(m.dtype), m),
        "is_weight": masked_mean(weight, m),
        "ppo_kl": masked_mean(-log_ratio, m).detach(),
    }
    return loss * m, metrics


def sapo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> LossAndMetrics:
    """SAPO (Gao et al. 2025, arXiv:2511.20347): a soft, temperature-controlled gate instead of a clip.

        r_t   = exp(logp_t - old_logp_t),   tau_t = tau_pos if A_t > 0 else tau_neg
        f(r)  = sigmoid(tau_t (r - 1)) * 4 / tau_t
        L_t   = -f(r_t) A_t

    Read as: grad L_t = -w_t r_t A_t grad logp_t with w_t = 4 sigmoid(x)(1 - sigmoid(x)),
    x = tau_t (r_t - 1): on-policy (r = 1) w = 1, the plain policy gradient; w decays
    smoothly as r leaves 1, faster for larger tau (tau_neg > tau_pos damps negative-advantage
    tokens more). The token ratio is used, so a few off-policy tokens are damped alone,
    not their whole sequence as in GSPO. The objective averages 1/|y_i| per sequence
    (``actor.loss_agg_mode: seq-mean-token-mean``). The loss value carries the constant
    offset f(1) = 2 / tau per unit advantage. Metrics: gate_weight (mean w; 1 on-policy),
    gate_weight_min, ppo_kl.
    """
    m = mask.to(logprobs.dtype)  # [B, R]
    logprobs, old_logprobs, advantages = (zero_invalid(x, mask) for x in (logprobs, old_logprobs, advantages))
    log_ratio = logprobs - old_logprobs  # [B, R]
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT))  # [B, R]
    tau = torch.where(advantages > 0, tau_pos, tau_neg).to(ratio.dtype)  # [B, R]
    gate = torch.sigmoid(tau * (ratio - 1.0))  # [B, R]
    loss = -gate * (4.0 / tau) * advantages  # [B, R]
    weight = (4.0 * gate * (1.0 - gate)).detach()  # [B, R], the gradient's scale vs plain PG
    lowest = torch.where(mask > 0, weight, torch.ones_like(weight))  # [B, R]
    metrics = {
        "gate_weight": masked_mean(weight, m),
        "gate_weight_min": lowest.amin() if lowest.numel() else weight.new_ones(()),
        "ppo_kl": masked_mean(-log_ratio, m).detach(),
    }
    return loss * m, metrics


@register_policy_loss("gspo")
def _gspo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
) -> LossAndMetrics:
    return gspo_loss(logprobs, old_logprobs, advantages, mask, cfg.gspo_clip_low, cfg.gspo_clip_high)


@register_policy_loss("cispo")
def _cispo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
) -> LossAndMetrics:
    return cispo_loss(logprobs, old_logprobs, advantages, mask, cfg.cispo_clip_low, cfg.cispo_clip_high)


@register_policy_loss("sapo")
def _sapo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
) -> LossAndMetrics:
    return sapo_loss(logprobs, old_logprobs, advantages, mask, cfg.sapo_tau_pos, cfg.sapo_tau_neg)


def compute_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    rollout_logprobs: torch.Tensor | None = None,
) -> LossAndMetrics:
    """The registered loss ``cfg.name``; with ``rollout_logprobs`` also the mismatch metrics and
    the loss times the weights of the correction the config asks for (``cfg.mismatch``, or TIS
    when ``cfg.tis_cap`` is set: see :func:`flowrl.algos.importance.mismatch_weights`).

        L_t = w_t * loss_t,   w_t = min(pi_old / mu, C) (tis)  or  keep_t in {0, 1} (seq_mask, token_mask)
    """
    loss, metrics = get_policy_loss(cfg.name)(logprobs, old_logprobs, advantages, mask, cfg)
    loss = zero_invalid(loss, mask)  # [B, R]; also for a user's registered loss
    mode = mismatch_mode(cfg)
    if rollout_logprobs is None:
        if mode != "none":
            raise ValueError(
                f"policy_loss.mismatch={mode} (or tis_cap) is set but no rollout_logprobs were given; "
                "keep them"
            )
        return loss, metrics
    metrics.update(rollout_mismatch(old_logprobs, rollout_logprobs, mask))
    if mode != "none":
        weights, correction = mismatch_weights(old_logprobs, rollout_logprobs, mask, cfg)  # [B, R], detached
        loss = loss * weights
        metrics.update(correction)
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> LossAndMetrics:
    """Clipped value loss (PPO2 baselines; Schulman et al. 2017).

        V^clip_t = old_V_t + clip(V_t - old_V_t, -eps, eps)
        L_t      = 0.5 * max((V_t - G_t)^2, (V^clip_t - G_t)^2)      (no clip: 0.5 (V_t - G_t)^2)

    Metrics: vf_clipfrac, explained_var = 1 - Var(G - V) / Var(G), vpred (mean V).
    """
    m = mask.to(values.dtype)  # [B, R]
    values, old_values, returns = (zero_invalid(x, mask) for x in (values, old_values, returns))
    err = (values - returns) ** 2  # [B, R]
    if clip_range is None:
        loss, is_clipped = 0.5 * err, torch.zeros_like(err, dtype=torch.bool)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)  # [B, R]
        err_clipped = (clipped_values - returns) ** 2  # [B, R]
        loss, is_clipped = 0.5 * torch.maximum(err, err_clipped), err_clipped > err
    v, g = values.detach(), returns.detach()
    metrics = {
        "vf_clipfrac": masked_mean(is_clipped.to(m.dtype), m),
        "explained_var": 1.0 - masked_var(g - v, m) / (masked_var(g, m) + 1e-8),
        "vpred": masked_mean(v, m),
    }
    return loss * m, metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v over the last dim: [..., V] -> [...]."""
    probs = torch.softmax(logits, dim=-1)  # [..., V]
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def entropy_loss(entropy: torch.Tensor, mask: torch.Tensor) -> LossAndMetrics:
    """Entropy bonus as a loss to minimize: L_t = -H_t (scale by the entropy coefficient)."""
    m = mask.to(entropy.dtype)  # [B, R]
    entropy = zero_invalid(entropy, mask)  # [B, R]
    return -entropy * m, {"entropy": masked_mean(entropy.detach(), m)}


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "low_var_kl",
    clamp: float | None = 10.0,
) -> LossAndMetrics:
    """KL(pi || ref) as a loss term, L_t = k(logp_t, ref_logp_t) (GRPO puts k3 here, Shao 2024).

    See :func:`flowrl.algos.kl.kl_penalty` for the estimators; metric ``kl_loss``.
    """
    m = mask.to(logprobs.dtype)  # [B, R]
    logprobs, ref_logprobs = zero_invalid(logprobs, mask), zero_invalid(ref_logprobs, mask)  # [B, R]
    kl = kl_penalty(logprobs, ref_logprobs, kind, clamp=clamp) * m  # [B, R]
    return kl, {"kl_loss": masked_mean(kl.detach(), m)}


def sft_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> LossAndMetrics:
    """Next-token cross-entropy of supervised fine-tuning: L_t = -log pi(x_t | x_<t) where m_t = 1.

    ``logprobs`` [B, L] holds log pi(x_t | x_<t) at column t (the trainer's sequence
    forward); ``loss_mask`` [B, L] marks the target tokens (the response and its EOS).
    ``aggregate(loss, loss_mask, "token-mean", N_tokens)`` with the global token count
    gives the mean over every target token of the step, as in causal-LM fine-tuning
    (Radford et al. 2018; Ouyang et al. 2022, arXiv:2203.02155, SFT stage).
    """
    m = loss_mask.to(logprobs.dtype)  # [B, L]
    nll = -zero_invalid(logprobs, loss_mask) * m  # [B, L]
    return nll, {"nll": masked_mean(nll.detach(), m)}
