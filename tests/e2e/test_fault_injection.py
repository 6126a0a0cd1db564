"""Fault injection on real runs of ``flowrl train`` (subprocesses; real Ray, FSDP2, vLLM on CPU).

1. Bitwise resume, with LoRA adapters on the policy (only A and B train; the checkpoint holds them,
   their optimizer state and the frozen base) and a reward that varies within a group, so every
   step moves the adapters: an uninterrupted 5-step run is the reference. A second run is SIGKILLed
   while it saves the step-3 checkpoint, resumed (from step 2, an epoch boundary: 16
   prompts, 8 per step), stopped by Ctrl-C (SIGINT to its process group, as a terminal sends it)
   during step 3 (the step finishes and is saved), and
   resumed again with a larger ``trainer.total_steps`` (4 -> 5). Every metrics row after
   step 2 must equal the reference's bitwise (timing and throughput keys excluded), and
   no step may appear twice.
2. Worker death: SIGKILL of one worker in the middle of a step stops the driver within
   60 s with a message naming the role, the rank and the cause; the last checkpoint stays
   complete and no worker process is left behind.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from flowrl.trainer.checkpoint import find_latest, list_checkpoints
from flowrl.models.tiny import make_tiny_model
from flowrl.tasks.arithmetic import write_splits
from flowrl.trainer.tracking import read_metrics
from tests.e2e.procs import finish, launch

pytestmark = pytest.mark.slow
VOLATILE = ("timing/", "perf/")  # wall-clock keys: never equal between two runs


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    make_tiny_model(root / "model", seed=0)
    return root / "model", write_splits(root / "data", n_train=16, n_test=8, level=1, seed=0)


def start(assets, run_dir, *overrides):
    model, splits = assets
    return launch("recipes/grpo_arithmetic_tiny.yaml", [
        f"actor.model.path={model}", f"data.train_files=[{splits['train']}]",
        f"data.val_files=[{splits['test']}]", f"trainer.run_dir={run_dir}", "data.val_max_samples=4",
        "trainer.loggers=[jsonl]", "trainer.save_every=1", "trainer.keep_last=2", *overrides,
    ], run_dir)  # fmt: skip


def wait_for(proc, condition, timeout=400.0, poll=0.01):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before the awaited moment"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(poll)


def logged_steps(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [r["step"] for r in read_metrics(str(run_dir)) if "actor/pg_loss" in r] if path.exists() else []


def worker_pids(run_dir):
    return json.loads((Path(run_dir) / "processes.json").read_text())["workers"]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split()[2] != "Z"


def stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


# the full-parameter path resumes bitwise in test_ppo_resume_restores_critic_and_kl_controller_bitwise (below)
# and in test_sft_rm_resume.py
LORA = [
    "actor.lora.rank=4", "actor.lora.alpha=8", "actor.lora.target_modules=all-linear", "actor.optim.lr=1e-2",
    "reward.function=tests.e2e.dapo_rewards:half_all_equal",
]  # fmt: skip


def test_sigkill_mid_save_then_ctrl_c_then_longer_run_resume_bitwise(assets, tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"

    # SIGKILL the driver (and its process group) while it writes the step-3 checkpoint
    proc = start(assets, run, "trainer.total_steps=4", *LORA)
    wait_for(proc, lambda: (run / "checkpoints" / "step_00000003.tmp").exists(), poll=0.002)
    pids = worker_pids(run)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert find_latest(run / "checkpoints").step == 2  # the half-written step 3 is never loaded
    gone_by = time.monotonic() + 30
    while any(alive(pid) for pid in pids) and time.monotonic() < gone_by:
        time.sleep(0.5)
    assert not any(alive(pid) for pid in pids), "workers outlived their killed driver and its Ray node"

    # resume (step 2: an epoch boundary) and press Ctrl-C during step 3
    proc = start(assets, run, "trainer.total_steps=4", "trainer.resume=auto", "trainer.save_every=0", *LORA)
    wait_for(proc, lambda: "resumed from" in (run / "stderr.txt").read_text())  # step 3 starts now
    pids = worker_pids(run)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the driver's whole process group
    assert finish(proc) == 130
    stderr = (run / "stderr.txt").read_text()
    assert "stopped by the user after step 3; checkpoint" in stderr and "trainer.resume=auto" in stderr
    assert find_latest(run / "checkpoints").step == 3
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [2, 3]  # keep_last=2
    assert not any(alive(pid) for pid in pids), "worker processes outlived the driver"

    # resume with more steps than the first attempt asked for; the uninterrupted reference run goes
    # alongside (after the kill and the Ctrl-C, whose timing stays their own)
    uninterrupted = start(assets, reference, "trainer.total_steps=5", *LORA)
    assert finish(start(assets, run, "trainer.total_steps=5", "trainer.resume=auto", *LORA)) == 0
    assert finish(uninterrupted) == 0
    ref_rows, rows = read_metrics(str(reference)), read_metrics(str(run))
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [0, 1, 2, 3, 4, 5, 5]
    assert stable(rows) == stable(ref_rows)
    assert rows[3]["step"] == 3 and ref_rows[3]["reward/mean"] == rows[3]["reward/mean"]
    assert all(r["actor/grad_norm"] > 0 for r in rows if "actor/grad_norm" in r)  # the adapters did move
    assert all(r["rollout/logprob_diff_max"] < 1e-3 for r in rows if "rollout/logprob_diff_max" in r)


def test_a_killed_worker_stops_the_run_within_60_s_naming_role_rank_and_cause(assets, tmp_path):
    run = tmp_path / "run"
    proc = start(assets, run, "trainer.total_steps=4")
    wait_for(proc, lambda: find_latest(run / "checkpoints") is not None)  # step 1 saved: step 2 under way
    pids = worker_pids(run)
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    status = finish(proc, timeout=120)
    elapsed = time.monotonic() - killed_at
    first = [ln for ln in (run / "stderr.txt").read_text().splitlines() if ln.startswith("flowrl train:")]
    assert status == 1 and elapsed < 60, (status, elapsed)
    assert "role 'actor' rank 1: the worker process died" in first[0], first
    latest = find_latest(run / "checkpoints")
    assert f"last checkpoint: {latest.path}" in first[0]
    assert (Path(latest.path) / "actor" / ".metadata").is_file()
    time.sleep(2)
    assert not any(alive(pid) for pid in pids), "worker processes outlived the driver"


def test_ppo_resume_restores_critic_and_kl_controller_bitwise(assets, tmp_path):
    """In-process (one Ray runtime for both runs): PPO with a critic and an adaptive KL
    controller; resuming from the step-1 checkpoint repeats step 2 exactly."""
    from flowrl.drivers import ppo
    from flowrl.config import load_config

    model, splits = assets
    run = tmp_path / "run"

    def cfg(*extra):
        return load_config("recipes/ppo_arithmetic_tiny.yaml", [
            f"actor.model.path={model}", f"critic.model.path={model}", f"data.train_files=[{splits['train']}]",
            f"trainer.run_dir={run}", "trainer.total_steps=2", "trainer.save_every=1", "trainer.loggers=[jsonl]",
            "data.val_max_samples=0", *extra,
        ])

    ppo.main(cfg())
    first = read_metrics(str(run))
    step1 = run / "checkpoints" / "step_00000001"
    state = json.loads((step1 / "driver.json").read_text())
    assert (step1 / "critic" / ".metadata").is_file() and (step1 / "worker_rng" / "rank1.pt").is_file()
    assert state["state"]["kl_ctrl"]["value"] != 0.01  # the adaptive coefficient moved during step 1
    ppo.main(cfg(f"trainer.resume={step1}"))
    again = read_metrics(str(run))
    assert [r["step"] for r in again] == [r["step"] for r in first] == [0, 1, 2, 2]
    assert stable(again) == stable(first)
    assert "critic/grad_norm" in again[2] and "kl_reward/kl" in again[2]
