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
    grpo_scores,
    masked_mean,
    masked_var,
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
