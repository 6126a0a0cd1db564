import math

import pytest
import torch
from torch.testing import assert_close

from flowrl.algos import (
    AdaptiveKLController,
    FixedKLController,
    KLControllerConfig,
    apply_kl_penalty,
    kl_penalty,
    make_kl_controller,
    token_scores,
)

LN2 = math.log(2.0)
# three tokens: pi = 0.5, ref = 0.25  |  pi = ref  |  pi = 0.25, ref = 0.5
LOGPROBS = torch.log(torch.tensor([[0.5, 0.3, 0.25]]))
REF = torch.log(torch.tensor([[0.25, 0.3, 0.5]]))


def test_kl_estimators_by_hand():
    # log r = ref - logp = [-ln2, 0, ln2]
    assert_close(kl_penalty(LOGPROBS, REF, "k1"), torch.tensor([[LN2, 0.0, -LN2]]))
    assert_close(kl_penalty(LOGPROBS, REF, "abs"), torch.tensor([[LN2, 0.0, LN2]]))
    assert_close(kl_penalty(LOGPROBS, REF, "k2"), torch.tensor([[0.5 * LN2**2, 0.0, 0.5 * LN2**2]]))
    # k3 = r - 1 - log r: r = 0.5 -> 0.5 - 1 + ln2;  r = 2 -> 2 - 1 - ln2
    k3 = torch.tensor([[LN2 - 0.5, 0.0, 1.0 - LN2]])
    assert_close(kl_penalty(LOGPROBS, REF, "k3"), k3)
    assert_close(kl_penalty(LOGPROBS, REF, "low_var_kl"), k3)
    assert_close(kl_penalty(LOGPROBS, REF, "mse"), kl_penalty(LOGPROBS, REF, "k2"))
    assert_close(kl_penalty(LOGPROBS, REF, "k3", clamp=0.25), torch.tensor([[LN2 - 0.5, 0.0, 0.25]]))
    with pytest.raises(ValueError, match="unknown kind 'k4'"):
        kl_penalty(LOGPROBS, REF, "k4")


def test_k3_is_nonnegative_and_finite_for_extreme_ratios():
    g = torch.Generator().manual_seed(0)
    lp, ref = -10 * torch.rand(50, 20, generator=g), -10 * torch.rand(50, 20, generator=g)
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    extreme = kl_penalty(torch.tensor([-200.0]), torch.tensor([0.0]), "k3")
    assert torch.isfinite(extreme).all()


def test_k1_and_k3_are_unbiased_and_k3_has_lower_variance():
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = (p * (p / q).log()).sum().item()  # KL(p || q)
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 400_000, replacement=True, generator=g)
    lp, ref = p.log()[x], q.log()[x]
    assert abs(kl_penalty(lp, ref, "k1").mean().item() - true_kl) < 0.01
    assert abs(kl_penalty(lp, ref, "k3").mean().item() - true_kl) < 0.01
    assert kl_penalty(lp, ref, "k3").std() < kl_penalty(lp, ref, "k1").std()  # the low-variance one


def test_token_scores_on_last_valid_token():
    mask = torch.tensor(
        [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]
    )
    out = token_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), mask)
    assert out.tolist() == [[0, 1, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0], [0, 0, 4, 0]]
    with pytest.raises(ValueError, match=r"scores must be \[B\]=4"):
        token_scores(torch.ones(4, 1), mask)


def test_apply_kl_penalty_by_hand():
    scores = torch.tensor([[0.0, 1.0, 0.0]])
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.2, -1.9, 4.0]])  # k1 = lp - ref = [0.2, -0.1, (masked)]
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, metrics = apply_kl_penalty(scores, lp, ref, mask, kl_coef=0.1, estimator="k1")
    assert_close(rewards, torch.tensor([[-0.02, 1.01, 0.0]]))
    assert_close(metrics["kl"], torch.tensor(0.05))  # (0.2 - 0.1) / 2 tokens
    assert_close(metrics["kl_seq"], torch.tensor(0.1))
    assert metrics["kl_coef"].item() == pytest.approx(0.1)


def test_adaptive_controller_moves_coef_towards_target():
    ctrl = AdaptiveKLController(init_kl_coef=0.1, target_kl=1.0, horizon=100)
    ctrl.update(current_kl=2.0, n_steps=10)  # error clip(2/1 - 1) = 0.2 -> x (1 + 0.2 * 10/100)
    assert ctrl.value == pytest.approx(0.1 * 1.02)
    ctrl.update(current_kl=0.5, n_steps=10)  # error -0.5 clipped to -0.2 -> x 0.98
    assert ctrl.value == pytest.approx(0.1 * 1.02 * 0.98)
    ctrl.update(current_kl=1.1, n_steps=10)  # error 0.1 -> x 1.01
    assert ctrl.value == pytest.approx(0.1 * 1.02 * 0.98 * 1.01)
    before = ctrl.value
    ctrl.update(current_kl=1.0, n_steps=10)  # on target: unchanged
    assert ctrl.value == before


def test_controllers_checkpoint_round_trip():
    ctrl = AdaptiveKLController(0.1, target_kl=1.0, horizon=100)
    for kl in (3.0, 2.0, 1.5):
        ctrl.update(kl, n_steps=8)
    resumed = AdaptiveKLController(0.1, target_kl=1.0, horizon=100)
    resumed.load_state_dict(ctrl.state_dict())
    assert resumed.value == ctrl.value
    ctrl.update(0.3, 8)
    resumed.update(0.3, 8)
    assert resumed.value == ctrl.value
    fixed = FixedKLController(0.05)
    fixed.update(10.0, 100)
    assert fixed.value == 0.05 and fixed.state_dict() == {"value": 0.05}


def test_make_kl_controller():
    assert isinstance(make_kl_controller(KLControllerConfig(kind="adaptive")), AdaptiveKLController)
    assert make_kl_controller(KLControllerConfig(kind="fixed", kl_coef=0.2)).value == 0.2
    with pytest.raises(ValueError, match="kl_ctrl.kind='pid'"):
        make_kl_controller(KLControllerConfig(kind="pid"))
    with pytest.raises(ValueError, match="must be > 0"):
        AdaptiveKLController(0.1, target_kl=0.0, horizon=10)
