"""GRPO: group-relative policy optimization (Shao et al., 2024, arXiv:2402.03300).

For each prompt, sample a group of G responses, score them, and use each response's
score relative to its group as the advantage of all of its tokens:

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

then take clipped policy-gradient steps on those advantages.

Deviations from the paper:
- The KL to the reference is optional (``actor.use_kl_loss``, k3 estimator as in the
  paper); off by default, as in DAPO and Dr. GRPO, and then no reference model is loaded.
- ``algorithm.advantage.norm_by_std=false`` drops the std division (Dr. GRPO).
- Loss aggregation is configurable (``actor.loss_agg_mode``); the paper averages tokens
  per sequence, then sequences (``seq-mean-token-mean``); the default here is
  ``token-mean`` over the whole mini-batch (DAPO), which does not favour short answers.
- One rollout batch may be split into several mini-batch updates (``actor.mini_batch_size``).
"""

from __future__ import annotations

from omegaconf import DictConfig

from flowrl import steps
from flowrl.algos import compute_advantages
from flowrl.algos.config import AdvantageConfig
from flowrl.keys import Keys
from flowrl.runtime import Runtime, build_runtime
from flowrl.tracking import Timer


def train_step(rt: Runtime) -> dict[str, float]:
    cfg = rt.cfg
    timer = Timer()
    with timer("generate"):
        batch = steps.rollout(rt, rt.next_prompts(), n=cfg.rollout.n)
    with timer("reward"):
        batch, metrics = steps.score(rt, batch)
    with timer("old_logprobs"):
        batch = batch | rt.actor.compute_logprobs(batch)
    if rt.ref is not None:
        with timer("ref"):
            batch = batch | rt.ref.compute_ref_logprobs(batch)

    # ALGO LOGIC: group-relative advantages, no critic
    batch[Keys.TOKEN_REWARDS], _ = steps.token_rewards(batch, None, "k1")
    adv_cfg = AdvantageConfig(**cfg.algorithm.advantage)
    batch[Keys.ADVANTAGES], batch[Keys.RETURNS] = compute_advantages(batch, adv_cfg)

    with timer("update"):
        metrics |= steps.update_metrics(rt.actor.update(batch))
    with timer("weight_sync"):
        metrics |= steps.sync_metrics(rt.actor.sync_weights())
    metrics |= steps.rollout_metrics(batch)
    metrics |= timer.metrics()
    tokens = float(batch[Keys.RESPONSE_MASK].sum() + batch[Keys.PROMPT_MASK].sum())
    metrics["perf/tokens_per_s"] = tokens / metrics["timing/step"]
    return metrics


def main(cfg: DictConfig) -> dict[str, float]:
    """Train for ``trainer.total_steps``; returns the final validation metrics."""
    rt = build_runtime(cfg)
    try:
        before = steps.evaluate(rt)
        rt.tracker.log(0, {f"{k}_before": v for k, v in before.items()})
        for step in range(1, cfg.trainer.total_steps + 1):
            metrics = train_step(rt)
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0:
                metrics |= steps.evaluate(rt)
            rt.tracker.log(step, metrics)
        after = steps.evaluate(rt)
        rt.tracker.log(cfg.trainer.total_steps, after)
        return {**{f"{k}_before": v for k, v in before.items()}, **after}
    finally:
        rt.shutdown()
