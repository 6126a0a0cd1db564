"""Steps that several RL drivers share: rollout, scoring, rewards with KL, the step's metrics.

Each is a small function over the runtime and a Batch; algorithm-specific steps stay in
their driver (ReMax's greedy baseline lives in ``flowrl/drivers/remax.py``).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from flowrl.algos import apply_kl_penalty, make_kl_controller, masked_mean, rollout_mismatch, token_scores
from flowrl.algos.importance import expected_logprob_diff, mismatch_mode, mismatch_weights
from flowrl.algos.kl import FixedKLController
from flowrl.batch import Batch
from flowrl.engines.memory import max_over_ranks
from flowrl.keys import Keys
from flowrl.rewards import reward_metrics
from flowrl.trainer.faults import TrainingDiverged
from flowrl.trainer.runtime import Runtime
from flowrl.trainer.tracking import Timer, mean_metrics

Metrics = dict[str, float]


def collect(rt: Runtime, timer: Timer, n: int) -> tuple[Batch, Metrics]:
    """The first half of every step: sample, score, and the log-probs the losses need.

    Returns a batch with the responses, ``SCORES``, ``OLD_LOGPROBS`` (+ ``REF_LOGPROBS``
    with a reference, ``VALUES`` with a critic) and the reward metrics. Every rollout comes
    right after a weight sync, so its sampler-vs-trainer mismatch is checked here
    (``check_rollout_mismatch``: a stale or corrupt rollout engine stops the run).
    """
    with timer("generate"):
        batch = rollout(rt, rt.next_prompts(), n=n)
    with timer("reward"):
        batch, metrics = score(rt, batch)
    with timer("old_logprobs"):
        batch = batch | rt.actor.compute_logprobs(batch)
    metrics |= check_rollout_mismatch(rt.cfg, rt.step, batch)
    if rt.ref is not None:
        with timer("ref"):
            batch = batch | rt.ref.compute_ref_logprobs(batch)
    if rt.critic is not None:
        with timer("values"):
            batch = batch | rt.critic.compute_values(batch)
    return batch, metrics


class RolloutWeightsMismatch(TrainingDiverged):
    """The rollout engine's log-probs are far from the trainer's right after a weight sync:
    its weights are stale or corrupt. ``flowrl train`` reports it as a diverged run (exit 1)."""


def check_rollout_mismatch(cfg: DictConfig, step: int, batch: Batch) -> Metrics:
    """Stop the run when mean |old_logprobs - rollout_logprobs| over valid tokens exceeds
    ``actor.policy_loss.max_logprob_diff`` (null: ``expected_logprob_diff`` of the dtypes);
    else the whole batch's figures of the configured correction (``rollout/masked_token_frac``, ...).

    A batch without ``ROLLOUT_LOGPROBS`` (a backend that gives none) is not checked.
    """
    if Keys.ROLLOUT_LOGPROBS not in batch:
        return {}
    mask, old, rollout_lp = batch[Keys.RESPONSE_MASK], batch[Keys.OLD_LOGPROBS], batch[Keys.ROLLOUT_LOGPROBS]
    diff = float(rollout_mismatch(old, rollout_lp, mask)["rollout_logprob_diff_mean"])
    pl = cfg.actor.policy_loss
    band = pl.max_logprob_diff
    if band is None:
        r = cfg.rollout
        band = expected_logprob_diff(r.dtype, cfg.actor.model.dtype, r.top_p, r.top_k)
    if not diff <= band:  # NaN fails too
        raise RolloutWeightsMismatch(
            f"step {step}: the rollout after the weight sync has mean |old_logprobs - rollout_logprobs| = "
            f"{diff:.4g} per token, above the expected {band:g} (actor.policy_loss.max_logprob_diff; "
            f"rollout.dtype={cfg.rollout.dtype}, actor.model.dtype={cfg.actor.model.dtype}): the rollout "
            "engine's weights are stale or corrupt (a failed weight sync, mismatched tokenizer or sampling "
            "settings); stopping"
        )
    if mismatch_mode(pl) == "none":
        return {}
    _, correction = mismatch_weights(old, rollout_lp, mask, pl)
    keep = ("rollout_masked_token_frac", "rollout_masked_seq_frac", "tis_truncated_frac")
    return {f"rollout/{k.removeprefix('rollout_')}": float(v) for k, v in correction.items() if k in keep}


def learn(rt: Runtime, timer: Timer, batch: Batch, metrics: Metrics) -> Metrics:
    """The second half: critic and actor updates, the weight sync, and the step's metrics."""
    if rt.critic is not None:
        with timer("critic_update"):
            metrics |= update_metrics(rt.critic.update(batch))
    with timer("update"):
        metrics |= update_metrics(rt.actor.update(batch))
    with timer("weight_sync"):
        metrics |= sync_metrics(rt.actor.sync_weights())
    if rt.cfg.trainer.use_gpu:
        metrics |= max_over_ranks(rt.actor.memory_stats())  # memory/<stage>_peak_gib, _used_gib
    metrics |= rollout_metrics(batch)
    metrics |= timer.metrics()
    tokens = float(batch[Keys.RESPONSE_MASK].sum() + batch[Keys.PROMPT_MASK].sum())
    metrics["perf/tokens_per_s"] = tokens / metrics["timing/step"]
    return metrics






def rollout(rt: Runtime, prompts: Batch, n: int, temperature: float | None = None) -> Batch:
    """``n`` responses per prompt; samples of one prompt share a contiguous ``GROUP_IDS`` value."""
    prompts = prompts.clone()
    prompts[Keys.GROUP_IDS] = torch.arange(len(prompts))  # [B]
    if rt.cfg.rollout.seed_per_prompt:
        prompts[Keys.SAMPLE_SEEDS] = rt.rollout_seeds(len(prompts))  # [B]
    return rt.actor.generate(prompts, n=n, temperature=temperature)


def score(rt: Runtime, batch: Batch) -> tuple[Batch, Metrics]:
    """Sequence rewards into ``SCORES``: the reward model's when the run has one, else the rule
    functions' (a failing reward function scores 0 and is counted). Same ``reward/...`` keys."""
    if rt.rm is not None:
        scores = rt.rm.compute_scores(batch)[Keys.SCORES]  # [B]
        return batch | Batch({Keys.SCORES: scores}), model_reward_metrics(batch, scores)
    scored = rt.rewards.score(batch)
    return batch | scored, reward_metrics(scored)


def kl_controller(cfg: DictConfig) -> FixedKLController | None:
    """The in-reward KL coefficient's controller, or None when ``algorithm.use_kl_in_reward`` is off."""
    if not cfg.algorithm.use_kl_in_reward:
        return None
    return make_kl_controller(cfg.algorithm.kl_ctrl)


def model_reward_metrics(batch: Batch, scores: torch.Tensor) -> Metrics:
    """The rule runner's ``reward/...`` metrics for reward-model scores [B] (a model call never fails)."""
    as_rule = Batch({Keys.SCORES: scores, Keys.REWARD_STATUS: torch.zeros(len(batch), dtype=torch.int64)})
    as_rule[Keys.REWARD_EXTRA] = [{} for _ in range(len(batch))]
    if Keys.DATA_SOURCE in batch:
        as_rule[Keys.DATA_SOURCE] = list(batch[Keys.DATA_SOURCE])
    return reward_metrics(as_rule)


def token_rewards(batch: Batch, kl_ctrl: FixedKLController | None, kl_estimator: str) -> tuple[torch.Tensor, Metrics]:
    """The score on each response's last token, minus ``beta * KL`` per token when ``kl_ctrl`` is given."""
    mask = batch[Keys.RESPONSE_MASK]  # [B, R]
    scores = token_scores(batch[Keys.SCORES], mask)  # [B, R]
    if kl_ctrl is None:
        return scores, {}
    rewards, kl = apply_kl_penalty(
        scores, batch[Keys.OLD_LOGPROBS], batch[Keys.REF_LOGPROBS], mask, kl_ctrl.value, kl_estimator
    )
    kl_ctrl.update(float(kl["kl"]), n_steps=len(batch))
    return rewards, {f"kl_reward/{k}": float(v) for k, v in kl.items()}


def rollout_metrics(batch: Batch) -> Metrics:
    """Reward, length and sampler-vs-trainer agreement of one rollout batch."""
    mask = batch[Keys.RESPONSE_MASK]  # [B, R]
    lengths = mask.sum(-1)  # [B]
    scores = batch[Keys.SCORES]  # [B]
    metrics = {
        "reward/mean": scores.mean(),
        "reward/min": scores.min(),
        "reward/max": scores.max(),
        "response_length/mean": lengths.mean(),
        "response_length/max": lengths.max(),
        "response_length/clip_ratio": batch[Keys.TRUNCATED].float().mean(),
    }
    if Keys.ADVANTAGES in batch:
        metrics["advantages/mean"] = masked_mean(batch[Keys.ADVANTAGES], mask)
    if Keys.RETURNS in batch:
        metrics["returns/mean"] = masked_mean(batch[Keys.RETURNS], mask)
    if Keys.VALUES in batch:
        metrics["values/mean"] = masked_mean(batch[Keys.VALUES], mask)
    if Keys.ENTROPY in batch:
        metrics["actor/entropy"] = masked_mean(batch[Keys.ENTROPY], mask)
    if Keys.OLD_LOGPROBS in batch and Keys.ROLLOUT_LOGPROBS in batch:
        # rollout/logprob_diff_mean, _max, prob_ratio_err: masked positions never count
        mismatch = rollout_mismatch(batch[Keys.OLD_LOGPROBS], batch[Keys.ROLLOUT_LOGPROBS], mask)
        metrics |= {f"rollout/{k.removeprefix('rollout_')}": v for k, v in mismatch.items()}
    if Keys.REF_LOGPROBS in batch and Keys.OLD_LOGPROBS in batch:
        metrics["kl_ref/k1"] = masked_mean(batch[Keys.OLD_LOGPROBS] - batch[Keys.REF_LOGPROBS], mask)
    return {k: float(v) for k, v in metrics.items()}


def update_metrics(per_rank: list[list[Metrics]]) -> Metrics:
    """Mean over ranks and mini-batch steps of what ``update`` returned (max of a ``*_max``
    metric, min of a ``*_min`` one: ``mean_metrics``).

    ``actor/first_ppo_kl`` and ``actor/first_clipfrac`` are those of the first mini-batch
    only: it starts at the rollout policy, so both must be exactly 0 (step-0 consistency).
    """
    metrics = mean_metrics(m for rank in per_rank for m in rank)
    first = mean_metrics(rank[0] for rank in per_rank)
    for key in ("actor/ppo_kl", "actor/clipfrac"):
        if key in first:
            metrics[key.replace("actor/", "actor/first_")] = first[key]
    return metrics


def sync_metrics(per_rank: list[Metrics]) -> Metrics:
    seconds = max(m["seconds"] for m in per_rank)
    gb = sum(m["bytes"] for m in per_rank) / 1e9
    return {"perf/weight_sync_s": seconds, "perf/weight_sync_gb_per_s": gb / max(seconds, 1e-9)}

