"""Predicted vs measured step time of the planner, on this machine.

    python bench/plan_check.py recipes/grpo_arithmetic_tiny.yaml actor.model.path=DIR \
        data.train_files=[DATA/train.parquet] --steps 6 --others 5 --out-dir /tmp/plan_check

1. profiles the machine (if not cached), then runs two layouts per process class the search
   may choose (trainer ranks, rollout workers: ``--fit-classes``), with the recipe's
   micro-batching and with half of it, and fits the runtime overheads from them
   (``flowrl plan --fit``);
2. plans the recipe, then runs the chosen plan (with ``trainer.plan=auto``, so the run plans for
   itself and logs ``plan/predicted_*``) and ``--others`` other plans that fit, spread over the
   ranking and none of them a fit run's layout, each a fresh ``python -m flowrl.cli train`` run;
3. prints, per plan, the predicted and measured step time (median of steps 2..N) and the error,
   the recipe's own layout first (measured by its fit run); a plan whose layout was a fit run's
   is marked (in-sample).

Each run is a subprocess; the runs go one after another, so they do not share the devices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from flowrl.config import load_config
from flowrl.planner import plan
from flowrl.planner.fit import fit_overheads, measured_stages, read_steps
from flowrl.planner.layout import Layout

RUN_KEYS = ["trainer.loggers=[jsonl]", "trainer.save_every=-1", "trainer.save_policy=false", "data.val_files=[]"]


def train(recipe: str, overrides: list[str], run_dir: str, steps: int, extra: list[str]) -> float:
    """One ``flowrl train`` run; its wall seconds."""
    cmd = [sys.executable, "-m", "flowrl.cli", "train", recipe, *overrides, *RUN_KEYS, *extra,
           f"trainer.run_dir={run_dir}", f"trainer.total_steps={steps}", "trainer.quiet=true"]  # fmt: skip
    start = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def spread(plans: list, k: int) -> list:
    """``k`` plans from the list, distinct in workers/placement/micro-batching first, spread over the ranking."""
    if len(plans) <= k:
        return plans
    picked, seen = [], set()
    for p in plans:  # one of each kind (workers, placement, checkpointing) first
        kind = (p.layout.num_workers, p.layout.rollout_workers, p.layout.gradient_checkpointing, p.layout.offload)
        if kind not in seen:
            seen.add(kind)
            picked.append(p)
    rest = [p for p in plans if p not in picked]
    step = max(1, len(rest) // max(1, k - len(picked)))
    picked += rest[::step]
    return sorted(picked[:k], key=lambda p: p.seconds["step"])


def fit_layouts(cfg, result, limit: int) -> list[Layout]:
    """Two layouts per process class the search may choose (fastest classes first, ``limit``
    classes): the recipe's micro-batching with that class's workers where valid (else the class's
    fastest plan), and the same with half (or twice) the rows per micro-batch, so the fit can tell
    the cost per micro-batch from the fixed one."""
    from dataclasses import replace

    from flowrl.planner.cost import process_class
    from flowrl.planner.layout import layout_errors

    base, out, seen = Layout.of(cfg), [], set()
    s = result.setting
    for p in [result.chosen, *result.alternatives]:
        kind = process_class(p.layout)
        if kind in seen:
            continue
        seen.add(kind)
        mine = replace(base, num_workers=p.layout.num_workers, rollout_workers=p.layout.rollout_workers,
                       tensor_parallel_size=p.layout.tensor_parallel_size, max_staleness=p.layout.max_staleness)  # fmt: skip
        mine = mine if not layout_errors(cfg, mine, s.shape, s.device.count, s.device.use_gpu) else p.layout
        out.append(mine)
        for rows in (mine.micro_batch_size // 2, mine.micro_batch_size * 2):  # a second micro-batch count
            other = replace(mine, micro_batch_size=rows, max_tokens_per_micro_batch=0)
            if rows >= 1 and not layout_errors(cfg, other, s.shape, s.device.count, s.device.use_gpu):
                out.append(other)
                break
        if len(seen) == limit:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--others", type=int, default=5)
    parser.add_argument("--fit-classes", type=int, default=3, help="fit runs: one per process class, at most this many")
    parser.add_argument("--out-dir", default="/tmp/plan_check")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    cfg = load_config(args.recipe, args.overrides)
    fits = fit_layouts(cfg, plan(cfg), args.fit_classes)  # the profile is taken here if not cached
    fit_dirs = []
    for i, layout in enumerate(fits):
        fit_dirs.append(os.path.join(args.out_dir, f"fit{i + 1}"))
        wall = train(args.recipe, args.overrides, fit_dirs[-1], args.steps, layout.overrides())
        print(f"fit run {i + 1}: {layout.short()} ({wall:.0f} s)", flush=True)
    fit_overheads(fit_dirs)
    result = plan(cfg)
    print(f"{result.considered} layouts, {result.rejected_for_memory} rejected by the memory model")
    print(result.table(8), flush=True)
    rows = []
    base = Layout.of(cfg)
    if result.requested is not None and base in fits:  # the recipe as written: measured by its fit run
        rows.append(("recipe", base.short(), result.requested.seconds["step"], fit_dirs[fits.index(base)]))
    chosen_dir = os.path.join(args.out_dir, "chosen")
    train(args.recipe, args.overrides, chosen_dir, args.steps, ["trainer.plan=auto"])
    with open(os.path.join(chosen_dir, "plan.json")) as f:
        recorded = json.load(f)["chosen"]
    rows.append(("chosen", recorded["summary"], recorded["predicted_s"]["step"], chosen_dir))
    fitted = {layout.short() for layout in fits}
    candidates = [p for p in result.alternatives if p.layout.short() not in fitted | {recorded["summary"]}]
    for i, p in enumerate(spread(candidates, args.others)):
        run_dir = os.path.join(args.out_dir, f"other{i + 1}")
        train(args.recipe, args.overrides, run_dir, args.steps, p.layout.overrides())
        rows.append((f"other{i + 1}", p.layout.short(), p.seconds["step"], run_dir))
        print(f"ran {p.layout.short()}", flush=True)
    print("\n| plan | layout | predicted s/step | measured s/step | error |")
    print("|---|---|---|---|---|")
    for tag, summary, predicted, run_dir in rows:
        measured = measured_stages(read_steps(run_dir))["step"]
        mark = " (a fit layout: in-sample)" if summary in fitted else ""
        print(f"| {tag}{mark} | {summary} | {predicted:.3f} | {measured:.3f} | {100 * (predicted - measured) / measured:+.1f}% |")
    step_s = {tag: measured_stages(read_steps(run_dir))["step"] for tag, _, _, run_dir in rows}
    if "recipe" in step_s:
        same = recorded["summary"] == base.short()
        print(f"\nchosen {'is' if same else 'differs from'} the recipe's layout: {step_s['chosen']:.3f} s/step "
              f"against {step_s['recipe']:.3f} ({step_s['recipe'] / step_s['chosen']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
