"""Pure RL algorithm functions: tensors in, tensors out; no Ray, no models, no globals.

advantages  estimators ``fn(batch, cfg) -> (advantages, returns)``, registered by name
losses      policy (ppo_clip, pg, gspo, cispo, sapo) / value / entropy / KL / SFT loss terms
            -> (loss [B, R], metrics)
aggregate   the one reduction of a [B, R] loss to a scalar, with global counts;
            how metrics combine over micro-batches and ranks (mean, or max/min by name)
kl          KL estimators and KL-coefficient controllers
rewards     sequence scores -> token rewards (with the KL penalty); DAPO's overlong penalty
importance  sampler vs trainer log-probs: mismatch metrics, TIS and sequence / token masking
masked      masked sum / mean / var / whiten, exact for ties and NaN-safe
distill     on-policy distillation: the teacher-minus-student log-prob advantage, its metrics
preference  the Bradley–Terry pairwise loss of reward-model training
registry    the estimator and policy-loss registries
"""

from .advantages import (
    broadcast_to_tokens,
    compute_advantages,
    discounted_returns,
    gae_advantages,
    group_stats,
    informative_groups,
    grpo_scores,
    rloo_scores,
)
from .aggregate import AGG_MODES, aggregate, loss_counts, metric_reduction, reduce_metric
from .config import (
    AdvantageConfig,
    DynamicSamplingConfig,
    KLControllerConfig,
    OverlongConfig,
    PolicyLossConfig,
)
from .distill import distill_advantages, distill_metrics
from .importance import (
    MISMATCH_MODES,
    expected_logprob_diff,
    mismatch_mode,
    mismatch_weights,
    rollout_mismatch,
    seq_mask_keep,
    tis_weights,
    token_mask_keep,
)
from .kl import KL_KINDS, AdaptiveKLController, FixedKLController, kl_penalty, make_kl_controller
from .losses import (
    cispo_loss,
    compute_policy_loss,
    entropy_from_logits,
    entropy_loss,
    gspo_loss,
    kl_loss,
    pg_loss,
    ppo_clip_loss,
    sapo_loss,
    sft_loss,
    value_loss,
)
from .masked import masked_mean, masked_sum, masked_var, masked_whiten, zero_invalid
from .preference import bradley_terry_loss, pair_accuracy
from .registry import (
    ESTIMATORS,
    KEY_PROVIDERS,
    POLICY_LOSSES,
    EstimatorSpec,
    check_estimator_inputs,
    get_estimator,
    get_policy_loss,
    register_estimator,
    register_policy_loss,
)
from .rewards import apply_kl_penalty, last_token_index, overlong_penalty, token_scores

__all__ = [
    "AGG_MODES",
    "ESTIMATORS",
    "KEY_PROVIDERS",
    "KL_KINDS",
    "MISMATCH_MODES",
    "POLICY_LOSSES",
    "AdaptiveKLController",
    "AdvantageConfig",
    "DynamicSamplingConfig",
    "EstimatorSpec",
    "FixedKLController",
    "KLControllerConfig",
    "OverlongConfig",
    "PolicyLossConfig",
    "aggregate",
    "apply_kl_penalty",
    "bradley_terry_loss",
    "broadcast_to_tokens",
    "check_estimator_inputs",
    "cispo_loss",
    "compute_advantages",
    "compute_policy_loss",
    "discounted_returns",
    "distill_advantages",
    "distill_metrics",
    "entropy_from_logits",
    "entropy_loss",
    "expected_logprob_diff",
    "gae_advantages",
    "get_estimator",
    "get_policy_loss",
    "group_stats",
    "informative_groups",
    "grpo_scores",
    "gspo_loss",
    "kl_loss",
    "kl_penalty",
    "last_token_index",
    "loss_counts",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "metric_reduction",
    "overlong_penalty",
    "mismatch_mode",
    "mismatch_weights",
    "pair_accuracy",
    "pg_loss",
    "ppo_clip_loss",
    "reduce_metric",
    "register_estimator",
    "register_policy_loss",
    "rloo_scores",
    "rollout_mismatch",
    "sapo_loss",
    "seq_mask_keep",
    "sft_loss",
    "tis_weights",
    "token_mask_keep",
    "token_scores",
    "value_loss",
    "zero_invalid",
]
