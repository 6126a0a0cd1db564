"""A scheduler's SIGTERM stops a run promptly in every state: while a worker call is stuck,
the step under way gets ``grace_s`` and then the driver is interrupted; a second signal
interrupts at once. The driver is a subprocess (real Ray, one worker stuck in a call)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = """
import sys, time
from flowrl.controller import Dispatch, ResourcePool, Worker, WorkerGroup, init_ray, register
from flowrl.trainer.faults import GracefulStop


class Stuck(Worker):
    @register(Dispatch.ONE_TO_ALL)
    def wait(self, seconds):
        time.sleep(seconds)  # a rank stuck in a long call (a collective whose peer is gone, say)
        return self.rank


init_ray(num_cpus=2)
group = WorkerGroup(ResourcePool(1, num_cpus_per_bundle=0.5), Stuck)
print("ready", flush=True)
try:
    with GracefulStop(grace_s=float(sys.argv[1])):
        group.wait(600)
except KeyboardInterrupt as e:
    print("interrupted:", type(e).__name__, flush=True)
    group.shutdown()
    sys.exit(130)
"""


def stop_a_stuck_driver(grace_s: float, signals: int) -> tuple[int, str, float]:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(grace_s)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # the call is under way
        sent = time.monotonic()
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out + err, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sigterm_during_a_stuck_call_stops_the_driver_after_the_grace_period():
    status, output, seconds = stop_a_stuck_driver(grace_s=3.0, signals=1)
    assert status == 130 and "interrupted: " in output, output  # a KeyboardInterrupt (Ray may re-raise it plain)
    assert "stopping after this step, at most 3 s from now" in output
    assert "the step did not end within 3 s of the stop signal; stopping now" in output
    assert 3.0 <= seconds < 15.0


@pytest.mark.slow
def test_a_second_sigterm_stops_the_driver_at_once():
    status, output, seconds = stop_a_stuck_driver(grace_s=600.0, signals=2)
    assert status == 130 and "interrupted: KeyboardInterrupt" in output and "SIGTERM again" in output, output
    assert seconds < 10.0
