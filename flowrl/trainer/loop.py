"""The outer loop every program shares: evaluate, one driver step per training step, evaluate.

Checkpoints, resume, the NaN/Inf guard and a graceful Ctrl-C/SIGTERM are handled here, so a
driver only writes its ``train_step`` (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from flowrl.keys import Keys
from flowrl.trainer.checkpoint import Checkpointer, Stateful
from flowrl.trainer.faults import BadStepGuard, GracefulStop, RunInterrupted
from flowrl.trainer.runtime import Runtime, build_runtime

Metrics = dict[str, float]


def run(cfg: DictConfig, train_step: Callable[[Runtime], Metrics], state: dict[str, Stateful] | None = None) -> Metrics:
    """The outer loop every driver shares: evaluate, ``train_step`` per step, evaluate, log.

    ``state`` holds the driver's own resumable objects (e.g. a KL controller); checkpoints,
    resume, the NaN/Inf guard and Ctrl-C are handled here (docs/reliability.md).
    Returns the validation metrics before (``*_before``, fresh runs only) and after training.
    With ``trainer.save_policy`` the final policy is written to ``RUN_DIR/policy``, a
    Hugging Face folder that transformers and vLLM load.
    """
    rt = build_runtime(cfg)
    ckpt, guard = Checkpointer(rt, state), BadStepGuard(cfg.trainer.max_bad_steps)
    try:
        with GracefulStop() as stop:
            start = ckpt.resume()
            before = {} if start else {f"{k}_before": v for k, v in evaluate(rt).items()}
            if not start:
                rt.tracker.log(0, before | data_metrics(rt))
            for step in range(start + 1, cfg.trainer.total_steps + 1):
                rt.begin_step(step)
                metrics = guard.count(train_step(rt))
                if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0:
                    metrics |= evaluate(rt)
                rt.tracker.log(step, metrics)
                end_step(cfg, step, ckpt, guard, stop)
        after = evaluate(rt, samples_path=os.path.join(cfg.trainer.run_dir, "val_samples.jsonl"))
        rt.tracker.log(cfg.trainer.total_steps, after)
        if cfg.trainer.save_policy:
            rt.actor.save_hf(os.path.abspath(os.path.join(cfg.trainer.run_dir, "policy")))
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
        out = rt.actor.generate(prompts, n=1, temperature=rt.cfg.rollout.val_temperature)
        scores.append(rt.rewards.score(out)[Keys.SCORES])
        fields = (out[Keys.PROMPT_TEXT], out[Keys.RESPONSE_TEXT], out[Keys.GROUND_TRUTH], scores[-1].tolist())
        samples += [dict(zip(("prompt", "response", "ground_truth", "score"), row)) for row in zip(*fields)]
    if samples_path is not None:
        with open(samples_path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in samples)
    all_scores = torch.cat(scores)  # [N]
    return {"val/accuracy": float((all_scores >= 1.0).float().mean()), "val/score": float(all_scores.mean())}

