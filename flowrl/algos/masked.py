"""Masked reductions over padded [B, R] tensors.

Masks are 0/1 (float or int) tensors of the same shape as the values; positions
with mask 0 never contribute to a sum, mean or variance.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) over ``dim`` (all dims when None); NaN/inf where mask is 0 are ignored."""
    xm = torch.where(mask > 0, x * mask.to(x.dtype), torch.zeros_like(x))  # [B, R]
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask) over ``dim``; 0 where the mask is empty."""
    count = masked_sum(torch.ones_like(x), mask, dim)  # [] or reduced shape
    return masked_sum(x, mask, dim) / count.clamp(min=1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid entries of x (a scalar).

    var = sum(mask * (x - mean)^2) / n, times n / (n - 1) when ``unbiased`` and n > 1.
    """
    mean = masked_mean(x, mask)  # []
    var = masked_mean((x - mean) ** 2, mask)  # []
    if unbiased:
        n = mask.to(x.dtype).sum()  # []
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1e-8), var)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and var over the valid entries.

    With ``shift_mean=False`` the mean is added back (scale only). Masked positions
    are transformed too; multiply by the mask where they must stay zero.
    """
    mean = masked_mean(x, mask)  # []
    var = masked_var(x, mask, unbiased=unbiased)  # []
    white = (x - mean) * torch.rsqrt(var + eps)  # [B, R]
    return white if shift_mean else white + mean
