import math

import pytest
import torch
from torch.testing import assert_close

from flowrl.algos import (
    ESTIMATORS,
    AdvantageConfig,
    check_estimator_inputs,
    compute_advantages,
    discounted_returns,
    gae_advantages,
    get_estimator,
    group_stats,
    grpo_scores,
    masked_mean,
    masked_var,
    masked_whiten,
    register_estimator,
    rloo_scores,
)
from flowrl.batch import Batch
from flowrl.keys import Keys

SCORES = torch.tensor([1.0, 0.0, 2.0, 4.0, 6.0, 7.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 2])  # sizes 3, 2, 1


def _random_mask(g: torch.Generator, batch: int, length: int, holes: bool) -> torch.Tensor:
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()  # [B, R]
    if holes:  # e.g. tool-output tokens inside a multi-turn response
        mask = mask * (torch.rand(batch, length, generator=g) > 0.3).float()
    return mask


# ---- GAE -----------------------------------------------------------------------
def test_gae_by_hand():
    # one response of 2 valid tokens; the 3rd position is padding with garbage that must not count
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=1 (last): delta = 1 + 0.9*0 - 0.2 = 0.8;      A1 = 0.8
    # t=0:        delta = 0 + 0.9*0.2 - 0.5 = -0.32;  A0 = -0.32 + 0.9*0.8*0.8 = 0.256
    assert_close(adv, torch.tensor([[0.256, 0.8, 0.0]]))
    assert_close(ret, torch.tensor([[0.756, 1.0, 0.0]]))


def _gae_loop(rewards, values, mask, gamma, lam):
    """Reference: per row, walk the valid positions only, in plain Python floats."""
    adv = torch.zeros_like(values)
    for b in range(values.shape[0]):
        idx = [t for t in range(values.shape[1]) if mask[b, t] > 0]
        running = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = values[b, idx[k + 1]].item() if k + 1 < len(idx) else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv, (adv + values) * mask


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_python_loop(seed, holes):
    g = torch.Generator().manual_seed(seed)
    mask = _random_mask(g, 6, 9, holes)
    rewards, values = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    gamma, lam = 0.5 + 0.5 * torch.rand(1, generator=g).item(), torch.rand(1, generator=g).item()
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_loop(rewards, values, mask, gamma, lam)
    assert_close(adv, ref_adv)
    assert_close(ret, ref_ret)


def test_gae_with_gamma_lambda_one_is_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mask = _random_mask(g, 4, 6, holes=False)
    rewards, values = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    reward_to_go = (rewards * mask).flip(-1).cumsum(-1).flip(-1) * mask  # sum_{s>=t} r_s
    assert_close(ret, reward_to_go)
    assert_close(adv, (reward_to_go - values) * mask)


def test_gae_estimator_whitens_advantages_not_returns():
    g = torch.Generator().manual_seed(1)
    mask = _random_mask(g, 5, 7, holes=False)
    rewards, values = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    batch = Batch({Keys.TOKEN_REWARDS: rewards, Keys.VALUES: values, Keys.RESPONSE_MASK: mask})
    adv, ret = compute_advantages(batch, AdvantageConfig(estimator="gae", gamma=0.9, lam=0.95))
    raw_adv, raw_ret = gae_advantages(rewards, values, mask, 0.9, 0.95)
    assert_close(ret, raw_ret)
    assert abs(masked_mean(adv, mask).item()) < 1e-6
    assert_close(masked_var(adv, mask), torch.tensor(1.0))
    assert (adv[mask == 0] == 0).all()
    unwhitened, _ = compute_advantages(
        batch, AdvantageConfig(estimator="gae", gamma=0.9, lam=0.95, whiten=False)
    )
    assert_close(unwhitened, raw_adv)


# ---- group estimators ----------------------------------------------------------------
def test_grpo_by_hand():
    # group 0: [1, 0, 2] mean 1, unbiased std sqrt((0 + 1 + 1) / 2) = 1
    # group 1: [4, 6]    mean 5, unbiased std sqrt((1 + 1) / 1) = sqrt(2)
    # group 2: [7]       size 1 -> 0
    eps = 1e-6
    expected = torch.tensor(
        [0.0, -1 / (1 + eps), 1 / (1 + eps), -1 / (math.sqrt(2) + eps), 1 / (math.sqrt(2) + eps), 0]
    )
    assert_close(grpo_scores(SCORES, GROUPS, norm_by_std=True, eps=eps), expected)
    # Dr. GRPO: no std division
    assert_close(
        grpo_scores(SCORES, GROUPS, norm_by_std=False, eps=eps), torch.tensor([0.0, -1, 1, -1, 1, 0])
    )


def test_group_of_identical_scores_gets_zero_advantage():
    out = grpo_scores(torch.tensor([3.0, 3.0, 3.0]), torch.tensor([0, 0, 0]), norm_by_std=True, eps=1e-6)
    assert (out == 0).all()


def _grpo_loop(scores, groups, norm_by_std, eps):
    out = torch.zeros_like(scores)
    for gid in groups.unique():
        members = (groups == gid).nonzero().flatten().tolist()
        vals = [scores[i].item() for i in members]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        for i in members:
            out[i] = (scores[i] - mean) / (std + eps) if norm_by_std else scores[i] - mean
    return out


def _random_groups(g: torch.Generator, n_groups: int) -> torch.Tensor:
    sizes = torch.randint(1, 6, (n_groups,), generator=g)
    return torch.repeat_interleave(torch.arange(n_groups), sizes)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_per_group_loop_and_has_zero_group_mean(seed, norm_by_std):
    g = torch.Generator().manual_seed(seed)
    groups = _random_groups(g, 7)
    scores = torch.randn(len(groups), generator=g)
    out = grpo_scores(scores, groups, norm_by_std, eps=1e-6)
    assert_close(out, _grpo_loop(scores, groups, norm_by_std, 1e-6))
    for gid in groups.unique():
        assert abs(out[groups == gid].mean().item()) < 1e-5


def test_rloo_by_hand_and_zero_sum():
    # group 0: 1 - (0+2)/2 = 0;  0 - (1+2)/2 = -1.5;  2 - (1+0)/2 = 1.5
    # group 1: 4 - 6 = -2;  6 - 4 = 2;   group 2 (size 1): 0
    assert_close(rloo_scores(SCORES, GROUPS), torch.tensor([0.0, -1.5, 1.5, -2.0, 2.0, 0.0]))
    g = torch.Generator().manual_seed(3)
    groups = _random_groups(g, 9)
    scores = torch.randn(len(groups), generator=g)
    out = rloo_scores(scores, groups)
    for gid in groups.unique():
        members = (groups == gid).nonzero().flatten().tolist()
        assert abs(out[members].sum().item()) < 1e-5
        for i in members:  # the definition, one sample at a time
            others = [scores[j].item() for j in members if j != i]
            expected = scores[i].item() - sum(others) / len(others) if others else 0.0
            assert abs(out[i].item() - expected) < 1e-5


def _sequence_batch(mask: torch.Tensor) -> Batch:
    return Batch({Keys.SCORES: SCORES, Keys.GROUP_IDS: GROUPS, Keys.RESPONSE_MASK: mask})


MASK6 = torch.tensor([[1.0, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]])


def test_grpo_estimator_broadcasts_over_valid_tokens():
    cfg = AdvantageConfig(estimator="grpo", norm_by_std=False)
    adv, ret = compute_advantages(_sequence_batch(MASK6), cfg)
    seq = torch.tensor([0.0, -1, 1, -1, 1, 0])
    assert_close(adv, seq[:, None] * MASK6)
    assert_close(ret, adv)


def test_remax_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    batch = Batch(
        {
            Keys.SCORES: torch.tensor([1.0, 0.5]),
            Keys.BASELINE_SCORES: torch.tensor([0.25, 1.0]),
            Keys.RESPONSE_MASK: mask,
        }
    )
    adv, _ = compute_advantages(batch, AdvantageConfig(estimator="remax"))
    assert_close(adv, torch.tensor([[0.75, 0.75, 0.0], [-0.5, -0.5, -0.5]]))


def test_reinforce_pp_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # gamma 0.5; row 0: G = [0.25, 0.5, 1];  row 1: G = [0.5 + 0.5*2, 2, -] = [1.5, 2, 0]
    ret_expected = torch.tensor([[0.25, 0.5, 1.0], [1.5, 2.0, 0.0]])
    assert_close(discounted_returns(rewards, mask, 0.5), ret_expected)
    # valid G: 0.25, 0.5, 1, 1.5, 2 -> mean 1.05; squared deviations sum 2.05 -> unbiased var 0.5125
    batch = Batch({Keys.TOKEN_REWARDS: rewards, Keys.RESPONSE_MASK: mask})
    adv, ret = compute_advantages(batch, AdvantageConfig(estimator="reinforce_pp", gamma=0.5))
    assert_close(ret, ret_expected)
    assert_close(adv, (ret_expected - 1.05) / math.sqrt(0.5125 + 1e-8) * mask)


def test_reinforce_pp_baseline_by_hand():
    # centered per group: [0, -1, 1, -1, 1, 0]; valid tokens (MASK6): 0, 0 | -1 | 1, 1, 1 | -1 | 1, 1 | 0
    # -> 10 tokens, sum 0+0-1+3-1+2+0 = 3, mean 0.3
    centered = torch.tensor([0.0, -1, 1, -1, 1, 0])[:, None] * MASK6
    valid = centered[MASK6 > 0]
    var = ((valid - 0.3) ** 2).sum() / 9
    adv, _ = compute_advantages(_sequence_batch(MASK6), AdvantageConfig(estimator="reinforce_pp_baseline"))
    assert_close(adv, (centered - 0.3) / torch.sqrt(var + 1e-8) * MASK6)


# ---- all estimators, registry ---------------------------------------------------------
def _full_batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    groups = _random_groups(g, 4)
    n = len(groups)
    mask = _random_mask(g, n, 6, holes=False)
    return Batch(
        {
            Keys.SCORES: torch.randn(n, generator=g),
            Keys.BASELINE_SCORES: torch.randn(n, generator=g),
            Keys.GROUP_IDS: groups,
            Keys.RESPONSE_MASK: mask,
            Keys.TOKEN_REWARDS: torch.randn(n, 6, generator=g),
            Keys.VALUES: torch.randn(n, 6, generator=g),
        }
    )


@pytest.mark.parametrize("name", ["gae", "grpo", "rloo", "remax", "reinforce_pp", "reinforce_pp_baseline"])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_estimator_is_exactly_zero_where_masked(name, seed):
    batch = _full_batch(seed)
    adv, ret = compute_advantages(batch, AdvantageConfig(estimator=name, gamma=0.9, lam=0.9))
    off = batch[Keys.RESPONSE_MASK] == 0
    assert adv.shape == ret.shape == off.shape
    assert (adv[off] == 0).all() and (ret[off] == 0).all()
    assert adv[~off].abs().sum() > 0
    assert set(get_estimator(name).needs) <= set(batch.keys())


def test_missing_key_names_its_provider():
    batch = Batch({Keys.TOKEN_REWARDS: torch.zeros(2, 3), Keys.RESPONSE_MASK: torch.ones(2, 3)})
    with pytest.raises(ValueError, match="'gae' needs 'values', which only a critic provides"):
        compute_advantages(batch, AdvantageConfig(estimator="gae"))
    with pytest.raises(ValueError, match="'baseline_scores'"):
        check_estimator_inputs("remax", [Keys.SCORES, Keys.RESPONSE_MASK])
    check_estimator_inputs("grpo", [Keys.SCORES, Keys.GROUP_IDS, Keys.RESPONSE_MASK])  # no error
    with pytest.raises(KeyError, match="unknown advantage estimator 'nope'.*grpo"):
        compute_advantages(batch, AdvantageConfig(estimator="nope"))


def test_scores_must_be_one_per_sequence():
    batch = Batch(
        {
            Keys.SCORES: torch.zeros(2, 1),
            Keys.GROUP_IDS: torch.zeros(2, dtype=torch.long),
            Keys.RESPONSE_MASK: torch.ones(2, 3),
        }
    )
    with pytest.raises(ValueError, match=r"must be \[B\]"):
        compute_advantages(batch, AdvantageConfig(estimator="grpo"))


def test_user_can_register_an_estimator():
    @register_estimator("test_constant", needs=(Keys.RESPONSE_MASK,))
    def constant(batch: Batch, cfg: AdvantageConfig) -> tuple[torch.Tensor, torch.Tensor]:
        adv = 2.0 * batch[Keys.RESPONSE_MASK]
        return adv, adv

    try:
        batch = Batch({Keys.RESPONSE_MASK: torch.tensor([[1.0, 0.0]])})
        adv, _ = compute_advantages(batch, AdvantageConfig(estimator="test_constant"))
        assert adv.tolist() == [[2.0, 0.0]]
        with pytest.raises(ValueError, match="already registered"):
            register_estimator("test_constant", needs=())(constant)
    finally:
        ESTIMATORS.remove("test_constant")


# ---- exact group statistics (DESIGN.md 4: tied groups give exactly 0) ----------------------
TIED_VALUES = [0.1, 0.7, 1 / 3, 0.3, 0.2, 0.9, 123.456]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", TIED_VALUES)
def test_tied_group_gets_exactly_zero_advantage_in_every_dtype(value, dtype):
    """A plain fp32 sum of n copies of 0.1 is off by a rounding step; divided by std + eps it
    became an advantage of one sign and size ~0.7 (n = 64). Every group size 2..64."""
    for n in range(2, 65):
        scores = torch.full((n,), value, dtype=dtype)  # [n]
        groups = torch.zeros(n, dtype=torch.long)
        for norm_by_std in (True, False):
            assert (grpo_scores(scores, groups, norm_by_std, eps=1e-6) == 0).all(), (n, norm_by_std)
        assert (rloo_scores(scores, groups) == 0).all(), n
        mean, std, size = group_stats(scores, groups)
        assert (mean == scores).all() and (std == 0).all() and (size == n).all(), n


@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_groups_next_to_untied_ones_and_every_group_estimator(dtype):
    """Many tied groups of different values and sizes in one batch, beside untied groups."""
    g = torch.Generator().manual_seed(0)
    values, sizes = [0.1, 0.7, 1 / 3, 0.3, 0.55], [64, 7, 3, 16, 2]
    tied = torch.cat([torch.full((n,), v) for v, n in zip(values, sizes)])  # [B_tied]
    scores = torch.cat([tied, torch.rand(8, generator=g)]).to(dtype)  # [B]
    groups = torch.cat([torch.repeat_interleave(torch.arange(5), torch.tensor(sizes)), torch.tensor([5] * 8)])
    is_tied = groups < 5
    out = grpo_scores(scores, groups, norm_by_std=True, eps=1e-6)
    assert (out[is_tied] == 0).all() and (out[~is_tied] != 0).any()
    assert (rloo_scores(scores, groups)[is_tied] == 0).all()
    # every estimator over a batch of only tied groups: exactly 0 everywhere
    mask = torch.ones(len(tied), 3)
    batch = Batch({Keys.SCORES: tied.to(dtype), Keys.GROUP_IDS: groups[is_tied], Keys.RESPONSE_MASK: mask})
    for name in ("grpo", "rloo", "reinforce_pp_baseline"):
        for norm_by_std in (True, False):
            adv, ret = compute_advantages(batch, AdvantageConfig(estimator=name, norm_by_std=norm_by_std))
            assert (adv == 0).all() and (ret == 0).all(), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", TIED_VALUES)
def test_whitening_a_constant_gives_exactly_zero(value, dtype):
    for n in (2, 7, 64, 1000):
        x = torch.full((2, n), value, dtype=dtype)  # [2, n]
        mask = torch.ones(2, n)
        mask[1, n // 2 :] = 0.0
        x[1, n // 2 :] = 5.0  # masked: other values must not matter
        white = masked_whiten(x, mask)
        assert (white[mask > 0] == 0).all(), n
        assert (masked_mean(x, mask) == x[0, 0]).all() and masked_var(x, mask) == 0
        assert (masked_whiten(x, mask, shift_mean=False)[mask > 0] == x[0, 0]).all()
    # REINFORCE++: equal returns on every valid token whiten to exactly 0
    rewards = torch.zeros(3, 4, dtype=dtype)
    rewards[:, 0] = value  # one valid token per row
    mask = torch.tensor([[1.0, 0, 0, 0]] * 3)
    batch = Batch({Keys.TOKEN_REWARDS: rewards, Keys.RESPONSE_MASK: mask})
    adv, _ = compute_advantages(batch, AdvantageConfig(estimator="reinforce_pp"))
    assert (adv == 0).all()


def _group_loop64(scores: torch.Tensor, groups: torch.Tensor) -> tuple[list[float], ...]:
    """Reference in Python floats (float64), exact sums (math.fsum): per-sample mean, std, size."""
    mean, std, size = [0.0] * len(scores), [0.0] * len(scores), [0.0] * len(scores)
    for gid in groups.unique().tolist():
        members = (groups == gid).nonzero().flatten().tolist()
        vals = [float(scores[i]) for i in members]
        mu = math.fsum(vals) / len(vals)
        sd = math.sqrt(math.fsum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        for i in members:
            mean[i], std[i], size[i] = mu, sd, float(len(vals))
    return mean, std, size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(5))
def test_group_estimators_match_a_float64_loop(seed, dtype):
    """Scores with a large offset and a small spread: an fp32 mean is off by many % of the spread."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 65, (6,), generator=g)
    groups = torch.repeat_interleave(torch.arange(6) * 3 + 1, sizes)  # any integer ids
    groups = groups[torch.randperm(len(groups), generator=g)]  # members not contiguous
    scores = (1000.0 + 1e-3 * torch.randn(len(groups), generator=g, dtype=torch.float64)).to(dtype)  # [B]
    mean, std, size = (torch.tensor(v, dtype=torch.float64) for v in _group_loop64(scores, groups))
    centered = scores.double() - mean  # [B], exact inputs, float64 arithmetic
    expected = {
        "grpo": centered / (std + 1e-6),
        "dr_grpo": centered,
        "rloo": centered * size / (size - 1).clamp(min=1),
    }
    got = {
        "grpo": grpo_scores(scores, groups, norm_by_std=True, eps=1e-6),
        "dr_grpo": grpo_scores(scores, groups, norm_by_std=False, eps=1e-6),
        "rloo": rloo_scores(scores, groups),
    }
    for name, out in got.items():
        assert out.dtype == dtype
        assert_close(out, expected[name].to(dtype), msg=name)
        for gid in groups.unique():
            assert abs(out[groups == gid].double().mean().item()) < 1e-6 * max(1.0, out.abs().max().item())
    stats = group_stats(scores, groups)
    for got_stat, want in zip(stats, (mean, std, size)):
        assert_close(got_stat, want.to(dtype))


@pytest.mark.parametrize("seed", range(5))
def test_masked_whiten_matches_a_float64_loop(seed):
    g = torch.Generator().manual_seed(seed)
    mask = _random_mask(g, 8, 50, holes=True)
    x = 1000.0 + 1e-3 * torch.randn(8, 50, generator=g)  # [B, R] float32
    vals = [float(v) for v in x[mask > 0]]
    mu = math.fsum(vals) / len(vals)
    var = math.fsum((v - mu) ** 2 for v in vals) / (len(vals) - 1)
    expected = (x.double() - mu) / math.sqrt(var + 1e-8)  # [B, R]
    white = masked_whiten(x, mask)
    assert_close(white[mask > 0], expected[mask > 0].float())
    assert abs(masked_mean(white, mask).item()) < 1e-5
    assert_close(masked_mean(x, mask), torch.tensor(mu, dtype=torch.float32))
    assert_close(masked_var(x, mask).double(), torch.tensor(var, dtype=torch.float64), rtol=1e-5, atol=0)


# ---- NaN / inf at masked positions never reach a valid one ------------------------------
def _poison(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with NaN, +inf and -inf (in turn) at its masked positions."""
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")])
    fill = bad[torch.arange(x.numel()) % 3].reshape(x.shape).to(x.dtype)
    return torch.where(mask > 0, x, fill)


@pytest.mark.parametrize("seed", range(3))
def test_gae_and_returns_ignore_nan_and_inf_at_masked_positions(seed):
    g = torch.Generator().manual_seed(seed)
    mask = _random_mask(g, 6, 9, holes=True)
    mask[2] = 0.0  # an empty response
    rewards, values = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    clean_adv, clean_ret = gae_advantages(rewards, values, mask, 0.9, 0.95)
    bad_values = _poison(values, mask).requires_grad_(True)
    adv, ret = gae_advantages(_poison(rewards, mask), bad_values, mask, 0.9, 0.95)
    assert_close(adv, clean_adv) and assert_close(ret, clean_ret)
    (adv.sum() + ret.sum()).backward()
    assert torch.isfinite(bad_values.grad).all() and (bad_values.grad[mask == 0] == 0).all()
    ret = discounted_returns(_poison(rewards, mask), mask, 0.9)
    assert_close(ret, discounted_returns(rewards, mask, 0.9))


@pytest.mark.parametrize("name", ["gae", "grpo", "rloo", "remax", "reinforce_pp", "reinforce_pp_baseline"])
def test_every_estimator_ignores_nan_and_inf_at_masked_positions(name):
    clean = _full_batch(0)
    mask = clean[Keys.RESPONSE_MASK]
    bad = Batch({k: clean[k] for k in clean.keys()})
    bad[Keys.TOKEN_REWARDS] = _poison(clean[Keys.TOKEN_REWARDS], mask)
    bad[Keys.VALUES] = _poison(clean[Keys.VALUES], mask)
    cfg = AdvantageConfig(estimator=name, gamma=0.9, lam=0.9)
    for got, want in zip(compute_advantages(bad, cfg), compute_advantages(clean, cfg)):
        assert torch.isfinite(got).all()
        assert_close(got, want)
