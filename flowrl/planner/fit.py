"""Runtime overheads from measured runs: what the micro-profile cannot see (worker-group calls,
batch transfers, vLLM's scheduling, gloo/NCCL start-up of each collective).

For each stage, the overhead is the median over a run's steady steps (from step 2) of the
measured ``timing/<stage>`` minus the compute the model predicts for that run's layout (with
the run's own mean response length). Where runs of one process class had different
micro-batch counts, the residuals are split by least squares into a fixed part and a part per
micro-batch (the engine's own work per micro-batch and FSDP's collectives, which the plain-torch
profile does not see); else they are averaged. It is added to the
prediction of that stage for every layout with the same processes (``process_class``: trainer
ranks, rollout workers, tensor parallelism); a class no run had gets the mean over all runs.
So the runs must come from the same machine and model shape, ideally one per process class
the search may choose: ``flowrl plan RECIPE --fit RUN_DIR ...`` stores it next to the profile.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from typing import Any

from omegaconf import OmegaConf

from flowrl.planner.calibrate import cache_path, line_fit, load_or_profile, save
from flowrl.planner.cost import Coefficients, predict, process_class, stage_micro_batches
from flowrl.planner.layout import Layout
from flowrl.planner.search import setting_of


def read_steps(run_dir: str, first_step: int = 2) -> list[dict[str, float]]:
    """The training steps of ``RUN_DIR/metrics.jsonl`` from ``first_step`` on (the first pays warm-ups)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir}: no metrics.jsonl; give the run directory of a finished flowrl train run")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in rows if "timing/step" in r and r["step"] >= first_step]
    if not steps:
        raise ValueError(f"{run_dir}: no training step from step {first_step} in metrics.jsonl; run at least {first_step} steps")
    return steps


def measured_stages(steps: list[dict[str, float]]) -> dict[str, float]:
    """Median seconds of each ``timing/<stage>`` (and ``step``) over the steps."""
    keys = {k for r in steps for k in r if k.startswith("timing/")}
    return {k.removeprefix("timing/"): statistics.median(r[k] for r in steps if k in r) for k in keys}


def run_config(run_dir: str) -> Any:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir}: no config.yaml; give the run directory of a flowrl train run")
    return OmegaConf.load(path)


def fit_overheads(run_dirs: list[str], refresh: bool = False) -> tuple[Coefficients, str]:
    """Fit the per-stage overheads from ``run_dirs`` into the cached coefficients; -> (them, file)."""
    points: dict[str, dict[str, list[tuple[float, float]]]] = {}  # class -> stage -> (micro-batches, residual)
    coefficients, path = None, ""
    for run_dir in run_dirs:
        cfg, steps = run_config(run_dir), read_steps(run_dir)
        response = statistics.mean(r.get("response_length/mean", cfg.rollout.max_response_length) for r in steps)
        setting = setting_of(cfg, response_tokens=response)
        if coefficients is None:
            coefficients, file, _ = load_or_profile(setting.shape, cfg.actor.model.dtype, setting.device.use_gpu, refresh)
            path = str(file)
        bare = dataclasses.replace(
            coefficients, overheads={s: 0.0 for s in coefficients.overheads}, class_overheads={}, per_micro={},
            class_per_micro={},
        )  # fmt: skip
        layout = Layout.of(cfg)
        compute, micros = predict(setting, layout, bare), stage_micro_batches(setting, layout)
        for stage, seconds in measured_stages(steps).items():
            if stage in compute and stage != "step":
                points.setdefault(process_class(layout), {}).setdefault(stage, []).append((micros[stage], seconds - compute[stage]))
    assert coefficients is not None
    fixed = {k: {s: line(v)[0] for s, v in stages.items()} for k, stages in points.items()}
    per_micro = {k: {s: line(v)[1] for s, v in stages.items()} for k, stages in points.items()}
    fitted = dataclasses.replace(
        coefficients,
        overheads=coefficients.overheads | mean_over_classes(fixed),
        class_overheads=fixed,
        per_micro=mean_over_classes(per_micro),
        class_per_micro=per_micro,
        fitted_from=[os.path.abspath(d) for d in run_dirs],
    )
    save(fitted, cache_path(setting.shape, cfg.actor.model.dtype, setting.device.use_gpu))
    return fitted, path


def line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(fixed seconds, seconds per micro-batch) through (micro-batches, residual) points: a
    least-squares line when the runs had different micro-batch counts, else their mean residual
    and 0; the per-micro-batch cost is kept >= 0 and the total at the points > 0."""
    a, b = line_fit(points)  # both clamped to >= 0
    if b == 0.0:
        a = max(0.0, statistics.mean(y for _, y in points))
    return a, b


def mean_over_classes(values: dict[str, dict[str, float]]) -> dict[str, float]:
    stages = {s for v in values.values() for s in v}
    return {s: statistics.mean(v[s] for v in values.values() if s in v) for s in stages}


def compare(run_dir: str) -> dict[str, dict[str, float]]:
    """A run's measured median stage seconds next to what its ``plan.json`` (or, without one, the
    cached coefficients for its layout) predicted: {stage: {"predicted": s, "measured": s}}."""
    measured = measured_stages(read_steps(run_dir))
    plan_file = os.path.join(run_dir, "plan.json")
    if os.path.isfile(plan_file):
        with open(plan_file) as f:
            predicted = json.load(f)["chosen"]["predicted_s"]
    else:
        cfg = run_config(run_dir)
        setting = setting_of(cfg)
        c, _, _ = load_or_profile(setting.shape, cfg.actor.model.dtype, setting.device.use_gpu)
        predicted = predict(setting, Layout.of(cfg), c)
    return {s: {"predicted": predicted[s], "measured": measured[s]} for s in predicted if s in measured}
