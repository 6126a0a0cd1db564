"""``trainer.plan=auto``: plan at start-up, before any worker is built.

``planned_config(cfg)`` returns the config with the chosen layout's overrides applied and the
per-step metrics of the prediction (``plan/predicted_<stage>_s``), and writes
``RUN_DIR/plan.json``. A resumed run keeps the layout its ``plan.json`` recorded, so its
checkpoints still match the workers.
"""

from __future__ import annotations

import json
import os
from typing import Any

from omegaconf import OmegaConf

from flowrl.planner.search import plan, write_plan


def planned_config(cfg: Any) -> tuple[Any, dict[str, float]]:
    """(``cfg`` with the planned layout, the predicted stage seconds as step metrics); ``cfg``
    itself and no metrics when ``trainer.plan`` is ``off``."""
    if cfg.trainer.plan != "auto":
        return cfg, {}
    run_dir = cfg.trainer.run_dir
    recorded = os.path.join(run_dir, "plan.json")
    if cfg.trainer.resume != "disable" and os.path.isfile(recorded):
        with open(recorded) as f:
            chosen = json.load(f)["chosen"]
        say(cfg, f"plan: {chosen['summary']} (from {recorded}, resuming)")
    else:
        result = plan(cfg)
        chosen = result.chosen.to_dict()
        write_plan(result, run_dir)
        took = f", profiled in {result.calibration_s:.1f} s" if result.calibration_s else ""
        say(cfg, f"plan: {chosen['summary']}, predicted {chosen['predicted_s']['step']:.3f} s/step, peak "
            f"{chosen['peak_gib']:.2f} GiB ({result.considered} layouts{took}; {recorded})")  # fmt: skip
    new = OmegaConf.merge(cfg, OmegaConf.from_dotlist(chosen["overrides"]))
    OmegaConf.set_readonly(new, True)
    return new, {f"plan/predicted_{k}_s": float(v) for k, v in chosen["predicted_s"].items()}


def say(cfg: Any, line: str) -> None:
    if not cfg.trainer.quiet:
        print(f"flowrl: {line}", flush=True)
