"""``flowrl train`` as a subprocess, for the tests that kill, interrupt and resume real runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def launch(recipe: str, overrides: list[str], run_dir: str | os.PathLike) -> subprocess.Popen:
    """Start ``flowrl train RECIPE OVERRIDES`` in a session of its own (so a signal can reach its
    whole process group); its stdout and stderr go to ``RUN_DIR/stderr.txt``."""
    args = [sys.executable, "-m", "flowrl.cli", "train", recipe, *overrides]
    env = os.environ | {"PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    os.makedirs(run_dir, exist_ok=True)
    with open(Path(run_dir) / "stderr.txt", "ab") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 400.0) -> int:
    """The run's exit status; one still running after ``timeout`` seconds is killed (and the test fails)."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
