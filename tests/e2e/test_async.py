"""The split placement and asynchronous RL end to end on CPU: real Ray, FSDP2 (2 trainer ranks),
one rollout worker with real vLLM, weights over gloo (docs/async.md).

1. ``max_staleness=0`` on the split placement reproduces the colocated synchronous run bitwise:
   every logged metric but wall-clock ones is equal, step by step. Both train LoRA adapters (the
   split placement's transfer sends the merged weights), and the colocated run offloads its trainer
   state around each generation (``actor.offload``), so this also shows that the memory handover
   changes no number. The full-parameter split path is the one of test 2.
2. ``max_staleness=2`` (through ``flowrl train``, a subprocess) learns the arithmetic task from
   an SFT warm start, and no step's tokens are more than 2 policy versions old. Along the way the
   rollout worker is SIGKILLed mid-generation and then a trainer rank mid-step: each stops the run
   within 60 s with a message naming the side that died, and ``trainer.resume=auto`` goes on.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from flowrl.config import load_config
from flowrl.quickstart import grpo_overrides
from flowrl.trainer.checkpoint import find_latest
from flowrl.trainer.tracking import read_metrics
from tests.e2e.procs import finish, launch

pytestmark = pytest.mark.slow
VOLATILE = ("timing/", "perf/", "async/", "memory/")  # wall-clock keys, the split run's own, memory handover


def overrides(warm, run_dir, *extra):
    cfg, model, data = warm
    return grpo_overrides(cfg, model, data) + [
        f"trainer.run_dir={run_dir}", "trainer.loggers=[jsonl]", "trainer.quiet=true", "trainer.eval_every=0",
        "data.val_max_samples=32", *extra,
    ]  # fmt: skip


def stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def test_split_placement_with_staleness_0_equals_the_synchronous_run_bitwise(warm, tmp_path):
    from flowrl.drivers import grpo

    # LoRA adapters on the policy: the colocated run sends vLLM merged weights (actor.lora.sync=merged),
    # the split run's weight transfer sends the same merged tensors under the base model's names.
    # The colocated run also hands the device over (actor.offload): its trainer state leaves and comes
    # back around every generation. Neither may change a number.
    lora = ["actor.lora.rank=8", "actor.lora.alpha=16", "actor.lora.target_modules=all-linear", "actor.optim.lr=1e-3"]
    sync = ["trainer.total_steps=3", *lora, "actor.lora.sync=merged", "actor.offload=true"]
    grpo.main(load_config(None, overrides(warm, tmp_path / "sync", *sync)))
    split = ["trainer.total_steps=3", *lora, "placement.rollout_workers=1", "placement.max_staleness=0"]
    grpo.main(load_config(None, overrides(warm, tmp_path / "split", *split)))
    sync, k0 = read_metrics(str(tmp_path / "sync")), read_metrics(str(tmp_path / "split"))
    assert [r["step"] for r in k0] == [r["step"] for r in sync] == [0, 1, 2, 3, 3]
    assert stable(k0) == stable(sync)
    assert all(r["memory/offloaded_gib"] > 0 for r in sync if "actor/pg_loss" in r)
    steps = [r for r in k0 if "actor/pg_loss" in r]
    assert all(r["async/staleness_max"] == 0 and r["async/swaps"] == 0 for r in steps)
    assert steps[0]["reward/mean"] > 0 and "async/rollout_idle_frac" in steps[0]
    assert all(r["actor/grad_norm"] > 0 for r in steps)  # the adapters move
    assert all(r["rollout/logprob_diff_max"] < 1e-3 for r in steps)  # the merged weights reached vLLM


def start(warm, run_dir, *extra):
    return launch("recipes/grpo_arithmetic_tiny.yaml", overrides(warm, run_dir, *extra), run_dir)


def saved_step(run_dir) -> int:
    latest = find_latest(Path(run_dir) / "checkpoints")
    return latest.step if latest is not None else 0


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks


def busy(pid: int, window_s: float = 0.1) -> bool:
    """Whether ``pid`` used at least half a CPU over the next ``window_s`` seconds."""
    before = cpu_ticks(pid)
    time.sleep(window_s)
    return cpu_ticks(pid) - before >= 0.5 * window_s * os.sysconf("SC_CLK_TCK")


def kill_after_checkpoint(proc, run_dir, step: int, side: str) -> tuple[int, float, str]:
    """SIGKILL the ``side`` process ("rollout" or "workers" rank 1) once step ``step`` is saved and
    the process is at work (``busy``: the rollout worker mid-generation, the trainer rank mid-step);
    returns the run's exit status, seconds from the kill to its end, and its last error line."""
    deadline = time.monotonic() + 400
    while saved_step(run_dir) < step:
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before step {step} was saved"
        assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.05)
    pid = json.loads((Path(run_dir) / "processes.json").read_text())[side][-1]
    while not busy(pid):  # generating (the rollout worker) or computing (a trainer rank), not waiting
        assert proc.poll() is None and time.monotonic() < deadline, "the process never got busy"
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    status = finish(proc, timeout=120)
    lines = [ln for ln in (Path(run_dir) / "stderr.txt").read_text().splitlines() if ln.startswith("flowrl train:")]
    return status, time.monotonic() - killed_at, lines[-1] if lines else ""


def test_asynchronous_run_learns_bounds_staleness_and_survives_killed_workers(warm, tmp_path):
    run = tmp_path / "run"
    split = ["trainer.total_steps=12", "trainer.save_every=1", "placement.rollout_workers=1", "placement.max_staleness=2"]
    status, seconds, line = kill_after_checkpoint(start(warm, run, *split), run, 3, "rollout")
    assert status == 1 and seconds < 60, (status, seconds, line)
    assert "role 'rollout' rank 0" in line and "died" in line, line  # the side that died is named
    status, seconds, line = kill_after_checkpoint(start(warm, run, *split, "trainer.resume=auto"), run, 7, "workers")
    assert status == 1 and seconds < 60, (status, seconds, line)
    assert "role 'actor' rank 1" in line and "died" in line, line
    assert finish(start(warm, run, *split, "trainer.resume=auto")) == 0
    rows = {r["step"]: r for r in read_metrics(str(run)) if "actor/pg_loss" in r}  # a resume logs a step again
    assert sorted(rows) == list(range(1, 13))
    # no token older than the bound, and the rollout did run ahead of the trainer
    assert all(r["async/staleness_max"] <= 2 for r in rows.values()), [r["async/staleness_max"] for r in rows.values()]
    assert max(r["async/staleness_max"] for r in rows.values()) >= 1
    assert sum(r["async/staleness_0"] for r in rows.values()) < len(rows)
    first = sum(rows[s]["reward/mean"] for s in (1, 2, 3)) / 3
    last = sum(rows[s]["reward/mean"] for s in (10, 11, 12)) / 3
    assert last > first + 0.1, (first, last)
    final = [r for r in read_metrics(str(run)) if "val/accuracy" in r][-1]
    before = next(r["val/accuracy_before"] for r in read_metrics(str(run)) if "val/accuracy_before" in r)
    assert final["val/accuracy"] > before, (before, final["val/accuracy"])
