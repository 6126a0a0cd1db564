"""Synchronous against asynchronous GRPO on one machine: where each side waits (docs/async.md).

The quickstart's warm start (a tiny model after SFT on the arithmetic task), then the same GRPO
run (32 prompts x 8 samples per step) in three placements:

    colocated    the default hybrid: 2 workers, each training and generating in turn
    split K=0    2 trainer workers + 1 rollout worker, synchronous (placement.max_staleness=0)
    split K=2    the same workers, rollouts up to 2 policy versions behind (asynchronous)

    python bench/bench_async.py OUT_DIR [--steps 12] [--sft-steps 150]

Prints, per placement: median seconds per step (steps 3 onwards), the trainer's idle fraction
(waiting for a rollout batch), the rollout worker's idle fraction, mean staleness and the reward
of the last 3 steps. Every run's metrics stay in OUT_DIR/<name>/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from flowrl.config import load_config
from flowrl.drivers.sft import train_sft
from flowrl.models.tiny import make_tiny_model
from flowrl.quickstart import MODEL, QuickstartConfig, grpo_overrides, sft_config
from flowrl.tasks.arithmetic import write_splits
from flowrl.trainer.tracking import read_metrics

PLACEMENTS = {
    "colocated": [],
    "split_k0": ["placement.rollout_workers=1", "placement.max_staleness=0"],
    "split_k2": ["placement.rollout_workers=1", "placement.max_staleness=2"],
}


def summarize(run_dir: str) -> dict[str, float]:
    rows = [r for r in read_metrics(run_dir) if "actor/pg_loss" in r]
    later = rows[2:] or rows
    mean = lambda key: statistics.mean(r[key] for r in later) if key in later[0] else float("nan")
    return {
        "step_s_median": statistics.median(r["timing/step"] for r in later),
        "trainer_idle_frac": mean("async/trainer_idle_frac"),
        "rollout_idle_frac": mean("async/rollout_idle_frac"),
        "staleness_mean": mean("async/staleness_mean"),
        "reward_last3": statistics.mean(r["reward/mean"] for r in rows[-3:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--sft-steps", type=int, default=150)
    args = parser.parse_args()
    out = os.path.abspath(args.out_dir)
    cfg = QuickstartConfig(out_dir=out, sft_steps=args.sft_steps, quiet=True)
    data = write_splits(os.path.join(out, "data"), cfg.n_train, cfg.n_test, cfg.level, 0, style="symbols", restate_fraction=0.5)
    model = os.path.join(out, "sft", "model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        make_tiny_model(os.path.join(out, "base"), MODEL, seed=0)
        train_sft(sft_config(cfg, os.path.join(out, "base"), data))
    from flowrl.drivers import grpo

    results = {}
    for name, extra in PLACEMENTS.items():
        run_dir = os.path.join(out, name)
        overrides = grpo_overrides(cfg, model, data) + [
            f"trainer.run_dir={run_dir}", f"trainer.total_steps={args.steps}", "trainer.loggers=[jsonl]",
            "trainer.quiet=true", "trainer.eval_every=0", "trainer.save_every=-1", "data.val_max_samples=8", *extra,
        ]  # fmt: skip
        start = time.perf_counter()
        grpo.main(load_config(None, overrides))
        results[name] = summarize(run_dir) | {"run_s": time.perf_counter() - start}
        print(name, json.dumps({k: round(v, 3) for k, v in results[name].items()}), flush=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
