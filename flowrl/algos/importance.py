"""Sampler vs trainer log-probs: mismatch metrics and the corrections that use them.

The rollout engine (vLLM) and the trainer compute log-probs of the same tokens with
different kernels (and often dtypes), so the samples come from a policy mu slightly
different from the trainer's pi_old. With delta_t = log pi_old(y_t) - log mu(y_t):

- tis:        truncated importance sampling, each token's loss times min(exp(delta_t), C)
              (Ionides 2008; for LLM RL, Yao et al. 2025, "Your efficient RL framework
              secretly brings you off-policy RL training");
- seq_mask:   geometric-mean rejection: drop sequence i when exp(mean_t delta_t) leaves [lo, hi];
- token_mask: masked importance sampling: drop token t when exp(delta_t) leaves [lo, hi]
              (both: Liu, Li et al. 2025, "When Speed Kills Stability: Demystifying RL
              Collapse from the Training-Inference Mismatch").

Deviation: a dropped token gets weight 0 but stays in the loss's token / sequence count
(the trainer fixes the global counts from the response mask before any loss runs), so a
step that drops a fraction f of its tokens has a gradient about (1 - f) times as large as
one that left them out of the count (verl and slime leave them out).
"""

from __future__ import annotations

import math

import torch

from .config import PolicyLossConfig
from .masked import masked_mean, zero_invalid

MISMATCH_MODES = ("none", "tis", "seq_mask", "token_mask")
_LOG_RATIO_LIMIT = 20.0  # keeps exp(log ratio) finite


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


def mismatch_mode(cfg: PolicyLossConfig) -> str:
    """The correction ``cfg`` asks for: ``cfg.mismatch``, or ``tis`` when only ``tis_cap`` is set."""
    if cfg.mismatch not in MISMATCH_MODES:
        raise ValueError(f"policy_loss.mismatch={cfg.mismatch!r} is not one of {', '.join(MISMATCH_MODES)}")
    if cfg.mismatch == "none" and cfg.tis_cap is not None:
        return "tis"
    return cfg.mismatch


def seq_mask_keep(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Geometric-mean sequence rejection: (keep [B, R] 0/1, g [B]).

        g_i    = exp( (1/|y_i|) sum_{t valid} (old_t - rollout_t) )
        keep_i = low <= g_i <= high,   broadcast over the row's tokens

    A row without valid tokens has g = 1 and is kept (its loss is 0 anyway).
    """
    delta = (zero_invalid(old_logprobs, mask) - zero_invalid(rollout_logprobs, mask)).detach()  # [B, R]
    mean_delta = masked_mean(delta, mask, dim=-1)  # [B], 0 for an empty row
    g = torch.exp(mean_delta.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT))  # [B]
    keep = (g >= low) & (g <= high)  # [B]
    return keep[:, None].expand_as(delta).to(delta.dtype), g


def token_mask_keep(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, low: float, high: float
) -> torch.Tensor:
    """Token rejection: keep_t = low <= exp(old_t - rollout_t) <= high, as 0/1 [B, R] (1 where masked)."""
    delta = (zero_invalid(old_logprobs, mask) - zero_invalid(rollout_logprobs, mask)).detach()  # [B, R]
    ratio = torch.exp(delta.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT))  # [B, R]
    return ((ratio >= low) & (ratio <= high)).to(delta.dtype)


def mismatch_weights(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cfg: PolicyLossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Detached per-token weights [B, R] of the correction ``mismatch_mode(cfg)`` and its metrics.

    The policy loss is multiplied by them: TIS weights min(exp(delta), tis_cap) and/or the
    0/1 keep mask of seq_mask / token_mask (``tis_cap`` set with a mask mode: both apply).
    ``none`` gives ones and no metrics. Metrics (masked positions never count):
    tis_weight (mean weight), tis_truncated_frac (tokens with exp(delta) > cap),
    rollout_masked_token_frac (valid tokens dropped), rollout_masked_seq_frac (sequences
    with a dropped token, out of those with a valid token), and for seq_mask the extremes
    rollout_seq_ratio_max / _min of g over sequences with a valid token.
    """
    mode = mismatch_mode(cfg)
    old = zero_invalid(old_logprobs, mask).detach()  # [B, R]
    rollout = zero_invalid(rollout_logprobs, mask).detach()  # [B, R]
    weights = torch.ones_like(old)  # [B, R]
    metrics: dict[str, torch.Tensor] = {}
    if cfg.tis_cap is not None:
        tis = tis_weights(old, rollout, cfg.tis_cap)  # [B, R]
        weights = weights * tis
        truncated = (old - rollout) > math.log(cfg.tis_cap)  # [B, R]
        metrics["tis_weight"] = masked_mean(tis, mask)
        metrics["tis_truncated_frac"] = masked_mean(truncated.to(old.dtype), mask)
    elif mode == "tis":
        raise ValueError("policy_loss.mismatch=tis needs policy_loss.tis_cap (e.g. 2.0)")
    if mode in ("seq_mask", "token_mask"):
        if mode == "seq_mask":
            keep, g = seq_mask_keep(old, rollout, mask, cfg.mismatch_seq_low, cfg.mismatch_seq_high)
            metrics |= _extremes(g, zero_invalid(mask, mask).sum(-1) > 0, "rollout_seq_ratio")
        else:
            keep = token_mask_keep(old, rollout, mask, cfg.mismatch_token_low, cfg.mismatch_token_high)
        weights = weights * keep
        metrics |= masked_fractions(keep, mask)
    return weights, metrics


def _extremes(x: torch.Tensor, valid: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """``{name}_max`` / ``{name}_min`` of x [B] over the valid entries (1 if none); no device sync."""
    if x.numel() == 0:
        return {f"{name}_max": x.new_ones(()), f"{name}_min": x.new_ones(())}
    inf = torch.full_like(x, math.inf)  # [B]
    high, low = torch.where(valid, x, -inf).amax(), torch.where(valid, x, inf).amin()  # [], []
    one = torch.ones_like(high)
    return {
        f"{name}_max": torch.where(torch.isfinite(high), high, one),
        f"{name}_min": torch.where(torch.isfinite(low), low, one),
    }


def masked_fractions(keep: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fractions of valid tokens and of sequences (with a valid token) that ``keep`` [B, R] drops."""
    dropped = (1.0 - keep) * zero_invalid(mask, mask).to(keep.dtype)  # [B, R], 1: a valid token dropped
    has_tokens = (zero_invalid(mask, mask).sum(-1) > 0).to(keep.dtype)  # [B]
    seq_dropped = (dropped.sum(-1) > 0).to(keep.dtype)  # [B]
    return {
        "rollout_masked_token_frac": masked_mean(dropped, mask),
        "rollout_masked_seq_frac": masked_mean(seq_dropped, has_tokens),
    }


# Mean |old_logprobs - rollout_logprobs| per token far beyond what the dtypes explain. Measured:
# fp32 on CPU ~2e-7 (docs/hybrid_engine.md); bf16 on GPU 0.008-0.017 (docs/benchmarks.md) and
# 0.0027-0.0465 over a 200-step run (docs/results.md); a real sync bug (two TP ranks sampling
# different tokens) gave 0.78 (docs/benchmarks.md). The bands sit >10x above the normal figures.
EXPECTED_LOGPROB_DIFF = {"float32": 1e-2, "low_precision": 0.5}


def expected_logprob_diff(
    rollout_dtype: str, trainer_dtype: str, top_p: float = 1.0, top_k: int = -1
) -> float:
    """The largest normal mean |old - rollout| per token right after a weight sync: 1e-2 when
    the trainer and the rollout engine both compute in float32, else (bf16 / fp16) 0.5.

    The sampler reports log-probs after top-p / top-k, renormalized over the kept tokens; the
    trainer does not truncate. Top-p keeps a mass Z >= top_p, so it adds at most -log(top_p)
    per token; top-k (> 0) has no such bound, so no band (inf) is derived for it.
    """
    if top_k > 0:
        return math.inf
    both_fp32 = rollout_dtype == "float32" and trainer_dtype == "float32"
    band = EXPECTED_LOGPROB_DIFF["float32" if both_fp32 else "low_precision"]
    return band - math.log(top_p) if top_p < 1.0 else band
