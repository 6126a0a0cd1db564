"""Metrics of a run: one JSON object per step in ``metrics.jsonl``, plus optional sinks.

Sinks: ``console`` (one compact line per step), ``jsonl`` (always safe to parse while the
run goes on: each line is written and flushed whole), ``tensorboard`` (if installed),
``wandb`` (if installed; honours ``WANDB_MODE=offline``) and ``progress``: step/total, a
bar, elapsed time, ETA and a few main metrics, redrawn in place on a terminal (console
lines scroll above it) and folded into the step's line elsewhere. ``progress`` is on
whenever the tracker knows the run's total steps; ``quiet`` turns off console and
progress (the files are still written).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

import torch

from flowrl.algos.aggregate import reduce_metric


def to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().item())
    return float(value)


def mean_metrics(per_rank: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Combine dicts of metrics (e.g. one per rank or per mini-batch), key by key: the mean,
    except that a ``*_max`` (``*/max``) key is the max and a ``*_min`` key the min
    (``flowrl.algos.reduce_metric``)."""
    parts: dict[str, list[float]] = defaultdict(list)
    for metrics in per_rank:
        for k, v in metrics.items():
            parts[k].append(to_float(v))
    return {k: float(reduce_metric(k, list(values))) for k, values in parts.items()}


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


SINKS = {"console", "jsonl", "tensorboard", "wandb", "progress"}


class Tracker:
    """Writes each step's metrics to every configured sink."""

    def __init__(
        self,
        run_dir: str,
        loggers: Iterable[str],
        config: Mapping[str, Any] | None = None,
        total_steps: int | None = None,
        quiet: bool = False,
    ):
        """``total_steps`` (the last step logged) turns the progress sink on; ``quiet`` turns
        off console and progress output."""
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.loggers = set(loggers)
        unknown = self.loggers - SINKS
        if unknown:
            raise ValueError(f"trainer.loggers: unknown sink(s) {sorted(unknown)}; use {', '.join(sorted(SINKS))}")
        if total_steps is not None:
            self.loggers.add("progress")
        if quiet:
            self.loggers -= {"console", "progress"}
        self._progress = Progress(total_steps) if "progress" in self.loggers else None
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
        line = format_line(row) if "console" in self.loggers else None
        if self._progress is not None:
            self._progress.update(row, line)
        elif line is not None:
            print(line, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
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
    "agent/tool_calls_mean",  # multi-turn
    "timing/step",
)


def format_line(row: Mapping[str, float]) -> str:
    parts = [f"step {int(row['step'])}"]
    parts += [f"{k}={row[k]:.4g}" for k in CONSOLE_KEYS if k in row]
    return " | ".join(parts)


PROGRESS_KEYS = (  # the first PROGRESS_METRICS of these that the run logs ride along the bar
    "reward/mean",
    "train/loss",  # SFT
    "val/accuracy",
    "val/exact_match",  # SFT
    "val/loss",
    "actor/entropy",
)
PROGRESS_METRICS = 3
CLEAR_LINE = "\r\x1b[K"


class Progress:
    """The progress sink: ``step N/total``, a bar, elapsed, ETA and the main metrics.

    ETA = (seconds per step so far) x (steps left). "So far" starts when the step-0 row
    (the evaluation before training) is logged, else when the sink is made, so start-up
    and the first evaluation do not count as training time. On a TTY the bar is redrawn
    in place on ``stream`` (stderr) and console lines are printed above it, on stdout;
    elsewhere each step gives one line (on stdout with the console line, else on ``stream``).
    """

    def __init__(
        self,
        total: int | None,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.clock = clock
        self.start = clock()
        self.anchor = (self.start, 0)  # (time, step) the rate is measured from
        self.step = 0
        self.latest: dict[str, float] = {}
        self._drawn = False

    def seconds_per_step(self, step: int, now: float) -> float | None:
        t0, s0 = self.anchor
        return (now - t0) / (step - s0) if step > s0 else None

    def eta(self, step: int, now: float) -> float | None:
        per_step = self.seconds_per_step(step, now)
        if per_step is None or self.total is None:
            return None
        return per_step * max(self.total - step, 0)

    def render(self, now: float, ascii: bool = False, width: int | None = None, metrics: bool = True) -> str:
        shown = [k for k in PROGRESS_KEYS if k in self.latest][:PROGRESS_METRICS] if metrics else []
        postfix = ", ".join(f"{k}={self.latest[k]:.4g}" for k in shown)
        per_step = self.seconds_per_step(self.step, now)
        return render_meter(self.step, self.total, now - self.start, per_step, postfix, ascii, width)

    def update(self, row: Mapping[str, float], line: str | None = None) -> None:
        """Take one logged row (and the console sink's line for it, if that sink is on)."""
        now = self.clock()
        step = int(row["step"])
        if step == 0:
            self.anchor = (now, 0)
        self.step = max(self.step, step)
        for key, value in row.items():
            if key.removesuffix("_before") in PROGRESS_KEYS:
                self.latest[key.removesuffix("_before")] = value
        if not self.tty:
            if line is None:
                print(self.render(now, ascii=True), file=self.stream, flush=True)
            else:  # one line: the progress, then the console line's metrics (if it has any)
                rest = line.partition(" | ")[2]
                text = self.render(now, ascii=True, metrics=not rest)
                print(f"{text} | {rest}" if rest else text, flush=True)
            return
        self._clear()
        if line is not None:
            print(line, flush=True)
        columns = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r" + self.render(now, width=columns)[:columns])
        self.stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write(CLEAR_LINE)
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def render_meter(
    step: int,
    total: int | None,
    elapsed: float,
    seconds_per_step: float | None,
    postfix: str = "",
    ascii: bool = False,
    width: int | None = None,
) -> str:
    """``step:  30%|###       | 3/10 [00:12<00:28,  4.00s/step, reward/mean=0.5]`` (tqdm's
    layout when tqdm is installed; the same numbers in a plain layout otherwise)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return plain_meter(step, total, elapsed, seconds_per_step, postfix)
    rate = 1.0 / seconds_per_step if seconds_per_step else 0.0  # 0: tqdm shows "?"
    return tqdm.format_meter(
        step, total, elapsed, ncols=width, prefix="step", unit="step", rate=rate, postfix=postfix or None, ascii=ascii
    )


def plain_meter(step: int, total: int | None, elapsed: float, seconds_per_step: float | None, postfix: str = "") -> str:
    """``step 3/10 [######--------------]  30% 00:12<00:28 | reward/mean=0.5``, without tqdm."""
    if total:
        done = round(20 * min(step / total, 1.0))
        head = f"step {step}/{total} [{'#' * done}{'-' * (20 - done)}] {step / total:4.0%}"
    else:
        head = f"step {step}"
    eta = "?" if seconds_per_step is None or not total else clock_time(seconds_per_step * max(total - step, 0))
    text = f"{head} {clock_time(elapsed)}<{eta}"
    return f"{text} | {postfix}" if postfix else text


def clock_time(seconds: float) -> str:
    """``MM:SS``, or ``H:MM:SS`` from an hour on (tqdm's format)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


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
