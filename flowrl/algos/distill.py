"""On-policy distillation: the teacher's per-token log-probs of the student's own samples.

The student π samples y ~ π(·|x); a frozen teacher π_T scores every sampled token. The
advantage of token t is the negative single-sample estimate of the per-token reverse KL,

    A_t = log π_T(y_t | x, y_<t) − log π_old(y_t | x, y_<t)

(Agarwal et al. 2024, *On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes* (GKD), arXiv:2306.13649, with the reverse KL as the divergence;
in the per-token sampled form used for Qwen3 (arXiv:2505.09388) and by Thinking Machines,
"On-Policy Distillation", 2025). The registered estimator ``distill`` adds, optionally,
``distill_reward_weight`` times GRPO's outcome advantage of the task reward.
"""

from __future__ import annotations

import torch

from flowrl.batch import Batch
from flowrl.keys import Keys

from .advantages import broadcast_to_tokens, grpo_scores
from .config import AdvantageConfig
from .masked import masked_mean, zero_invalid
from .registry import register_estimator


def distill_advantages(
    teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """A_t = log π_T(y_t) − log π_old(y_t) on valid tokens, 0 where ``mask`` is 0.  [B, R] x 3 -> [B, R]

    The per-token reverse-KL reward of on-policy distillation (GKD, arXiv:2306.13649, with
    D = KL(π || π_T); the sampled per-token form of Qwen3 and Thinking Machines).

    Deviation from the full reverse-KL gradient: a token's advantage is its own term only
    (discount 0, as Thinking Machines use), not the sum of the terms of the tokens after it.
    Gradient steps on it lower each position's KL given the student's own prefix; the terms
    the sum would add only steer which prefixes are visited. What either input holds at a
    masked position (NaN, inf) never reaches the output.
    """
    teacher = zero_invalid(teacher_logprobs, mask)  # [B, R]
    student = zero_invalid(old_logprobs, mask)  # [B, R]
    return zero_invalid(teacher - student, mask)  # [B, R]


def distill_metrics(
    teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the student is from the teacher on the student's own samples (detached scalars).

    - ``reverse_kl``: mean over valid tokens of log π_old(y_t) − log π_T(y_t), the k1 estimate
      of the per-token KL(π || π_T); falls towards 0 as the student matches the teacher.
    - ``teacher_logprob``: mean over valid tokens of log π_T(y_t): how likely the teacher finds
      the student's tokens; rises as the student's samples agree with the teacher.
    - ``seq_reverse_kl``: the per-sequence sum of the k1 terms, averaged over sequences with at
      least one valid token (the sequence-level KL estimate; length-weighted).
    """
    teacher = zero_invalid(teacher_logprobs, mask).detach()  # [B, R]
    student = zero_invalid(old_logprobs, mask).detach()  # [B, R]
    per_token = zero_invalid(student - teacher, mask)  # [B, R]
    has_tokens = (mask > 0).any(-1)  # [B]
    seq_kl = per_token.sum(-1)[has_tokens]  # [b]
    return {
        "reverse_kl": masked_mean(per_token, mask),
        "teacher_logprob": masked_mean(teacher, mask),
        "seq_reverse_kl": seq_kl.mean() if seq_kl.numel() else per_token.new_zeros(()),
    }


@register_estimator(
    "distill",
    needs=(Keys.TEACHER_LOGPROBS, Keys.OLD_LOGPROBS, Keys.RESPONSE_MASK, Keys.SCORES, Keys.GROUP_IDS),
)
def distill(batch: Batch, cfg: AdvantageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """On-policy distillation: A_t = log π_T(y_t) − log π_old(y_t) + w · A_i^GRPO.

    w = ``cfg.distill_reward_weight`` (0: pure distillation, the task reward unused);
    A_i^GRPO is GRPO's group-normalized score (``norm_by_std`` and ``eps`` apply) on every
    token of response i. Returns the advantages as returns too (no critic).
    """
    mask = batch[Keys.RESPONSE_MASK]  # [B, R]
    adv = distill_advantages(batch[Keys.TEACHER_LOGPROBS], batch[Keys.OLD_LOGPROBS], mask)  # [B, R]
    if cfg.distill_reward_weight != 0.0:
        scores = batch[Keys.SCORES].float()  # [B]
        seq_adv = grpo_scores(scores, batch[Keys.GROUP_IDS], cfg.norm_by_std, cfg.eps)  # [B]
        adv = adv + cfg.distill_reward_weight * broadcast_to_tokens(seq_adv, mask).to(adv.dtype)  # [B, R]
    return adv, adv
