"""The outer loop every program shares: evaluate, one driver step per training step, evaluate.

Checkpoints, resume, the NaN/Inf guard and a graceful Ctrl-C/SIGTERM are handled here, so a
driver only writes its ``train_step`` (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf

from flowrl.keys import Keys
from flowrl.trainer.checkpoint import Checkpointer, Stateful
from flowrl.trainer.faults import BadStepGuard, GracefulStop, RewardFailureGuard, RunInterrupted
from flowrl.trainer.runtime import Runtime, build_runtime

Metrics = dict[str, float]
P = TypeVar("P", bound="Program")


class Program(Protocol):
    """What the loop needs from a program's run (the RL runtime, an SFT or a reward-model run).

    ``cfg.trainer`` holds the loop settings under the RL config's names (``total_steps``,
    ``run_dir``, ``save_every``, ``keep_last``, ``resume``, ``save_on_interrupt``,
    ``max_bad_steps``, ``eval_every``, ``quiet``); ``actor`` (and ``critic``, or None) are the
    worker groups a checkpoint saves; ``train_data`` is the resumable data loader.
    """

    cfg: Any
    actor: Any
    critic: Any
    train_data: Any
    tracker: Any

    def begin_step(self, step: int) -> None: ...

    def shutdown(self) -> None: ...


@dataclass  # not frozen: OmegaConf 2.3 makes a frozen dataclass a read-only node that recipes cannot set
class LoopSettings:
    """The loop's settings for a program without an RL config (SFT, reward-model training)."""

    save_every: int = -1  # checkpoint every N steps and at the last; 0: only at the last; -1: never
    keep_last: int = 2  # complete checkpoints kept under OUT_DIR/checkpoints
    resume: str = "disable"  # disable | auto (the newest checkpoint in OUT_DIR, if any) | a checkpoint folder
    save_on_interrupt: bool = True  # Ctrl-C / SIGTERM: finish the step, save a checkpoint, stop
    max_bad_steps: int = 3  # stop after this many steps in a row with a NaN/Inf loss; 0: never
    max_reward_failure_steps: int = 0  # programs without rule rewards never stop for them
    stop_grace_s: float = 120.0  # after Ctrl-C / SIGTERM the step under way gets this long to end and save
    eval_every: int = 0  # held-out evaluation every N steps; 0: before and after training only
    quiet: bool = False  # no console lines or progress bar


def program_config(
    algorithm: str, model_path: str, num_workers: int, seed: int, total_steps: int, run_dir: str,
    loop: LoopSettings,
) -> DictConfig:  # fmt: skip
    """What the loop and the checkpointer read of a program's run (``cfg.trainer``, the model,
    no critic), for programs with a config of their own."""
    trainer = {
        "algorithm": algorithm, "num_workers": num_workers, "seed": seed, "total_steps": total_steps,
        "run_dir": run_dir, **asdict(loop),
    }  # fmt: skip
    return OmegaConf.create({"trainer": trainer, "actor": {"model": {"path": model_path}}, "critic": {"enable": False}})


def run(cfg: DictConfig, train_step: Callable[[Runtime], Metrics], state: dict[str, Stateful] | None = None) -> Metrics:
    """The RL drivers' loop: evaluate, ``train_step`` per step, evaluate, log (``run_program``).

    ``state`` holds the driver's own resumable objects (e.g. a KL controller).
    With ``trainer.save_policy`` the final policy is written to ``RUN_DIR/policy``, a
    Hugging Face folder that transformers and vLLM load.
    """
    from flowrl.planner.startup import planned_config
    from flowrl.trainer.preflight import InputError

    try:
        cfg, predicted = planned_config(cfg)  # trainer.plan=auto: the planned layout; else cfg as it is
    except ValueError as e:  # no plan fits, no model config: flowrl train says it in one line (exit status 2)
        raise InputError(f"trainer.plan=auto: {e}") from None
    rt = build_runtime(cfg)

    def finish() -> None:
        if cfg.trainer.save_policy:
            rt.actor.save_hf(os.path.abspath(os.path.join(cfg.trainer.run_dir, "policy")))

    def timed_step(rt: Runtime) -> Metrics:
        start = time.monotonic()
        metrics = train_step(rt)
        rt.step_timed(time.monotonic() - start)
        return metrics | predicted  # next to the measured timing/<stage>

    samples = os.path.join(cfg.trainer.run_dir, "val_samples.jsonl")
    return run_program(
        rt,
        timed_step,
        lambda final: evaluate(rt, samples_path=samples if final else None),
        finish,
        state,
        first_metrics=lambda: data_metrics(rt),
        started=rt.record_run,
    )


def run_program(
    rt: P,
    train_step: Callable[[P], Metrics],
    evaluate_fn: Callable[[bool], Metrics],
    finish: Callable[[], None],
    state: dict[str, Stateful] | None = None,
    first_metrics: Callable[[], Metrics] = dict,
    started: Callable[[], None] = lambda: None,
) -> Metrics:
    """The outer loop every program shares: evaluate, ``train_step`` per step, evaluate, log.

    Checkpoints, resume, the NaN/Inf guard and Ctrl-C/SIGTERM are handled here
    (docs/reliability.md). ``evaluate_fn(final)`` returns held-out metrics (``final``: the
    last evaluation, which may write samples); ``finish()`` writes the program's output
    (a Hugging Face folder); ``started()`` runs once the resume (if any) has been validated and
    loaded, before the first step: the place to write files that describe the run. Returns the
    metrics before (``*_before``, fresh runs only) and after.
    """
    t = rt.cfg.trainer
    ckpt, guard = Checkpointer(rt, state), BadStepGuard(t.max_bad_steps)
    rewards = RewardFailureGuard(t.max_reward_failure_steps)
    try:
        with GracefulStop(t.stop_grace_s) as stop:
            start = ckpt.resume()
            started()
            before = {} if start else {f"{k}_before": v for k, v in evaluate_fn(False).items()}
            if not start:
                rt.tracker.log(0, before | first_metrics())
            for step in range(start + 1, t.total_steps + 1):
                rt.begin_step(step)
                metrics = guard.count(train_step(rt))
                rewards.count(metrics)
                if t.eval_every and step % t.eval_every == 0 and step < t.total_steps:
                    metrics |= evaluate_fn(False)  # the last step's evaluation is the final one below
                rt.tracker.log(step, metrics)
                end_step(rt.cfg, step, ckpt, guard, stop)
                rewards.check(step)
        after = evaluate_fn(True)
        rt.tracker.log(t.total_steps, after)
        finish()
        return {**before, **after}
    finally:
        rt.shutdown()


def end_step(cfg: DictConfig, step: int, ckpt: Checkpointer, guard: BadStepGuard, stop: GracefulStop) -> None:
    """After a logged step: stop on too many NaN/Inf steps, checkpoint when due or asked, stop when asked."""
    guard.check(step, ckpt.last.path if ckpt.last else None)
    asked = stop.take_save_request() or (stop.requested and cfg.trainer.save_on_interrupt)
    if ckpt.due(step) or asked:
        ckpt.save(step)
    if stop.requested:
        raise RunInterrupted(step, ckpt.last.path if ckpt.last else None)

def data_metrics(rt: Runtime) -> Metrics:
    """How many training prompts the length limit filtered or truncated (logged at step 0)."""
    stats = getattr(rt.train_data.dataset, "stats", {})
    return {f"data/train_{k.removeprefix('n_')}": float(v) for k, v in stats.items()}



def evaluate(rt: Runtime, chunk: int = 64, samples_path: str | None = None) -> Metrics:
    """Accuracy on the validation prompts at ``rollout.val_temperature`` (0: greedy) (mean score; a score of 1 is a correct answer).

    With ``samples_path``, each prompt's text, greedy response, ground truth and score go
    to that JSONL file (the final evaluation writes ``RUN_DIR/val_samples.jsonl``).
    """
    if rt.val_data is None:
        return {}
    n = len(rt.val_data)
    if rt.cfg.data.val_max_samples > 0:
        n = min(n, rt.cfg.data.val_max_samples)
    scores, samples = [], []
    for start in range(0, n, chunk):
        prompts = rt.val_data.collate(list(range(start, min(n, start + chunk))))
        out = rt.generate(prompts, n=1, temperature=rt.cfg.rollout.val_temperature)
        # a multi-turn rollout comes scored by its environment
        scores.append(out[Keys.SCORES] if Keys.NUM_TURNS in out else rt.rewards.score(out)[Keys.SCORES])
        fields = (out[Keys.PROMPT_TEXT], out[Keys.RESPONSE_TEXT], out[Keys.GROUND_TRUTH], scores[-1].tolist())
        samples += [dict(zip(("prompt", "response", "ground_truth", "score"), row)) for row in zip(*fields)]
    if samples_path is not None:
        with open(samples_path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in samples)
    all_scores = torch.cat(scores)  # [N]
    return {"val/accuracy": float((all_scores >= 1.0).float().mean()), "val/score": float(all_scores.mean())}

