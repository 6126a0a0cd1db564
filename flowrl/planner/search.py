"""The search: every layout the engines support for a run, the ones that fit in memory, ranked by
predicted step time.

    result = plan(cfg)                # cfg: a loaded run config (flowrl.config.load_config)
    result.chosen.layout.overrides()  # key=value pairs for flowrl train
    result.table()                    # the chosen plan and the runners-up, seconds per stage

A layout the memory model rejects is never returned; when none fits, ``NoPlanFits`` says
the smallest predicted peak and what is available.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from flowrl.algos import get_estimator
from flowrl.keys import Keys
from flowrl.planner.calibrate import load_or_profile
from flowrl.planner.cost import Coefficients, Setting, predict
from flowrl.planner.layout import Layout, candidate_layouts, layout_errors
from flowrl.planner.memory import GIB, HEADROOM, Device, Roles, Workload, memory_errors, stage_peaks
from flowrl.planner.shape import ModelShape


class NoPlanFits(ValueError):
    """No layout of the run fits in memory (or none is valid on these devices)."""


@dataclass(frozen=True)
class Plan:
    layout: Layout
    seconds: dict[str, float]  # predicted seconds per stage, and "step"
    peak_gib: float  # the highest predicted stage peak (per GPU, or of the host on CPU)
    peaks_gib: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout.to_dict(), "overrides": self.layout.overrides(), "summary": self.layout.short(),
                "predicted_s": self.seconds, "peak_gib": self.peak_gib, "peaks_gib": self.peaks_gib}  # fmt: skip


@dataclass
class PlanResult:
    chosen: Plan
    alternatives: list[Plan]  # the next fastest, best first
    requested: Plan | None  # the recipe's own layout, if it fits
    considered: int  # valid layouts
    rejected_for_memory: int
    setting: Setting
    coefficients: Coefficients
    calibration_file: str
    calibration_s: float = 0.0  # seconds spent profiling now (0: cached)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        s = self.setting
        return {
            "chosen": self.chosen.to_dict(),
            "alternatives": [p.to_dict() for p in self.alternatives],
            "requested": self.requested.to_dict() if self.requested else None,
            "considered": self.considered,
            "rejected_for_memory": self.rejected_for_memory,
            "shape": s.shape.to_dict(),
            "workload": s.workload.__dict__,
            "device": s.device.__dict__,
            "calibration_file": self.calibration_file,
            "calibration_s": self.calibration_s,
            "fitted_from": self.coefficients.fitted_from,
        }

    def table(self, rows: int = 6) -> str:
        """The chosen plan, the recipe's, and runners-up: predicted seconds per stage and peak memory."""
        plans = [("chosen", self.chosen)] + [(f"#{i + 2}", p) for i, p in enumerate(self.alternatives[: rows - 1])]
        if self.requested is not None and all(p.layout != self.requested.layout for _, p in plans):
            plans.append(("recipe", self.requested))
        stages = list(self.setting.stages)
        where = "GiB/GPU" if self.setting.device.use_gpu else "GiB host"
        head = ["", "layout"] + [s.replace("old_logprobs", "old_lp").replace("weight_sync", "sync") for s in stages]
        head += ["step s", where]
        body = [[tag, p.layout.short()] + [f"{p.seconds[s]:.3f}" for s in stages] + [f"{p.seconds['step']:.3f}", f"{p.peak_gib:.2f}"]
                for tag, p in plans]  # fmt: skip
        widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + body)


def step_stages(cfg: Any) -> tuple[str, ...]:
    """The timed stages of the run's step (``flowrl/drivers/steps.py``)."""
    a = cfg.actor
    rows = cfg.data.train_batch_size * cfg.rollout.n
    fused = a.fuse_old_logprobs and a.epochs == 1 and rows <= a.mini_batch_size and not cfg.algorithm.use_kl_in_reward
    stages = ["generate", "reward"] + ([] if fused else ["old_logprobs"])
    if needs_reference(cfg):
        stages.append("ref")
    if cfg.critic.enable:
        stages += ["values", "critic_update"]
    return tuple(stages + ["update", "weight_sync"])


def needs_reference(cfg: Any) -> bool:
    estimator_reads = Keys.REF_LOGPROBS in get_estimator(cfg.algorithm.advantage.estimator).needs
    return bool(cfg.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward or estimator_reads)


def mean_prompt_tokens(cfg: Any, limit: int = 512) -> float:
    """Mean tokens of the first ``limit`` training prompts (chat template applied); the length
    limit if the data cannot be read here."""
    from transformers import AutoTokenizer

    from flowrl.data import PromptDataset
    from flowrl.data.dataset import PromptDataConfig
    from omegaconf import OmegaConf

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.actor.model.path)
        data = PromptDataset(list(cfg.data.train_files), tokenizer, PromptDataConfig(**cast(dict, OmegaConf.to_container(cfg.data.prompts))))
        lengths = [len(item.prompt_ids) for item in data.items[:limit]]
        return sum(lengths) / len(lengths) if lengths else float(cfg.data.prompts.max_prompt_length)
    except Exception:  # noqa: BLE001 - a guess is enough for timing; preflight reports bad data
        return float(cfg.data.prompts.max_prompt_length)


def setting_of(cfg: Any, device: Device | None = None, prompt_tokens: float | None = None,
               response_tokens: float | None = None) -> Setting:  # fmt: skip
    """Shape, workload, roles and device of a run config."""
    shape = ModelShape.from_folder(cfg.actor.model.path)
    r, a = cfg.rollout, cfg.actor
    workload = Workload(
        prompts=cfg.data.train_batch_size, n=r.n,
        prompt_tokens=prompt_tokens if prompt_tokens is not None else mean_prompt_tokens(cfg),
        response_tokens=response_tokens if response_tokens is not None else float(r.max_response_length),
        max_prompt_tokens=cfg.data.prompts.max_prompt_length, max_response_tokens=r.max_response_length,
        mini_batch_size=a.mini_batch_size, epochs=a.epochs,
    )  # fmt: skip
    lora_base = a.lora.rank > 0 and (cfg.reference is None or not cfg.reference.path)
    ref_model = cfg.reference if cfg.reference is not None and cfg.reference.path else a.model  # as workers/reference.py
    critic = None
    if cfg.critic.enable and "critic" not in cfg.placement.separate:
        critic = ModelShape.from_folder(cfg.critic.model.path)
    roles = Roles(
        reference=needs_reference(cfg) and not lora_base, critic=critic, param_dtype=a.model.dtype,
        rollout_dtype=r.dtype, ref_dtype=cfg.reference.dtype if cfg.reference is not None else a.model.dtype,
        logits_chunk=a.model.logits_chunk_size, sync_bucket_mb=r.sync_bucket_mb, lora=a.lora.rank > 0,
        cpu_offload=a.model.cpu_offload, ref_cpu_offload=ref_model.cpu_offload,
    )  # fmt: skip
    return Setting(shape, workload, roles, device or device_here(cfg.trainer.use_gpu), step_stages(cfg))


def device_here(use_gpu: bool) -> Device:
    if use_gpu:
        if not torch.cuda.is_available():
            raise NoPlanFits("trainer.use_gpu=true but this machine has no GPU: plan on the GPU machine")
        total = torch.cuda.get_device_properties(0).total_memory / GIB
        return Device(True, torch.cuda.device_count(), total)
    return Device.cpu_here()


def fitting_layouts(cfg: Any, setting: Setting) -> tuple[list[tuple[Layout, float, dict[str, float]]], Layout | None, int, float]:
    """The valid layouts that fit in memory as (layout, peak GiB, peaks per stage), the recipe's own
    layout if valid, how many were valid, and the smallest peak among those that do not fit."""
    d = setting.device
    layouts = set(candidate_layouts(cfg, setting.shape, d.count, d.use_gpu, setting.workload.max_seq_tokens))
    requested = Layout.of(cfg)
    if not layout_errors(cfg, requested, setting.shape, d.count, d.use_gpu):
        layouts.add(requested)
    fits, smallest = [], float("inf")
    for layout in sorted(layouts, key=lambda x: x.short()):
        peak, errors = memory_errors(setting.shape, setting.workload, layout, setting.roles, d)
        if errors:
            smallest = min(smallest, peak)
            continue
        peaks = stage_peaks(setting.shape, setting.workload, layout, setting.roles, d)
        fits.append((layout, peak, {k: v / GIB for k, v in peaks.items()}))
    return fits, requested if requested in layouts else None, len(layouts), smallest


def search(cfg: Any, setting: Setting, c: Coefficients) -> tuple[list[Plan], Plan | None, int, int, float]:
    """(fitting plans fastest first, the recipe's plan if valid and fitting, valid layouts,
    rejected for memory, smallest rejected peak)."""
    fits, requested_layout, considered, smallest = fitting_layouts(cfg, setting)
    plans = [Plan(layout, predict(setting, layout, c), peak, peaks) for layout, peak, peaks in fits]
    requested = next((p for p in plans if p.layout == requested_layout), None)
    plans.sort(key=lambda p: (p.seconds["step"], p.peak_gib))
    return plans, requested, considered, considered - len(plans), smallest


def plan(cfg: Any, device: Device | None = None, refresh: bool = False, **workload: float) -> PlanResult:
    """The fastest predicted layout of ``cfg`` that fits in memory, with the runners-up. The memory
    model filters first, so a run that cannot fit says so without profiling anything."""
    setting = setting_of(cfg, device, **workload)
    fits, _, considered, smallest = fitting_layouts(cfg, setting)
    if not fits:
        where = "per GPU" if setting.device.use_gpu else "of host memory"
        if considered == 0:
            raise NoPlanFits(f"no layout of this recipe is valid on {setting.device.count} devices")
        raise NoPlanFits(
            f"no plan fits in memory: the smallest predicted peak of {considered} layouts is {smallest:.2f} GiB "
            f"{where}, {HEADROOM:.0%} of {setting.device.memory_gib:.2f} GiB available; use a smaller model, "
            "shorter sequences or more devices"
        )
    started = time.monotonic()
    c, path, profiled = load_or_profile(setting.shape, cfg.actor.model.dtype, setting.device.use_gpu, refresh)
    seconds = time.monotonic() - started if profiled else 0.0
    plans, requested, considered, rejected, _ = search(cfg, setting, c)
    return PlanResult(plans[0], plans[1:], requested, considered, rejected, setting, c, str(path), seconds)


def write_plan(result: PlanResult, run_dir: str) -> str:
    """``RUN_DIR/plan.json``: the chosen plan, the alternatives, their predictions."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "plan.json")
    with open(path, "w") as f:
        json.dump(result.to_dict(), f, indent=1)
    return path
