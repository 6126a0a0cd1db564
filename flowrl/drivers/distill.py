"""On-policy distillation (Agarwal et al. 2024, GKD, arXiv:2306.13649), per-token reverse KL.

The student π samples responses to the prompts; a frozen teacher π_T (``teacher.path``,
any Hugging Face causal LM with the student's tokenizer) scores every sampled token; each
token's advantage is the negative per-token reverse-KL estimate

    A_t = log π_T(y_t | x, y_<t) − log π_old(y_t | x, y_<t)      (+ w · A_i^GRPO, optional)

and the clipped policy-gradient steps of every other driver (``actor.policy_loss``) follow.
At the step's start (ratio 1) the gradient is E_y~π[Σ_t ∇log π(y_t) A_t], which moves π
towards π_T on the prefixes π itself produces: the student learns from its own mistakes.
This is the sampled per-token form that Qwen3 (arXiv:2505.09388) and Thinking Machines
("On-Policy Distillation", 2025) use. Estimator ``distill`` (``flowrl/algos/distill.py``).

Deviations from GKD:
- GKD's divergence is over the whole vocabulary at each position (generalized JSD, forward
  or reverse KL); here it is the single-sample reverse-KL estimate on the sampled token, so
  the teacher returns one log-prob per token ([B, R]), never logits.
- GKD mixes in fixed or teacher-generated sequences with probability 1 − λ; here every
  sample is the student's own (λ = 1, fully on-policy).
- A token's advantage is its own term only (discount 0), not the sum over later tokens.
- Optional task reward: ``algorithm.advantage.distill_reward_weight`` w adds GRPO's advantage.
- Both models' log-probs are taken at ``rollout.temperature``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from flowrl.algos import compute_advantages, distill_metrics
from flowrl.drivers import steps
from flowrl.drivers.registry import DriverSpec
from flowrl.keys import Keys
from flowrl.trainer import loop
from flowrl.trainer.runtime import Runtime
from flowrl.trainer.tracking import Timer

# needs teacher.path; the driver adds the teacher's and the student's log-probs before the estimator runs
SPEC = DriverSpec(critic="never", teacher=True, provides=(Keys.TEACHER_LOGPROBS, Keys.OLD_LOGPROBS))


def train_step(rt: Runtime) -> dict[str, float]:
    timer = Timer()
    batch, metrics = steps.collect(rt, timer, n=rt.cfg.rollout.n)
    if Keys.OLD_LOGPROBS not in batch:  # collect left them to a one-step update; A_t needs them first
        with timer("old_logprobs"):
            batch = batch | rt.actor.compute_logprobs(batch)
        metrics |= steps.check_rollout_mismatch(rt.cfg, rt.step, batch)
    assert rt.teacher is not None  # SPEC.teacher: config validation refused a run without one
    with timer("teacher"):
        batch = batch | rt.teacher.compute_teacher_logprobs(batch)  # TEACHER_LOGPROBS [B, R]

    # ALGO LOGIC: every sampled token's advantage is log pi_teacher - log pi_student (+ w * GRPO's)
    batch[Keys.ADVANTAGES], batch[Keys.RETURNS] = compute_advantages(batch, rt.cfg.algorithm.advantage)
    gap = distill_metrics(batch[Keys.TEACHER_LOGPROBS], batch[Keys.OLD_LOGPROBS], batch[Keys.RESPONSE_MASK])
    metrics |= {f"distill/{k}": float(v) for k, v in gap.items()}

    return steps.learn(rt, timer, batch, metrics)


def main(cfg: DictConfig) -> dict[str, float]:
    """Train for ``trainer.total_steps``; returns the validation metrics before and after."""
    return loop.run(cfg, train_step)
