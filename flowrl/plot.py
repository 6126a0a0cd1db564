"""Curves of a run's ``metrics.jsonl`` as one PNG (``flowrl plot RUN_DIR``).

One small panel per metric, step on the x axis. A metric that is also logged before
training as ``<key>_before`` (``val/accuracy_before`` at step 0) gets that point at the
start of its curve. Noisy per-step curves (20 points or more) are drawn faint with a
moving average on top. Metrics the run did not log are skipped, so the same default list
serves RL runs (``reward/mean``, ``actor/pg_loss``) and SFT runs (``train/loss``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from flowrl.trainer.tracking import read_metrics

DEFAULT_KEYS = (
    "reward/mean",
    "val/accuracy",
    "val/exact_match",  # SFT
    "actor/entropy",
    "actor/pg_loss",
    "train/loss",  # SFT
    "val/loss",  # SFT
    "critic/vf_loss",  # PPO
    "response_length/mean",
    "agent/turns_mean",  # multi-turn
    "agent/tool_calls_mean",
    "agent/tool_errors_mean",
    "timing/step",
)
SMOOTH_FROM = 20  # points; curves at least this long get a moving average
COLUMNS = 3
FRACTION_SUFFIXES = ("accuracy", "exact_match")  # drawn on [0, 1]


class PlotError(ValueError):
    """The run directory or its metrics cannot be plotted; the message says which."""


def series(rows: Sequence[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` in logged order, with ``<key>_before`` rows taken as ``key``."""
    steps, values = [], []
    for row in rows:
        for name in (f"{key}_before", key):
            if name in row:
                steps.append(float(row["step"]))
                values.append(float(row[name]))
    return steps, values


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point; NaN until a whole window exists (a mean
    of the first one or two points would swing as far as the raw curve); NaNs skipped."""
    out = []
    for i in range(len(values)):
        if i + 1 < window:
            out.append(math.nan)
            continue
        recent = [v for v in values[i - window + 1 : i + 1] if math.isfinite(v)]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


FLAT_SPAN = 1e-6  # a curve whose values differ by less than this (relative) is drawn as flat


def y_limits(values: Sequence[float]) -> tuple[float, float] | None:
    """Limits for a nearly constant curve, so rounding noise does not fill the panel; else None."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    low, high = min(finite), max(finite)
    scale = max(abs(low), abs(high), 1e-12)
    if high - low > FLAT_SPAN * scale:
        return None
    margin = 0.05 * scale if scale > 1e-12 else 1.0
    return low - margin, high + margin


def load_rows(run_dir: str) -> list[dict[str, float]]:
    if not os.path.isdir(run_dir):
        raise PlotError(f"{run_dir}: no such run directory")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{path}: no such file (the run writes it with the jsonl logger)")
    rows = [r for r in read_metrics(run_dir) if "step" in r]
    if not rows:
        raise PlotError(f"{path}: no metrics yet")
    return rows


def plot_run(run_dir: str, out: str | None = None, keys: Sequence[str] | None = None) -> tuple[str, list[str]]:
    """Write the PNG; returns (its path, the keys skipped because the run did not log them)."""
    rows = load_rows(run_dir)
    wanted = list(keys) if keys else list(DEFAULT_KEYS)
    present = [k for k in wanted if series(rows, k)[0]]
    skipped = [k for k in wanted if k not in present]
    if not present:
        logged = sorted({k for r in rows for k in r} - {"step"})
        raise PlotError(
            f"{os.path.join(run_dir, 'metrics.jsonl')}: none of {' '.join(wanted)} is logged; "
            f"it has {' '.join(logged[:12])}{' ...' if len(logged) > 12 else ''}"
        )
    out = out or os.path.join(run_dir, "metrics.png")
    last = int(max(r["step"] for r in rows))
    draw(rows, present, out, title=f"{os.path.normpath(run_dir)}  (last step {last})")
    return out, skipped


def draw_panel(ax: Any, key: str, steps: Sequence[float], values: Sequence[float]) -> None:
    """One metric's curve: faint raw values and their moving average when long, the plain axis
    numbers (no offset notation), the whole [0, 1] scale for fractions."""
    from matplotlib.ticker import MaxNLocator

    long = len(values) >= SMOOTH_FROM
    ax.plot(steps, values, color="tab:blue", alpha=0.35 if long else 1.0, lw=1.0, marker="" if long else "o", ms=3)
    if long:
        ax.plot(steps, moving_average(values, max(3, len(values) // 10)), color="tab:blue", lw=1.8)
    if key.endswith(FRACTION_SUFFIXES):
        ax.set_ylim(-0.03, 1.03)  # a fraction: the whole scale, so a small gain looks small
    elif (limits := y_limits(values)) is not None:
        ax.set_ylim(*limits)
    ax.ticklabel_format(axis="y", useOffset=False)  # "+1.2e-3" above the axis made flat lines look like trends
    ax.set_title(f"{key}  (last {values[-1]:.4g})", fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def draw(rows: Sequence[dict[str, float]], keys: Sequence[str], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    ncols = min(COLUMNS, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
    pad = max(0.5, 0.02 * (last - first))  # one shared step range: panels line up
    for ax, key in zip(axes.flat, keys):
        draw_panel(ax, key, *series(rows, key))
        ax.set_xlim(first - pad, last + pad)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
