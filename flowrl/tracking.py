"""Metrics of a run: one JSON object per step in ``metrics.jsonl``, plus optional sinks.

Sinks: ``console`` (one compact line per step), ``jsonl`` (always safe to parse while the
run goes on: each line is written and flushed whole), ``tensorboard`` (if installed) and
``wandb`` (if installed; honours ``WANDB_MODE=offline``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch


def to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().item())
    return float(value)


def mean_metrics(per_rank: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Average dicts of metrics (e.g. one per rank or per micro-batch), key by key."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for metrics in per_rank:
        for k, v in metrics.items():
            sums[k] += to_float(v)
            counts[k] += 1
    return {k: sums[k] / counts[k] for k in sums}


class Timer:
    """Wall-clock seconds per named stage: ``with timer("gen"): ...`` -> ``timing/gen``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        out = {f"timing/{k}": v for k, v in self.seconds.items()}
        out["timing/step"] = sum(self.seconds.values())
        return out


class Tracker:
    """Writes each step's metrics to every configured sink."""

    def __init__(self, run_dir: str, loggers: Iterable[str], config: Mapping[str, Any] | None = None):
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.loggers = set(loggers)
        unknown = self.loggers - {"console", "jsonl", "tensorboard", "wandb"}
        if unknown:
            raise ValueError(f"trainer.loggers: unknown sink(s) {sorted(unknown)}; use console, jsonl, tensorboard, wandb")
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a") if "jsonl" in self.loggers else None
        self._tb = self._open_tensorboard() if "tensorboard" in self.loggers else None
        self._wandb = self._open_wandb(config) if "wandb" in self.loggers else None

    def _open_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("trainer.loggers has 'tensorboard' but it is not installed: pip install tensorboard")
        return SummaryWriter(os.path.join(self.run_dir, "tensorboard"))

    def _open_wandb(self, config: Mapping[str, Any] | None) -> Any:
        try:
            import wandb
        except ImportError:
            raise RuntimeError("trainer.loggers has 'wandb' but it is not installed: pip install wandb")
        return wandb.init(dir=self.run_dir, config=dict(config or {}), reinit=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": step, **{k: to_float(v) for k, v in metrics.items()}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row, allow_nan=True) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        if "console" in self.loggers:
            print(format_line(row), flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


CONSOLE_KEYS = (
    "reward/mean",
    "val/accuracy",
    "actor/pg_loss",
    "actor/ppo_kl",
    "actor/entropy",
    "train/loss",  # SFT
    "val/loss",
    "val/exact_match",
    "timing/step",
)


def format_line(row: Mapping[str, float]) -> str:
    parts = [f"step {int(row['step'])}"]
    parts += [f"{k}={row[k]:.4g}" for k in CONSOLE_KEYS if k in row]
    return " | ".join(parts)


def read_metrics(run_dir: str) -> list[dict[str, float]]:
    """The rows of a run's metrics.jsonl (a truncated last line, from a kill, is skipped)."""
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
