"""The quickstart: SFT a tiny model on the arithmetic task, then GRPO it, on a CPU in minutes.

    flowrl quickstart [--seed 0] [--out-dir runs/quickstart]

1. **Data.** Level 2 of the built-in arithmetic task (single-digit ``+``/``-``, prompts
   like ``7-9=``): 4,000 training rows over 150 problems and 50 held-out problems that
   never appear in training. Half of the SFT demonstrations restate the equation before
   the answer (``7-9=-2``), which the task's scorer counts as wrong (the first number
   must be the answer): demonstrations of mixed quality, as real SFT data often is.
2. **Model.** A Qwen2-style model of 2.4M parameters with a byte-level tokenizer, made
   from scratch (random weights, ``flowrl.models.tiny``).
3. **SFT** (``flowrl.drivers.sft``): 300 steps of next-token cross-entropy on the
   demonstrations. The model learns to add and subtract, and to answer in either format.
4. **GRPO** (``flowrl.drivers.grpo``): 30 steps with the task's exact reward, 32 prompts
   x 8 samples per step. The reward teaches the model to answer with just the number.
5. **Held-out accuracy** (greedy, the task's scorer) before and after RL, printed and
   written to ``OUT/summary.json``; the trained policy is written as a Hugging Face
   folder, ``OUT/grpo/policy``, and each stage's curves as ``OUT/{sft,grpo}/metrics.png``.

Every stage is the real thing: Ray workers, FSDP2 over gloo on 2 ranks, vLLM on CPU for
sampling, weights streamed into vLLM after each update. docs/quickstart.md has the
figures and how to read them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, fields

from flowrl.drivers.sft import SFTConfig, train_sft
from flowrl.config import load_config
from flowrl.models.tiny import TinyModelConfig, make_tiny_model
from flowrl.tasks.arithmetic import write_splits

MODEL = TinyModelConfig(
    hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1
)


@dataclass(frozen=True)
class QuickstartConfig:
    out_dir: str = "runs/quickstart"  # data/, base/, sft/, grpo/ and summary.json
    seed: int = 0  # the model's initialization, the data's order and split, the sampling
    level: int = 2  # arithmetic level (flowrl.tasks.arithmetic.LEVELS)
    n_train: int = 4000  # training rows (problems repeat: level 2 has 200 in all)
    n_test: int = 50  # held-out problems, never seen in training
    restate_fraction: float = 0.5  # SFT demonstrations that restate the equation first
    sft_steps: int = 300
    rl_steps: int = 30
    num_workers: int = 2  # data-parallel ranks of each stage
    quiet: bool = False  # no per-step output

    def __post_init__(self) -> None:
        for key in ("n_train", "n_test", "sft_steps", "rl_steps", "num_workers"):
            if getattr(self, key) < 1:
                raise ValueError(f"quickstart: {key}={getattr(self, key)} must be >= 1")


def sft_config(cfg: QuickstartConfig, model: str, data: dict[str, str]) -> SFTConfig:
    return SFTConfig(
        model_path=model,
        train_files=[data["sft_train"]],
        val_files=[data["sft_test"]],
        out_dir=os.path.join(cfg.out_dir, "sft"),
        steps=cfg.sft_steps,
        batch_size=64,
        micro_batch_size=32,
        lr=1e-3,
        lr_schedule="cosine",
        warmup_steps=20,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        eval_every=100,
        greedy_samples=cfg.n_test,
        max_new_tokens=8,
        loggers=["console", "jsonl"],
        quiet=cfg.quiet,
    )


def grpo_overrides(cfg: QuickstartConfig, model: str, data: dict[str, str]) -> list[str]:
    return [
        "trainer.algorithm=grpo",
        f"trainer.total_steps={cfg.rl_steps}",
        f"trainer.num_workers={cfg.num_workers}",
        f"trainer.seed={cfg.seed}",
        f"trainer.run_dir={os.path.join(cfg.out_dir, 'grpo')}",
        "trainer.eval_every=10",
        f"trainer.quiet={str(cfg.quiet).lower()}",
        "trainer.loggers=[console,jsonl]",
        f"actor.model.path={model}",
        "actor.mini_batch_size=256",  # one update per step: on-policy
        "actor.micro_batch_size=128",
        "actor.optim.lr=1e-4",
        "actor.optim.warmup_steps=5",
        "rollout.n=8",
        "rollout.temperature=1.0",
        "rollout.max_response_length=8",
        "rollout.gpu_memory_utilization=0.05",
        f"data.train_files=[{data['train']}]",
        f"data.val_files=[{data['test']}]",
        "data.train_batch_size=32",
        "data.prompts.max_prompt_length=32",
        "reward.num_workers=1",
        "algorithm.advantage.estimator=grpo",
    ]


def run_quickstart(cfg: QuickstartConfig) -> dict[str, float]:
    """All stages; returns the summary (also written to ``OUT/summary.json``)."""
    from flowrl.drivers import grpo

    start = time.perf_counter()
    os.makedirs(cfg.out_dir, exist_ok=True)
    data = write_splits(
        os.path.join(cfg.out_dir, "data"), cfg.n_train, cfg.n_test, cfg.level, cfg.seed,
        style="symbols", restate_fraction=cfg.restate_fraction,
    )  # fmt: skip
    base = os.path.join(cfg.out_dir, "base")
    make_tiny_model(base, MODEL, seed=cfg.seed)
    sft = train_sft(sft_config(cfg, base, data))
    sft_seconds = time.perf_counter() - start
    rl = grpo.main(load_config(None, grpo_overrides(cfg, os.path.join(cfg.out_dir, "sft", "model"), data)))
    summary = {
        "seed": float(cfg.seed),
        "sft/val_exact_match": sft["val/exact_match"],
        "held_out_accuracy_before_rl": rl["val/accuracy_before"],
        "held_out_accuracy_after_rl": rl["val/accuracy"],
        "sft_seconds": sft_seconds,
        "total_seconds": time.perf_counter() - start,
    }
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump({"config": asdict(cfg), **summary}, f, indent=2)
    return summary


def plot_curves(cfg: QuickstartConfig) -> list[str]:
    """``OUT/sft/metrics.png`` and ``OUT/grpo/metrics.png`` (``flowrl plot`` of each stage)."""
    from flowrl.plot import plot_run

    return [plot_run(os.path.join(cfg.out_dir, stage))[0] for stage in ("sft", "grpo")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowrl quickstart", description=__doc__.split("\n\n")[0])
    for f in fields(QuickstartConfig):
        kind = type(f.default)
        if kind is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), action="store_true")
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    cfg = QuickstartConfig(**vars(parser.parse_args(argv)))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the workers inherit it: no per-step INFO lines
    summary = run_quickstart(cfg)
    pngs = plot_curves(cfg)
    before, after = summary["held_out_accuracy_before_rl"], summary["held_out_accuracy_after_rl"]
    print(
        f"held-out accuracy ({cfg.n_test} problems, greedy): after SFT {before:.2f} -> after GRPO {after:.2f}"
    )
    print(f"policy: {os.path.join(cfg.out_dir, 'grpo', 'policy')} | curves: {', '.join(pngs)}")
    print(
        f"took {summary['total_seconds'] / 60:.1f} min; summary: {os.path.join(cfg.out_dir, 'summary.json')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
