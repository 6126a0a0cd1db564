"""Reduce an unreduced [B, R] loss to the scalar that is backpropagated.

Each mode divides by a count of the *whole* batch (all data-parallel ranks and all
micro-batches), which the trainer passes as ``global_tokens`` / ``global_seqs``.
Then the sum of ``aggregate`` over micro-batches and ranks equals ``aggregate`` over
the whole batch, and so does the gradient, whatever the split.

Note for trainers: data-parallel all-reduce *averages* gradients over ranks, so a
trainer that passes global counts multiplies the loss by the DP world size before
backward (or all-reduces with SUM) to get the whole-batch gradient.
"""

from __future__ import annotations

import torch

from .masked import zero_invalid

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
Count = int | float | torch.Tensor


def loss_counts(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Local (token count, sequence count) of a [B, R] mask, for the trainer to all-reduce.

    A sequence counts when it has at least one valid token: a row whose mask is all 0
    (an empty response) adds nothing to any mode's sum, so it is not in N_seqs either.
    This is the one definition of the counts; trainers all-reduce these.
    """
    m = zero_invalid(mask, mask).float()  # [B, R]
    return m.sum(), (m.sum(dim=-1) > 0).float().sum()


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    global_tokens: Count | None = None,
    global_seqs: Count | None = None,
) -> torch.Tensor:
    """Scalar loss from ``loss`` [B, R] and ``mask`` [B, R].

    token-mean:          sum_{b,t} m_bt l_bt / N_tokens
    seq-mean-token-sum:  sum_b (sum_t m_bt l_bt) / N_seqs
    seq-mean-token-mean: sum_b (sum_t m_bt l_bt / sum_t m_bt) / N_seqs
    N_tokens, N_seqs: global counts when given, else this batch's (``loss_counts``).
    """
    if mode not in AGG_MODES:
        raise ValueError(f"aggregate: unknown mode {mode!r}; choose one of {AGG_MODES}")
    m = zero_invalid(mask, mask).to(loss.dtype)  # [B, R]
    weighted = zero_invalid(loss, mask) * m  # [B, R]; NaN/inf where masked never count
    local_tokens, local_seqs = loss_counts(mask)
    if mode == "token-mean":
        n_tokens = local_tokens if global_tokens is None else global_tokens
        return weighted.sum() / _positive(n_tokens)
    n_seqs = local_seqs if global_seqs is None else global_seqs
    seq_sum = weighted.sum(dim=-1)  # [B]
    if mode == "seq-mean-token-mean":
        seq_sum = seq_sum / m.sum(dim=-1).clamp(min=1.0)  # [B]
    return seq_sum.sum() / _positive(n_seqs)


def _positive(count: Count) -> Count:
    """A count to divide by; an empty batch gives a zero loss instead of NaN."""
    if isinstance(count, torch.Tensor):
        return count.clamp(min=1.0)
    return max(count, 1)


# ---- metrics over micro-batches, ranks and mini-batches -------------------------------
MetricValue = float | torch.Tensor


def metric_reduction(name: str) -> str:
    """How values of the metric ``name`` combine over micro-batches, ranks and mini-batches.

    A name ending in ``_max`` or ``/max`` is a maximum ("max": the max of the parts' maxima),
    ``_min`` or ``/min`` a minimum ("min"); every other metric is averaged ("mean").
    """
    if name.endswith(("_max", "/max")):
        return "max"
    if name.endswith(("_min", "/min")):
        return "min"
    return "mean"


def reduce_metric(name: str, values: list[MetricValue]) -> MetricValue:
    """Combine the parts' values of one metric (see ``metric_reduction``); tensors stay on device."""
    if not values:
        raise ValueError(f"reduce_metric: no values for metric {name!r}")
    how = metric_reduction(name)
    if how == "mean":
        return sum(values, 0.0) / len(values)
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return max(values) if how == "max" else min(values)  # type: ignore[type-var]
    device = tensors[0].device
    parts = [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values]
    stacked = torch.stack(parts)  # [n]
    return stacked.max() if how == "max" else stacked.min()
