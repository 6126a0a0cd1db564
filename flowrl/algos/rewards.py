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


def overlong_penalty(
    lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), per response [B].

        R_length(y) = 0                                  |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
                    = -1                                 L_max < |y|

    times ``factor``; ``lengths`` [B] are the response lengths |y| (valid tokens),
    ``max_length`` is L_max, ``buffer`` is L_cache (1 <= L_cache <= L_max). The penalty is
    added to the score, so a response cut at L_max gets -factor whatever its answer.
    """
    if not 1 <= buffer <= max_length:
        raise ValueError(f"overlong_penalty: buffer={buffer} must be in [1, max_length={max_length}]")
    length = lengths.double()  # [B]
    expected = float(max_length - buffer)  # L_max - L_cache
    ramp = ((expected - length) / buffer).clamp(max=0.0)  # [B] 0 up to L_max - L_cache, then linear
    penalty = torch.where(length > max_length, torch.full_like(ramp, -1.0), ramp)  # [B]
    return (factor * penalty).float()  # [B]
