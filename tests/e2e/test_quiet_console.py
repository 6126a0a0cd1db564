"""A real ``flowrl train`` run (subprocess; Ray, FSDP2, vLLM on CPU) keeps the console to flowrl's
own lines: the workers' output (vLLM, torch, Ray) goes to RUN_DIR/logs/worker_<rank>.log, unless
``trainer.worker_logs=console``."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flowrl.models.tiny import make_tiny_model
from flowrl.tasks.arithmetic import write_splits

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
# what vLLM, Ray, torch and transformers print (none of it is flowrl's)
NOISE = ("WARNING", "Warning", "INFO", "(WorkerHost pid=", "pid=", "vllm", "vLLM", "Loading weights")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    make_tiny_model(root / "model", seed=0)
    return root / "model", write_splits(root / "data", n_train=16, n_test=8, level=1, seed=0)


def train(assets, run_dir, *overrides) -> tuple[int, list[str]]:
    """Run 2 steps; the exit status and the console lines (stdout and stderr together)."""
    model, splits = assets
    args = [
        sys.executable, "-m", "flowrl.cli", "train", "recipes/grpo_arithmetic_tiny.yaml",
        f"actor.model.path={model}", f"data.train_files=[{splits['train']}]",
        f"data.val_files=[{splits['test']}]", f"trainer.run_dir={run_dir}", "data.val_max_samples=4",
        "trainer.total_steps=2", *overrides,
    ]  # fmt: skip
    # vLLM at its default INFO level whatever an earlier in-process run left in os.environ
    # (flowrl quickstart sets VLLM_LOGGING_LEVEL=WARNING for its own workers)
    env = os.environ | {
        "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "INFO",
    }  # fmt: skip
    done = subprocess.run(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    return done.returncode, done.stdout.splitlines()


def is_flowrls(line: str) -> bool:
    """Start-up lines, the progress bar and step lines, the result line (``key=value | ...``)."""
    result_line = re.fullmatch(r"[\w/]+=\S+( \| [\w/]+=\S+)*", line)
    return line.startswith(("flowrl: ", "step")) or result_line is not None


def test_by_default_the_console_shows_only_flowrls_lines(assets, tmp_path):
    status, lines = train(assets, tmp_path / "run")
    assert status == 0, "\n".join(lines)
    noise = [ln for ln in lines if any(mark in ln for mark in NOISE)]
    assert noise == [], f"{len(noise)} of {len(lines)} console lines are not flowrl's:\n" + "\n".join(noise)
    assert [ln for ln in lines if ln.strip() and not is_flowrls(ln)] == []
    logs = tmp_path / "run" / "logs"
    assert lines[:4] == [
        "flowrl: starting Ray ...",
        "flowrl: starting 2 workers (actor), 1 CPU thread each (from OMP_NUM_THREADS) ...",
        f"flowrl: worker output: {logs}/worker_{{0..1}}.log (trainer.worker_logs=console shows it here)",
        lines[3],
    ]
    assert re.fullmatch(r"flowrl: workers ready in \d+\.\d s \(Ray: \d+\.\d s\)", lines[3]), lines[3]
    assert any(ln.startswith("step") and "reward/mean=" in ln for ln in lines)  # per-step summaries
    assert sorted(p.name for p in logs.iterdir()) == ["worker_0.log", "worker_1.log"]
    for rank in (0, 1):
        text = (logs / f"worker_{rank}.log").read_text()
        assert f"flowrl: rank {rank}, torch threads: 1" in text
        assert "Loading weights" in text and "INFO" in text  # vLLM's and transformers' output, here instead


def test_worker_logs_console_shows_the_workers_output(assets, tmp_path):
    status, lines = train(assets, tmp_path / "run", "trainer.worker_logs=console")
    assert status == 0, "\n".join(lines)
    assert any("(WorkerHost pid=" in ln and "INFO" in ln for ln in lines)
    assert not (tmp_path / "run" / "logs").exists()
    assert "flowrl: worker output:" not in "\n".join(lines)
