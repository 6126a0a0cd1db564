"""Per-token KL estimators between the policy and the reference, and KL-coefficient controllers.

With tokens sampled from the policy pi and log r = log ref(x) - log pi(x), the estimators of
KL(pi || ref) (Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html):

    k1  = -log r                    unbiased, high variance, can be negative
    k2  = 0.5 (log r)^2             ("mse") biased, low variance, >= 0
    k3  = (r - 1) - log r           ("low_var_kl") unbiased, low variance, >= 0
    abs = |log r|
"""

from __future__ import annotations

import torch

from .config import KLControllerConfig

KL_KINDS = ("k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs")
_LOG_RATIO_LIMIT = 20.0  # keeps exp(log r) finite in k3


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1", clamp: float | None = None
) -> torch.Tensor:
    """Per-token KL estimate [B, R] (see the module docstring for each ``kind``).

    ``clamp`` bounds k3 from above (k3 grows like exp(log r) for tokens the reference
    finds far likelier); k3 also clips log r to +-20 so it stays finite.
    """
    log_ratio = ref_logprobs - logprobs  # [B, R]  log r
    if kind in ("k1", "kl"):
        return -log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind in ("k2", "mse"):
        return 0.5 * log_ratio**2
    if kind in ("k3", "low_var_kl"):
        log_ratio = log_ratio.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
        k3 = torch.exp(log_ratio) - log_ratio - 1.0  # [B, R] >= 0
        return k3 if clamp is None else k3.clamp(max=clamp)
    raise ValueError(f"kl_penalty: unknown kind {kind!r}; choose one of {KL_KINDS}")


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller of beta towards a target KL (Ziegler et al. 2019, arXiv:1909.08593).

        e_t     = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    ``current_kl`` is in the unit of ``target_kl`` (e.g. the batch's mean per-token KL);
    ``n_steps`` is how many samples the KL was measured on.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int) -> None:
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target_kl={target_kl} and horizon={horizon} must be > 0")
        super().__init__(init_kl_coef)
        self.target_kl, self.horizon = float(target_kl), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(cfg: KLControllerConfig) -> FixedKLController:
    if cfg.kind == "fixed":
        return FixedKLController(cfg.kl_coef)
    if cfg.kind == "adaptive":
        return AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.horizon)
    raise ValueError(f"kl_ctrl.kind={cfg.kind!r} is unknown; use 'fixed' or 'adaptive'")
