"""ReMax: REINFORCE with the greedy response as baseline (Li et al., 2023, arXiv:2310.10505).

For each prompt x, sample y ~ pi(.|x) and decode y_greedy = argmax; the advantage of
every token of y is r(x, y) - r(x, y_greedy). No critic, no value model memory.

Deviations from the paper:
- Updates use the clipped surrogate (``actor.policy_loss``) rather than the plain
  REINFORCE gradient; with one update per rollout (the default) the first mini-batch is
  exactly REINFORCE, since the ratio is 1 at the rollout policy.
- ``rollout.n`` samples per prompt may share one greedy baseline (the paper uses n=1).
"""

from __future__ import annotations

from omegaconf import DictConfig

from flowrl.algos import compute_advantages
from flowrl.batch import Batch
from flowrl.drivers import steps
from flowrl.drivers.registry import DriverSpec
from flowrl.keys import Keys
from flowrl.trainer import loop
from flowrl.trainer.runtime import Runtime
from flowrl.trainer.tracking import Timer

SPEC = DriverSpec(provides=(Keys.BASELINE_SCORES,))  # what config validation asks of this driver


def greedy_baseline(rt: Runtime, batch: Batch, n: int) -> Batch:
    """Score one greedy response per prompt; each of the prompt's n samples gets that score."""
    prompts = batch[::n].select(*_prompt_keys(batch))
    greedy = steps.rollout(rt, prompts, n=1, temperature=0.0)
    scores = steps.score(rt, greedy)[0][Keys.SCORES]  # [B / n], by the reward model when there is one
    return Batch({Keys.BASELINE_SCORES: scores.repeat_interleave(n)})  # [B]


def _prompt_keys(batch: Batch) -> list[str]:
    keys = (Keys.PROMPT_IDS, Keys.PROMPT_MASK, Keys.PROMPT_TEXT, Keys.GROUND_TRUTH, Keys.DATA_SOURCE, Keys.EXTRA_INFO)
    return [k for k in keys if k in batch]


def train_step(rt: Runtime) -> dict[str, float]:
    timer = Timer()
    n = rt.cfg.rollout.n
    batch, metrics = steps.collect(rt, timer, n=n)

    # ALGO LOGIC: the greedy response's reward is the baseline
    with timer("greedy_baseline"):
        batch = batch | greedy_baseline(rt, batch, n)
    batch[Keys.ADVANTAGES], batch[Keys.RETURNS] = compute_advantages(batch, rt.cfg.algorithm.advantage)
    metrics["remax/baseline_mean"] = float(batch[Keys.BASELINE_SCORES].mean())

    return steps.learn(rt, timer, batch, metrics)


def main(cfg: DictConfig) -> dict[str, float]:
    """Train for ``trainer.total_steps``; returns the validation metrics before and after."""
    return loop.run(cfg, train_step)
