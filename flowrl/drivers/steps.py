"""Steps that several RL drivers share: rollout, scoring, rewards with KL, the step's metrics.

Each is a small function over the runtime and a Batch; algorithm-specific steps stay in
their driver (ReMax's greedy baseline lives in ``flowrl/drivers/remax.py``).
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from flowrl.algos import (
    apply_kl_penalty,
    make_kl_controller,
    masked_mean,
    overlong_penalty,
    rollout_mismatch,
    token_scores,
)
from flowrl.algos.importance import expected_logprob_diff, mismatch_mode, mismatch_weights
from flowrl.algos.kl import FixedKLController
from flowrl.batch import Batch
from flowrl.drivers.sampling import fill_informative, short_step_note
from flowrl.engines.memory import max_over_ranks
from flowrl.keys import Keys
from flowrl.rewards import reward_metrics
from flowrl.trainer.faults import TrainingDiverged
from flowrl.trainer.placement import announce
from flowrl.trainer.runtime import Runtime
from flowrl.trainer.split_rollout import step_seeds
from flowrl.trainer.tracking import Timer, mean_metrics
from flowrl.workers.actor_rollout import old_logprobs_from_update
from flowrl.workers.agent_loop import agent_metrics

Metrics = dict[str, float]


def collect(rt: Runtime, timer: Timer, n: int) -> tuple[Batch, Metrics]:
    """The first half of every step: sample, score, and the log-probs the losses need.

    Returns a batch with the responses, ``SCORES``, ``OLD_LOGPROBS`` (+ ``REF_LOGPROBS``
    with a reference, ``VALUES`` with a critic) and the reward metrics. With
    ``algorithm.dynamic_sampling`` the batch holds only groups whose scores vary (``sample``),
    so the actor's token count, the loss's normaliser, is that of those groups. Every rollout comes
    right after a weight sync, so its sampler-vs-trainer mismatch is checked here
    (``check_rollout_mismatch``: a stale or corrupt rollout engine stops the run). When the
    batch is one optimizer step (``old_logprobs_from_update``) ``OLD_LOGPROBS`` is left out:
    ``learn`` takes it from the update's forward and checks the mismatch there.
    """
    batch, metrics = sample(rt, timer, n)
    if not old_logprobs_from_update(rt.cfg, len(batch)):  # else ``learn`` takes them from the update
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


def sample(rt: Runtime, timer: Timer, n: int) -> tuple[Batch, Metrics]:
    """``n`` scored responses to each of the next ``data.train_batch_size`` prompts. With
    ``algorithm.dynamic_sampling``, rounds of fresh prompts until the step holds that many groups
    whose scores are not all equal (``fill_informative``); a step left short says so on the console."""

    def one_round() -> tuple[Batch, Metrics]:
        with timer("generate"):
            batch = rollout(rt, rt.next_prompts(), n=n)
        with timer("reward"):
            return score(rt, batch)

    ds, cfg = rt.cfg.algorithm.dynamic_sampling, rt.cfg
    if rt.split is not None and not ds.enable:  # split placement: the rollout queue (max_staleness)
        with timer("generate"):
            batch = rt.split.step_batch(rt.step, n, lambda prompts, step: with_groups_and_seeds(rt, prompts, step))
        with timer("reward"):
            return score(rt, batch)
    if not ds.enable:
        return one_round()
    p = cfg.placement
    multiple = math.lcm(cfg.trainer.num_workers, p.separate_workers if p.separate else 1)  # ranks splitting it
    pad_id = int(getattr(rt.train_data.dataset, "pad_id", 0))
    batch, metrics = fill_informative(one_round, cfg.data.train_batch_size, ds.max_rounds, multiple, pad_id)
    if metrics["dynamic_sampling/short"]:
        rt.short_steps += 1
        if math.log10(rt.short_steps).is_integer():  # the 1st, 10th, 100th ...: the metric has every one
            note = short_step_note(metrics, cfg.data.train_batch_size)
            count = "" if rt.short_steps == 1 else f"; {rt.short_steps} steps short so far"
            announce(cfg, f"warning: step {rt.step}: {note}{count} (every one: metric dynamic_sampling/short)")
    return batch, metrics


class RolloutWeightsMismatch(TrainingDiverged):
    """The rollout engine's log-probs are far from the trainer's right after a weight sync:
    its weights are stale or corrupt. ``flowrl train`` reports it as a diverged run (exit 1)."""


def check_rollout_mismatch(cfg: DictConfig, step: int, batch: Batch) -> Metrics:
    """Stop the run when mean |old_logprobs - rollout_logprobs| over valid tokens (with
    ``TOKEN_VERSIONS``: those the policy being trained sampled, version ``step - 1``) exceeds
    ``actor.policy_loss.max_logprob_diff`` (null: ``expected_logprob_diff`` of the dtypes);
    else the whole batch's figures of the configured correction (``rollout/masked_token_frac``, ...).

    A batch without ``ROLLOUT_LOGPROBS`` (a backend that gives none) is not checked.
    """
    if Keys.ROLLOUT_LOGPROBS not in batch:
        return {}
    mask, old, rollout_lp = batch[Keys.RESPONSE_MASK], batch[Keys.OLD_LOGPROBS], batch[Keys.ROLLOUT_LOGPROBS]
    fresh = mask  # [B, R] the tokens the policy being trained sampled: only they show whether a sync took
    if Keys.TOKEN_VERSIONS in batch:  # split placement: older versions' tokens differ by design
        fresh = mask * (batch[Keys.TOKEN_VERSIONS] == step - 1).to(mask.dtype)
    diff = float(rollout_mismatch(old, rollout_lp, fresh)["rollout_logprob_diff_mean"]) if fresh.any() else 0.0
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
    if Keys.OLD_LOGPROBS not in batch:  # one optimizer step: the update's forward gave them
        batch = batch | rt.actor.take_old_logprobs(batch)
        metrics |= check_rollout_mismatch(rt.cfg, rt.step, batch)
    with timer("weight_sync"):
        metrics |= sync_metrics(rt.actor.sync_weights()) if rt.split is None else rt.split.send_weights(rt.step)
    if rt.cfg.trainer.use_gpu or rt.cfg.actor.offload:  # memory/<stage>_peak_gib, _used_gib, offloaded_gib
        metrics |= max_over_ranks(rt.actor.memory_stats())
    metrics |= rollout_metrics(batch)
    metrics |= timer.metrics()
    if rt.split is not None:  # staleness, the rollout queue, both sides' idle time
        metrics |= rt.split.step_metrics(rt.step, batch, metrics["timing/step"])
    tokens = float(batch[Keys.RESPONSE_MASK].sum() + batch[Keys.PROMPT_MASK].sum())
    metrics["perf/tokens_per_s"] = tokens / metrics["timing/step"]
    return metrics


def rollout(rt: Runtime, prompts: Batch, n: int, temperature: float | None = None) -> Batch:
    """``n`` responses per prompt; samples of one prompt share a contiguous ``GROUP_IDS`` value."""
    return rt.generate(with_groups_and_seeds(rt, prompts), n=n, temperature=temperature)


def with_groups_and_seeds(rt: Runtime, prompts: Batch, step: int | None = None) -> Batch:
    """The prompts with ``GROUP_IDS`` 0..B-1 and (``rollout.seed_per_prompt``) ``SAMPLE_SEEDS``: those of
    the runtime's next rollout call, or of ``step``'s first (a rollout submitted ahead of its step)."""
    prompts = prompts.clone()
    prompts[Keys.GROUP_IDS] = torch.arange(len(prompts))  # [B]
    if rt.cfg.rollout.seed_per_prompt:
        seeds = rt.rollout_seeds(len(prompts)) if step is None else step_seeds(rt.cfg.trainer.seed, step, 0, len(prompts))
        prompts[Keys.SAMPLE_SEEDS] = seeds  # [B]
    return prompts


def score(rt: Runtime, batch: Batch) -> tuple[Batch, Metrics]:
    """Sequence rewards into ``SCORES``: the reward model's when the run has one, else the rule
    functions' (a failing reward function scores 0 and is counted). Same ``reward/...`` keys."""
    if Keys.NUM_TURNS in batch:  # a multi-turn rollout: its environment gave the scores
        return shape_overlong(rt.cfg, batch, agent_metrics(batch))
    if rt.rm is not None:
        scores = rt.rm.compute_scores(batch)[Keys.SCORES]  # [B]
        scored, metrics = batch | Batch({Keys.SCORES: scores}), model_reward_metrics(batch, scores)
        return shape_overlong(rt.cfg, scored, metrics)
    scored = rt.rewards.score(batch)
    return shape_overlong(rt.cfg, batch | scored, reward_metrics(scored))


def shape_overlong(cfg: DictConfig, batch: Batch, metrics: Metrics) -> tuple[Batch, Metrics]:
    """With ``algorithm.overlong.enable``: DAPO's soft overlong penalty added to ``SCORES``
    (``overlong_penalty``, L_max = ``rollout.max_response_length``). ``reward/score_mean`` stays the
    score before it; ``reward/mean`` of the step is after it."""
    ol = cfg.algorithm.overlong
    if not ol.enable:
        return batch, metrics
    lengths = batch[Keys.RESPONSE_MASK].sum(-1)  # [B]
    penalty = overlong_penalty(lengths, cfg.rollout.max_response_length, ol.buffer, ol.penalty_factor)  # [B]
    batch[Keys.SCORES] = batch[Keys.SCORES] + penalty.to(batch[Keys.SCORES].dtype)  # [B]
    return batch, metrics | {
        "overlong/penalty_mean": float(penalty.mean()),
        "overlong/penalized_frac": float((penalty < 0).float().mean()),
    }


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
    """The score on each response's last token (a multi-turn rollout's per-turn rewards on each turn's
    last token), minus ``beta * KL`` per token when ``kl_ctrl`` is given."""
    mask = batch[Keys.RESPONSE_MASK]  # [B, R]
    # multi-turn: each turn's reward on its own last token; else the score on the response's last token
    scores = batch[Keys.TOKEN_SCORES] if Keys.TOKEN_SCORES in batch else token_scores(batch[Keys.SCORES], mask)
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

