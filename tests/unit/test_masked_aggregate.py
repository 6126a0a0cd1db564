import math

import pytest
import torch
from torch.testing import assert_close

from flowrl.algos import (
    AGG_MODES,
    aggregate,
    loss_counts,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_clip_loss,
)

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # valid: 1, 2, 4


def test_masked_sum_mean_var_by_hand():
    assert masked_sum(X, MASK).item() == 7.0
    assert_close(masked_sum(X, MASK, dim=-1), torch.tensor([3.0, 4.0]))
    assert_close(masked_mean(X, MASK), torch.tensor(7.0 / 3))
    assert_close(masked_mean(X, MASK, dim=-1), torch.tensor([1.5, 4.0]))
    # deviations from 7/3: -4/3, -1/3, 5/3 -> squares sum 16/9 + 1/9 + 25/9 = 14/3
    assert_close(masked_var(X, MASK, unbiased=False), torch.tensor(14.0 / 9))
    assert_close(masked_var(X, MASK, unbiased=True), torch.tensor(14.0 / 6))


def test_masked_positions_never_leak_even_if_nan_or_inf():
    garbage = X.clone()
    garbage[0, 2], garbage[1, 1], garbage[1, 2] = float("nan"), float("inf"), -float("inf")
    assert masked_sum(garbage, MASK).item() == 7.0
    assert_close(masked_mean(garbage, MASK), torch.tensor(7.0 / 3))
    assert_close(masked_var(garbage, MASK), torch.tensor(14.0 / 6))


def test_masked_mean_of_empty_mask_is_zero():
    assert masked_mean(X, torch.zeros_like(X)).item() == 0.0
    assert_close(masked_mean(X, torch.tensor([[1.0, 0, 0], [0, 0, 0]]), dim=-1), torch.tensor([1.0, 0.0]))


def test_masked_whiten():
    white = masked_whiten(X, MASK)
    expected = (X - 7.0 / 3) / math.sqrt(14.0 / 6 + 1e-8)
    assert_close(white, expected)
    assert abs(masked_mean(white, MASK).item()) < 1e-6
    assert_close(masked_var(white, MASK), torch.tensor(1.0))
    assert_close(masked_var(masked_whiten(X, MASK, unbiased=False), MASK, unbiased=False), torch.tensor(1.0))
    scaled = masked_whiten(X, MASK, shift_mean=False)
    assert_close(masked_mean(scaled, MASK), torch.tensor(7.0 / 3))


# ---- aggregation ---------------------------------------------------------------
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
LMASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def test_aggregate_modes_by_hand():
    assert_close(aggregate(LOSS, LMASK, "token-mean"), torch.tensor((1 + 2 + 4 + 5 + 6) / 5))
    assert_close(aggregate(LOSS, LMASK, "seq-mean-token-sum"), torch.tensor((3 + 15) / 2))
    assert_close(aggregate(LOSS, LMASK, "seq-mean-token-mean"), torch.tensor((1.5 + 5.0) / 2))
    assert_close(aggregate(LOSS, LMASK, "token-mean", global_tokens=10), torch.tensor(18 / 10))
    assert_close(
        aggregate(LOSS, LMASK, "seq-mean-token-sum", global_seqs=torch.tensor(6.0)), torch.tensor(3.0)
    )
    tokens, seqs = loss_counts(torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]))
    assert (tokens.item(), seqs.item()) == (3.0, 2.0)  # the empty row is not a sequence


def test_aggregate_empty_mask_is_zero_and_unknown_mode_raises():
    for mode in AGG_MODES:
        assert aggregate(LOSS, torch.zeros_like(LMASK), mode).item() == 0.0
    with pytest.raises(ValueError, match="unknown mode 'mean'"):
        aggregate(LOSS, LMASK, "mean")


def _random_rollout(seed: int, batch: int = 16, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[3] = 0  # one sequence with no valid token
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()  # [B, R]
    old = -torch.rand(batch, length, generator=g) * 3  # [B, R]
    return {
        "mask": mask,
        "old": old,
        "logprobs": old + 0.3 * torch.randn(batch, length, generator=g),
        "adv": torch.randn(batch, length, generator=g),
    }


def _loss(
    logprobs: torch.Tensor, d: dict[str, torch.Tensor], rows: slice, mode: str, **counts
) -> torch.Tensor:
    loss, _ = ppo_clip_loss(logprobs[rows], d["old"][rows], d["adv"][rows], d["mask"][rows], 0.2, 0.28)
    return aggregate(loss, d["mask"][rows], mode, **counts)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_over_ranks_and_microbatches_matches_whole_batch(mode, seed):
    """2 ranks x 4 micro-batches, global counts: the summed loss and gradient equal the whole batch's."""
    d = _random_rollout(seed)
    whole_lp = d["logprobs"].clone().requires_grad_(True)
    whole = _loss(whole_lp, d, slice(None), mode)
    whole.backward()

    tokens, seqs = loss_counts(d["mask"])  # what the trainer all-reduces over ranks
    split_lp = d["logprobs"].clone().requires_grad_(True)
    total = torch.zeros(())
    for rank in range(2):
        for micro in range(4):
            start = rank * 8 + micro * 2
            part = _loss(split_lp, d, slice(start, start + 2), mode, global_tokens=tokens, global_seqs=seqs)
            part.backward()  # gradient accumulation
            total = total + part.detach()
    assert abs(total.item() - whole.item()) <= 1e-6
    assert (split_lp.grad - whole_lp.grad).abs().max().item() <= 1e-6
    assert whole_lp.grad.abs().sum() > 0


def test_local_counts_would_break_the_split():
    """Guard that the test above can fail: averaging micro-batch means is not the batch mean."""
    d = _random_rollout(0)
    whole = _loss(d["logprobs"], d, slice(None), "token-mean")
    naive = sum(_loss(d["logprobs"], d, slice(i, i + 2), "token-mean") for i in range(0, 16, 2)) / 8
    assert abs(naive.item() - whole.item()) > 1e-3


# ---- NaN / inf at masked positions: neither values nor gradients ------------------------
def _poisoned(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")])
    return torch.where(mask > 0, x, bad[torch.arange(x.numel()) % 3].reshape(x.shape))


REDUCTIONS = {
    "sum": lambda x, m: masked_sum(x, m),
    "sum_rows": lambda x, m: masked_sum(x, m, dim=-1),
    "mean": lambda x, m: masked_mean(x, m),
    "mean_rows": lambda x, m: masked_mean(x, m, dim=-1),
    "mean_cols": lambda x, m: masked_mean(x, m, dim=0),
    "var": lambda x, m: masked_var(x, m),
    "whiten": lambda x, m: masked_whiten(x, m)[m > 0],
    "scale": lambda x, m: masked_whiten(x, m, shift_mean=False)[m > 0],
    **{mode: (lambda x, m, mode=mode: aggregate(x, m, mode)) for mode in AGG_MODES},
}


@pytest.mark.parametrize("name", REDUCTIONS)
def test_masked_reductions_ignore_nan_and_inf_also_in_the_gradient(name):
    d = _random_rollout(0)  # has an empty row
    mask = d["mask"]
    clean = d["adv"].clone().requires_grad_(True)
    bad = _poisoned(d["adv"], mask).requires_grad_(True)
    want, got = REDUCTIONS[name](clean, mask), REDUCTIONS[name](bad, mask)
    assert torch.isfinite(got).all()
    assert_close(got, want)
    want.sum().backward()
    got.sum().backward()
    assert torch.isfinite(bad.grad).all() and (bad.grad[mask == 0] == 0).all()
    assert_close(bad.grad, clean.grad)


def test_loss_counts_skip_empty_rows_and_match_aggregate():
    """N_seqs counts rows with a valid token: seq-mean over a batch with an empty response
    equals the mean over the non-empty ones (an empty row adds 0 to the sum and to N)."""
    d = _random_rollout(1)
    mask, loss = d["mask"], d["adv"]
    assert mask[3].sum() == 0
    tokens, seqs = loss_counts(mask)
    assert (tokens.item(), seqs.item()) == (mask.sum().item(), 15.0)
    keep = mask.sum(-1) > 0
    for mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        assert_close(aggregate(loss, mask, mode), aggregate(loss[keep], mask[keep], mode))
        assert_close(aggregate(loss, mask, mode, global_seqs=seqs), aggregate(loss, mask, mode))
