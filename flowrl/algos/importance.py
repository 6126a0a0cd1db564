"""Sampler vs trainer log-probs: mismatch metrics and truncated importance sampling.

The rollout engine (vLLM) and the trainer compute log-probs of the same tokens with
different kernels (and often dtypes), so the samples come from a policy mu slightly
different from the trainer's pi_old. Truncated importance sampling (TIS) reweights
each token's policy-gradient term by min(pi_old / mu, C) (Ionides 2008; for LLM RL,
Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training").
"""

from __future__ import annotations

import math

import torch

from .masked import masked_mean


def tis_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """w_t = min(exp(old_t - rollout_t), cap), detached [B, R]; multiply into the PG loss."""
    if cap <= 0:
        raise ValueError(f"tis_weights: cap={cap} must be > 0 (typical: 2.0)")
    log_w = (old_logprobs - rollout_logprobs).detach()  # [B, R]
    return torch.exp(log_w.clamp(max=math.log(cap)))


def rollout_mismatch(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Detached metrics over valid tokens of delta_t = old_t - rollout_t.

    rollout_logprob_diff_mean: mean |delta|;  rollout_logprob_diff_max: max |delta|;
    rollout_prob_ratio_err: mean |exp(delta) - 1| (relative error of the token probability).
    """
    diff = (old_logprobs - rollout_logprobs).detach()  # [B, R]
    diff = torch.where(mask > 0, diff, torch.zeros_like(diff))  # [B, R], 0 where masked
    delta = diff.abs()  # [B, R]
    ratio_err = (torch.exp(diff) - 1.0).abs()  # [B, R]
    return {
        "rollout_logprob_diff_mean": masked_mean(delta, mask),
        "rollout_logprob_diff_max": delta.max() if delta.numel() else delta.sum(),
        "rollout_prob_ratio_err": masked_mean(ratio_err, mask),
    }
