"""The pairwise loss of reward-model training on preference pairs.

A reward model r scores a whole sequence (prompt + response). Under the Bradley–Terry
model the chosen response y_c beats the rejected y_r with probability
sigma(r(x, y_c) - r(x, y_r)); training maximizes the log-likelihood of the observed
preferences (Stiennon et al. 2020, arXiv:2009.01325; Ouyang et al. 2022, arXiv:2203.02155).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_i = -log sigma(r_c,i - r_r,i) per pair, unreduced.  [B], [B] -> [B]

    Metrics (detached, means over the pairs): ``accuracy`` the fraction with
    r_c > r_r (a tie counts as wrong), ``margin`` mean r_c - r_r, ``chosen_score`` and
    ``rejected_score``. Sum ``loss / n_pairs`` over micro-batches and ranks for the
    global mean.
    """
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(
            "bradley_terry_loss: chosen and rejected scores must both be [B]; got "
            f"{tuple(chosen_scores.shape)} and {tuple(rejected_scores.shape)}"
        )
    margin = chosen_scores.float() - rejected_scores.float()  # [B]
    loss = -F.logsigmoid(margin)  # [B], log(1 + exp(-margin)) without overflow
    metrics = {
        "accuracy": (margin > 0).float().mean().detach(),
        "margin": margin.mean().detach(),
        "chosen_score": chosen_scores.float().mean().detach(),
        "rejected_score": rejected_scores.float().mean().detach(),
    }
    return loss, metrics


def pair_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Fraction of pairs whose chosen sequence scores strictly higher than the rejected one."""
    return float((chosen_scores > rejected_scores).float().mean())
