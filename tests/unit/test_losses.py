import math

import pytest
import torch
from torch.testing import assert_close

from flowrl.algos import (
    AGG_MODES,
    POLICY_LOSSES,
    PolicyLossConfig,
    aggregate,
    apply_kl_penalty,
    compute_policy_loss,
    entropy_from_logits,
    entropy_loss,
    kl_loss,
    pg_loss,
    ppo_clip_loss,
    register_policy_loss,
    rollout_mismatch,
    sft_loss,
    tis_weights,
    value_loss,
)

# (advantage, ratio) per token; the last token is masked out
ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 2.0]])
RATIO = torch.tensor([[1.5, 0.5, 0.5, 1.5, 5.0, 3.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
OLD = torch.zeros(1, 6)


def test_ppo_clip_by_hand():
    loss, m = ppo_clip_loss(RATIO.log(), OLD, ADV, MASK, clip_low=0.2, clip_high=0.2)
    # A=1,r=1.5: max(-1.5, -1.2) = -1.2 (clipped high) | A=1,r=0.5: max(-0.5, -0.8) = -0.5
    # A=-1,r=0.5: max(0.5, 0.8) = 0.8 (clipped low)    | A=-1,r=1.5: max(1.5, 1.2) = 1.5
    # A=-1,r=5:   max(5, 1.2) = 5                      | masked: 0
    assert_close(loss, torch.tensor([[-1.2, -0.5, 0.8, 1.5, 5.0, 0.0]]))
    assert_close(m["clipfrac"], torch.tensor(2 / 5))
    assert_close(m["clipfrac_high"], torch.tensor(1 / 5))
    assert_close(m["clipfrac_low"], torch.tensor(1 / 5))
    assert m["dual_clipfrac"].item() == 0.0
    # ppo_kl = mean(old - new) = -mean(log r) over the 5 valid tokens
    expected_kl = -(math.log(1.5) + math.log(0.5) + math.log(0.5) + math.log(1.5) + math.log(5.0)) / 5
    assert_close(m["ppo_kl"], torch.tensor(expected_kl))
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_dual_clip_caps_negative_advantage_loss_and_its_gradient():
    logprobs = RATIO.log().requires_grad_(True)
    loss, m = ppo_clip_loss(logprobs, OLD, ADV, MASK, 0.2, 0.2, dual_clip_c=3.0)
    # only A=-1, r=5 exceeds c * |A| = 3; it becomes 3
    assert_close(loss, torch.tensor([[-1.2, -0.5, 0.8, 1.5, 3.0, 0.0]]))
    assert_close(m["dual_clipfrac"], torch.tensor(1 / 5))
    loss.sum().backward()
    # d/dlogp of -A*exp(logp) is -A*r: 0 where clipped (tokens 0, 2, 4 and the masked one)
    assert_close(logprobs.grad, torch.tensor([[0.0, -0.5, 0.0, 1.5, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="dual_clip_c=1.0 must be > 1"):
        ppo_clip_loss(RATIO.log(), OLD, ADV, MASK, dual_clip_c=1.0)


def test_dual_clip_never_touches_positive_advantages():
    adv, ratio = torch.tensor([[3.0]]), torch.tensor([[0.01]])
    plain, _ = ppo_clip_loss(ratio.log(), torch.zeros(1, 1), adv, torch.ones(1, 1))
    dual, m = ppo_clip_loss(ratio.log(), torch.zeros(1, 1), adv, torch.ones(1, 1), dual_clip_c=3.0)
    assert_close(dual, plain)
    assert m["dual_clipfrac"].item() == 0.0


def test_clip_higher_is_asymmetric():
    one = torch.ones(1, 1)
    # A > 0, r = 1.25: clipped at 1.2 with clip_high=0.2, free with clip_high=0.28
    lp = torch.tensor([[math.log(1.25)]], requires_grad=True)
    sym, m_sym = ppo_clip_loss(lp, torch.zeros(1, 1), one, one, clip_low=0.2, clip_high=0.2)
    high, m_high = ppo_clip_loss(lp, torch.zeros(1, 1), one, one, clip_low=0.2, clip_high=0.28)
    assert_close(sym, torch.tensor([[-1.2]]))
    assert_close(high, torch.tensor([[-1.25]]))
    assert (m_sym["clipfrac"].item(), m_high["clipfrac"].item()) == (1.0, 0.0)
    (grad_high,) = torch.autograd.grad(high.sum(), lp)
    assert_close(grad_high, torch.tensor([[-1.25]]))
    # A < 0, r = 0.75: the lower bound 1 - clip_low = 0.8 applies either way
    lp_low = torch.tensor([[math.log(0.75)]])
    low, m_low = ppo_clip_loss(lp_low, torch.zeros(1, 1), -one, one, clip_low=0.2, clip_high=0.28)
    assert_close(low, torch.tensor([[0.8]]))
    assert m_low["clipfrac_low"].item() == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_step0_ppo_kl_and_clipfrac_are_exactly_zero(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 9, 11, generator=g)
    tokens = torch.randint(0, 11, (4, 9), generator=g)
    old = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)  # [B, R]
    new = torch.log_softmax(logits.clone(), -1).gather(-1, tokens[..., None]).squeeze(-1)  # recomputed
    adv = 10 * torch.randn(4, 9, generator=g)
    mask = (torch.rand(4, 9, generator=g) > 0.2).float()
    loss, m = ppo_clip_loss(new, old, adv, mask, 0.2, 0.28, dual_clip_c=3.0)
    assert m["ppo_kl"].item() == 0.0
    assert m["clipfrac"].item() == 0.0
    assert m["dual_clipfrac"].item() == 0.0
    assert torch.equal(loss, -adv * mask)


def test_pg_loss_by_hand():
    loss, m = pg_loss(
        torch.tensor([[0.0, math.log(2.0)]]), torch.zeros(1, 2), torch.tensor([[2.0, -1.0]]), torch.ones(1, 2)
    )
    assert_close(loss, torch.tensor([[-2.0, 2.0]]))  # -A * r with r = [1, 2]
    assert_close(m["ppo_kl"], torch.tensor(-math.log(2.0) / 2))


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 0.0, 5.0]])
    old = torch.tensor([[0.5, 2.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 3.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, m = value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: (1-2)^2 = 1;  clipped V = 0.5 + 0.2 = 0.7 -> (0.7-2)^2 = 1.69 -> 0.5 * 1.69 (clipped)
    # token 1: V = old -> both (2-1)^2 = 1 -> 0.5
    # token 2: (0-3)^2 = 9;  clipped V = 1 - 0.2 = 0.8 -> (0.8-3)^2 = 4.84 -> 0.5 * 9
    assert_close(loss, torch.tensor([[0.845, 0.5, 4.5, 0.0]]))
    assert_close(m["vf_clipfrac"], torch.tensor(1 / 3))
    # G - V = [1, -1, 3]: unbiased var 4;  G = [2, 1, 3]: unbiased var 1  -> 1 - 4/1
    assert_close(m["explained_var"], torch.tensor(-3.0))
    assert_close(m["vpred"], torch.tensor(1.0))
    unclipped, m2 = value_loss(values, old, returns, mask, clip_range=None)
    assert_close(unclipped, torch.tensor([[0.5, 0.5, 4.5, 0.0]]))
    assert m2["vf_clipfrac"].item() == 0.0


def test_entropy():
    uniform = torch.zeros(2, 3, 4)
    assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(4.0)))
    two = torch.log(torch.tensor([0.25, 0.75]))
    assert_close(entropy_from_logits(two), torch.tensor(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))))
    logits = torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(0))
    assert_close(entropy_from_logits(logits), torch.distributions.Categorical(logits=logits).entropy())
    ent = torch.tensor([[1.0, 2.0, 7.0]])
    loss, m = entropy_loss(ent, torch.tensor([[1.0, 1.0, 0.0]]))
    assert_close(loss, torch.tensor([[-1.0, -2.0, 0.0]]))
    assert_close(m["entropy"], torch.tensor(1.5))


def test_kl_loss_k3_by_hand():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.1]]))
    loss, m = kl_loss(lp, ref, torch.tensor([[1.0, 1.0, 0.0]]), kind="k3")
    # r = ref/pi = 0.5 -> 0.5 - 1 + ln 2;  r = 2 -> 2 - 1 - ln 2;  masked -> 0
    ln2 = math.log(2.0)
    assert_close(loss, torch.tensor([[ln2 - 0.5, 1.0 - ln2, 0.0]]))
    assert_close(m["kl_loss"], torch.tensor(0.25))  # (ln2 - 0.5 + 1 - ln2) / 2 tokens


def test_tis_weights_by_hand():
    old = torch.zeros(1, 3, requires_grad=True)
    rollout = torch.tensor([[0.0, math.log(2.0), -math.log(4.0)]])
    w = tis_weights(old, rollout, cap=2.0)
    assert_close(w, torch.tensor([[1.0, 0.5, 2.0]]))  # min(exp(old - rollout), 2)
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap=0"):
        tis_weights(old, rollout, cap=0)


def test_rollout_mismatch_by_hand():
    old = torch.zeros(1, 4)
    rollout = torch.tensor([[0.1, -0.2, 0.0, -float("inf")]])  # last: padding garbage
    m = rollout_mismatch(old, rollout, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # delta = old - rollout = [-0.1, 0.2, 0]
    assert_close(m["rollout_logprob_diff_mean"], torch.tensor(0.3 / 3))
    assert_close(m["rollout_logprob_diff_max"], torch.tensor(0.2))
    ratio_err = (abs(math.exp(-0.1) - 1) + abs(math.exp(0.2) - 1)) / 3
    assert_close(m["rollout_prob_ratio_err"], torch.tensor(ratio_err))


def test_compute_policy_loss_with_tis_and_mismatch_metrics():
    rollout = OLD + torch.tensor([[0.0, math.log(2.0), -math.log(4.0), 0.0, 0.0, 0.0]])
    cfg = PolicyLossConfig(name="ppo_clip", tis_cap=2.0)
    loss, m = compute_policy_loss(RATIO.log(), OLD, ADV, MASK, cfg, rollout_logprobs=rollout)
    plain, _ = ppo_clip_loss(RATIO.log(), OLD, ADV, MASK)
    assert_close(loss, plain * torch.tensor([[1.0, 0.5, 2.0, 1.0, 1.0, 1.0]]))
    assert_close(m["tis_weight"], torch.tensor((1 + 0.5 + 2 + 1 + 1) / 5))
    assert "rollout_logprob_diff_mean" in m and "clipfrac" in m
    with pytest.raises(ValueError, match="no rollout_logprobs"):
        compute_policy_loss(RATIO.log(), OLD, ADV, MASK, cfg)
    no_tis, m2 = compute_policy_loss(
        RATIO.log(), OLD, ADV, MASK, PolicyLossConfig(), rollout_logprobs=rollout
    )
    assert_close(no_tis, plain)
    assert "tis_weight" not in m2 and "rollout_prob_ratio_err" in m2


def test_policy_loss_registry():
    assert {"ppo_clip", "pg"} <= set(POLICY_LOSSES.names())

    @register_policy_loss("test_neg_logp")
    def neg_logp(logprobs, old_logprobs, advantages, mask, cfg):
        return -advantages * logprobs * mask, {}

    try:
        loss, _ = compute_policy_loss(
            torch.tensor([[-1.0, -2.0]]),
            torch.zeros(1, 2),
            torch.tensor([[1.0, 3.0]]),
            torch.tensor([[1.0, 0.0]]),
            PolicyLossConfig(name="test_neg_logp"),
        )
        assert loss.tolist() == [[1.0, 0.0]]
        with pytest.raises(ValueError, match="already registered"):
            register_policy_loss("test_neg_logp")(neg_logp)
    finally:
        POLICY_LOSSES.remove("test_neg_logp")
    with pytest.raises(KeyError, match="unknown policy loss 'test_neg_logp'"):
        compute_policy_loss(OLD, OLD, ADV, MASK, PolicyLossConfig(name="test_neg_logp"))


# ---- NaN / inf at masked positions reach neither the loss nor the gradient ---------------
def _loss_inputs(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 8, (5,), generator=g)
    lengths[1] = 0  # an empty response
    mask = (torch.arange(7)[None, :] < lengths[:, None]).float()  # [5, 7]
    mask[0, 1] = 0.0  # a hole (e.g. a tool observation)

    def rand(scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(5, 7, generator=g)

    old = -torch.rand(5, 7, generator=g) * 3  # [5, 7]
    inputs = {
        "logprobs": old + rand(0.3),
        "old_logprobs": old,
        "ref_logprobs": old + rand(0.3),
        "rollout_logprobs": old + rand(0.3),
        "advantages": rand(),
        "values": rand(),
        "old_values": rand(),
        "returns": rand(),
        "entropy": torch.rand(5, 7, generator=g) * 2,
        "token_scores": rand(),
    }
    return inputs, mask


def _poisoned(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with NaN, +inf and -inf (in turn) wherever the mask is 0."""
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")])
    return torch.where(mask > 0, x, bad[torch.arange(x.numel()) % 3].reshape(x.shape))


LOSS_CASES = {
    "ppo_clip": lambda d, m: ppo_clip_loss(
        d["logprobs"], d["old_logprobs"], d["advantages"], m, 0.2, 0.28, dual_clip_c=3.0
    ),
    "pg": lambda d, m: pg_loss(d["logprobs"], d["old_logprobs"], d["advantages"], m),
    "policy_tis": lambda d, m: compute_policy_loss(
        d["logprobs"], d["old_logprobs"], d["advantages"], m, PolicyLossConfig(tis_cap=2.0),
        d["rollout_logprobs"],
    ),
    "value_clip": lambda d, m: value_loss(d["values"], d["old_values"], d["returns"], m, 0.2),
    "value": lambda d, m: value_loss(d["values"], d["old_values"], d["returns"], m, None),
    "entropy": lambda d, m: entropy_loss(d["entropy"], m),
    "kl_k1": lambda d, m: kl_loss(d["logprobs"], d["ref_logprobs"], m, "k1"),
    "kl_k2": lambda d, m: kl_loss(d["logprobs"], d["ref_logprobs"], m, "k2"),
    "kl_k3": lambda d, m: kl_loss(d["logprobs"], d["ref_logprobs"], m, "k3"),
    "sft": lambda d, m: sft_loss(d["logprobs"], m),
    "kl_reward": lambda d, m: apply_kl_penalty(
        d["token_scores"], d["logprobs"], d["ref_logprobs"], m, kl_coef=0.1, estimator="k3"
    ),
}
GRAD_INPUTS = ("logprobs", "values", "entropy", "advantages", "token_scores")


def _run_loss(name: str, inputs: dict[str, torch.Tensor], mask: torch.Tensor):
    leaves = {k: v.clone().requires_grad_(k in GRAD_INPUTS) for k, v in inputs.items()}
    loss, metrics = LOSS_CASES[name](leaves, mask)
    total = sum(aggregate(loss, mask, mode) for mode in AGG_MODES)
    total.backward()
    grads = {k: leaves[k].grad for k in GRAD_INPUTS if leaves[k].grad is not None}
    return loss.detach(), {k: torch.as_tensor(v) for k, v in metrics.items()}, total.detach(), grads


@pytest.mark.parametrize("name", LOSS_CASES)
@pytest.mark.parametrize("seed", range(3))
def test_nan_and_inf_at_masked_positions_change_nothing(name, seed):
    """Every input holds NaN / inf where masked: losses, metrics, aggregates and gradients
    equal the clean inputs' and are finite (``x * mask`` would give NaN * 0 = NaN)."""
    clean, mask = _loss_inputs(seed)
    poisoned = {k: _poisoned(v, mask) for k, v in clean.items()}
    want, got = _run_loss(name, clean, mask), _run_loss(name, poisoned, mask)
    assert torch.isfinite(got[0]).all() and (got[0][mask == 0] == 0).all()
    assert_close(got[0], want[0])
    assert got[1].keys() == want[1].keys()
    for key in want[1]:
        assert torch.isfinite(got[1][key]).all(), key
        assert_close(got[1][key], want[1][key], msg=key)
    assert torch.isfinite(got[2]) and abs(got[2].item() - want[2].item()) <= 1e-6
    assert got[3].keys() == want[3].keys() and got[3]
    for key, grad in got[3].items():
        assert torch.isfinite(grad).all(), key
        assert (grad[mask == 0] == 0).all(), key
        assert_close(grad, want[3][key], msg=key)
