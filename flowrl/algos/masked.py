"""Masked reductions over padded [B, R] tensors.

Masks are 0/1 (float, int or bool) tensors of the same shape as the values; positions
with mask 0 never contribute to a sum, mean or variance, whatever they hold (NaN and
inf included, also in the gradient): values are selected with ``torch.where`` before
any arithmetic, never multiplied by the mask.

Means and variances are computed in float64 around a reference value, one valid entry
of x:  mean = x_ref + sum m (x - x_ref) / sum m.  Equal values then give deviations of
exactly 0, so a constant x has exactly its value as mean and exactly 0 as variance and
whitened values, in every input dtype (a plain fp32 sum of 64 copies of 0.1 is off by a
rounding step, which division by a tiny std turns into O(1) garbage).
"""

from __future__ import annotations

import torch


def zero_invalid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask > 0, else 0: what x holds at masked positions (NaN, inf) never leaks.

    Unlike ``x * mask`` (NaN * 0 = NaN) this drops it from the value and from the
    gradient (the gradient of x at masked positions is 0). Apply it to every input
    before arithmetic whose derivative could be non-finite there (exp, square, ...).
    """
    return torch.where(mask > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def float_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of a statistic of x: x's own if floating, else the default float."""
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _reference(x: torch.Tensor, valid: torch.Tensor, dim: int | None) -> torch.Tensor:
    """One valid entry of x (the first), over all of x or along ``dim`` (kept); 0 where none.

    ``x`` is already 0 wherever ``valid`` is False, so a row without a valid entry gets 0.
    """
    if x.numel() == 0:
        return x.new_zeros(())
    if dim is None:
        first = valid.reshape(-1).to(x.dtype).argmax()  # [] index of the first valid entry
        return x.reshape(-1)[first]  # []
    first = valid.to(x.dtype).argmax(dim=dim, keepdim=True)  # [..., 1, ...]
    return x.gather(dim, first)  # x's shape with dim of size 1


def _centered(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 (x - mean, mean, weights, count) of the valid entries, exact for ties.

        d = m (x - x_ref),   mean = x_ref + sum d / sum m,   centered = (x - x_ref) - sum d / sum m

    ``centered`` is 0 at masked positions; mean and count keep ``dim`` (size 1) when given.
    """
    x, mask = torch.broadcast_tensors(x, mask)
    valid = mask > 0  # [B, R]
    xs = zero_invalid(x, mask).double()  # [B, R], 0 where masked
    w = zero_invalid(mask, mask).double()  # [B, R] weights m
    ref = _reference(xs, valid, dim).detach()  # [] or keepdim
    dev = torch.where(valid, xs - ref, 0.0)  # [B, R]
    count = w.sum() if dim is None else w.sum(dim=dim, keepdim=True)  # [] or keepdim
    shift = (w * dev).sum() if dim is None else (w * dev).sum(dim=dim, keepdim=True)
    shift = shift / count.clamp(min=1e-8)  # mean - x_ref
    centered = torch.where(valid, dev - shift, 0.0)  # [B, R]
    return centered, ref + shift, w, count


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(m x) over ``dim`` (all dims when None); NaN/inf where mask is 0 are ignored."""
    xm = zero_invalid(x, mask) * zero_invalid(mask, mask).to(x.dtype)  # [B, R]
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(m x) / sum(m) over ``dim``; 0 where the mask is empty; exact for a constant x."""
    _, mean, _, _ = _centered(x, mask, dim)  # [] or keepdim
    mean = mean if dim is None else mean.squeeze(dim)
    return mean.to(float_dtype(x))


def _masked_var64(centered: torch.Tensor, w: torch.Tensor, n: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """sum(m (x - mean)^2) / n, times n / (n - 1) when ``unbiased`` and n > 1 (float64 [])."""
    var = (w * centered**2).sum() / n.clamp(min=1e-8)  # []
    if unbiased:
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1e-8), var)
    return var


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid entries of x (a scalar); exactly 0 for a constant x.

    var = sum(mask * (x - mean)^2) / n, times n / (n - 1) when ``unbiased`` and n > 1.
    """
    centered, _, w, n = _centered(x, mask)  # [B, R], [], [B, R], []
    return _masked_var64(centered, w, n, unbiased).to(float_dtype(x))


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and var over the valid entries.

    A constant x (zero variance) whitens to exactly 0. With ``shift_mean=False`` the
    mean is added back (scale only). Masked positions are transformed too, with the
    statistics detached (a NaN there stays there and reaches no gradient of a valid
    entry); use ``zero_invalid`` where they must be zero.
    """
    centered, mean, w, n = _centered(x, mask)  # [B, R], [], [B, R], []
    var = _masked_var64(centered, w, n, unbiased)  # []
    centered = torch.where(var > 0, centered, 0.0)  # ties: exactly 0
    rstd = torch.rsqrt(var + eps)  # []
    valid = torch.broadcast_tensors(x, mask)[1] > 0  # [B, R]
    masked_white = (x.double() - mean.detach()) * rstd.detach()  # [B, R], used where masked
    white = torch.where(valid, centered * rstd, masked_white)  # [B, R]
    if not shift_mean:
        white = white + torch.where(valid, mean, mean.detach())
    return white.to(float_dtype(x))
