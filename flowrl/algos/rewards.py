"""From sequence scores to per-token rewards, optionally with a KL penalty to the reference.

token_scores[b, t] = score_b if t is the last valid response token of b, else 0
token_rewards      = token_scores - beta * KL_t(pi || ref)          (Ziegler et al. 2019)
"""

from __future__ import annotations

import torch

from .kl import kl_penalty
from .masked import masked_mean, zero_invalid


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with mask 1 in each row [B] (0 for an empty row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)  # [R]
    return (positions * (mask > 0)).amax(dim=-1)  # [B]


def token_scores(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence score [B] on its last valid response token -> [B, R].

    A row with an empty mask gets no score (all zeros).
    """
    if scores.dim() != 1 or scores.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"token_scores: scores must be [B]={response_mask.shape[0]}, got {tuple(scores.shape)}"
        )
    out = torch.zeros(response_mask.shape, dtype=scores.dtype, device=scores.device)  # [B, R]
    out.scatter_(1, last_token_index(response_mask)[:, None], scores[:, None])
    return zero_invalid(out, response_mask)


def apply_kl_penalty(
    token_scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """token_rewards [B, R] = token_scores - kl_coef * KL [B, R], zero where mask is 0.

    Metrics (detached): ``kl`` the mean per-token KL over valid tokens (feed it to an
    adaptive controller), ``kl_seq`` the mean over sequences of the summed KL, ``kl_coef``.
    """
    m = mask.to(token_scores.dtype)  # [B, R]
    logprobs, ref_logprobs = zero_invalid(logprobs, mask), zero_invalid(ref_logprobs, mask)  # [B, R]
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * m  # [B, R]
    rewards = (zero_invalid(token_scores, mask) - kl_coef * kl) * m  # [B, R]
    metrics = {
        "kl": masked_mean(kl, m).detach(),
        "kl_seq": kl.sum(dim=-1).mean().detach(),
        "kl_coef": torch.tensor(float(kl_coef)),
    }
    return rewards, metrics
