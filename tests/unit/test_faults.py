"""The NaN/Inf guard, Ctrl-C handling and how ``flowrl train`` reports each failure."""

import math
import os
import signal

import pytest

from flowrl.controller.errors import WorkerError
from flowrl.trainer.faults import (
    BadStepGuard,
    GracefulStop,
    RunInterrupted,
    TrainingDiverged,
    is_bad,
    run_training,
    worker_failure_line,
)
from flowrl.trainer.preflight import InputError


class Usage(ValueError):
    pass


@pytest.mark.parametrize(
    "metrics, bad",
    [
        ({"actor/skipped": 0.0, "actor/pg_loss": 0.3}, False),
        ({"actor/skipped": 0.25, "actor/pg_loss": 0.3}, True),  # one mini-batch of four skipped
        ({"actor/skipped": 0.0, "critic/skipped": 1.0}, True),
        ({"actor/skipped": 0.0, "actor/loss": math.nan}, True),
        ({"actor/skipped": 0.0, "actor/pg_loss": math.inf}, True),
    ],
)
def test_bad_step(metrics, bad):
    assert is_bad(metrics) is bad


def test_guard_counts_and_stops_after_max_in_a_row():
    guard = BadStepGuard(max_bad_steps=2)
    seen = []
    for step, skipped in enumerate([1.0, 0.0, 1.0, 0.0, 1.0], start=1):
        m = guard.count({"actor/skipped": skipped})
        guard.check(step, "ck")
        seen.append((m["train/bad_step"], m["train/bad_steps_in_a_row"], m["train/bad_steps_total"]))
    assert seen == [(1, 1, 1), (0, 0, 1), (1, 1, 2), (0, 0, 2), (1, 1, 3)]  # never two in a row
    guard.count({"actor/skipped": 1.0})
    with pytest.raises(TrainingDiverged, match=r"steps 5-6: 2 steps in a row .*max_bad_steps=2.*checkpoint: ck"):
        guard.check(6, "ck")


def test_guard_zero_never_stops():
    guard = BadStepGuard(max_bad_steps=0)
    for step in range(1, 20):
        guard.count({"actor/skipped": 1.0})
        guard.check(step, None)
    assert guard.in_a_row == 19


def test_first_sigint_requests_a_stop_second_interrupts():
    previous = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_sigterm_requests_a_stop():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested


DEATH = (
    "ActorRollout.update (role 'actor') failed on rank 1 of 2: its worker process died (a crash, os._exit or "
    "an out-of-memory kill; see the Ray logs):\nThe actor died unexpectedly before finishing this task.\n"
    "\tclass_name: WorkerHost\nWorker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits "
    "with a connection error code 2. End of file. There are some potential root causes."
)


def test_worker_death_line_names_role_rank_method_and_cause():
    e = WorkerError(DEATH, method="update", role="actor", rank=1, remote_type="ActorDiedError")
    assert worker_failure_line(e) == (
        "role 'actor' rank 1: the worker process died in update (SYSTEM_ERROR; Worker unexpectedly exits "
        "with a connection error code 2)"
    )
    raised = WorkerError("Critic.update (role 'critic') failed on rank 0 of 2: ValueError: boom\n\ntraceback...")
    assert worker_failure_line(raised) == "Critic.update (role 'critic') failed on rank 0 of 2: ValueError: boom"


def _cfg(tmp_path):
    from types import SimpleNamespace

    return SimpleNamespace(trainer=SimpleNamespace(run_dir=str(tmp_path)))


def _raiser(error):
    def main(cfg):
        raise error

    return main


def test_run_training_exit_codes_and_messages(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    assert run_training(lambda c: {"val/accuracy": 0.5}, cfg, Usage) == 0
    assert "val/accuracy=0.5" in capsys.readouterr().out
    with pytest.raises(Usage, match="no such folder"):
        run_training(_raiser(InputError("actor.model.path=x: no such folder")), cfg, Usage)
    assert run_training(_raiser(RunInterrupted(3, "/ck/step_00000003")), cfg, Usage) == 130
    assert capsys.readouterr().err.strip() == (
        "flowrl train: stopped by the user after step 3; checkpoint /ck/step_00000003; "
        "continue with trainer.resume=auto"
    )
    assert run_training(_raiser(KeyboardInterrupt()), cfg, Usage) == 130
    assert "interrupted; the workers were shut down" in capsys.readouterr().err
    assert run_training(_raiser(TrainingDiverged("steps 1-3: ...")), cfg, Usage) == 1
    assert capsys.readouterr().err.strip() == "flowrl train: steps 1-3: ..."
    e = WorkerError(DEATH, method="update", role="actor", rank=1)
    assert run_training(_raiser(e), cfg, Usage) == 1
    first = capsys.readouterr().err.strip().splitlines()[0]
    assert first.startswith("flowrl train: role 'actor' rank 1: the worker process died in update")
    assert first.endswith("last checkpoint: none")


def test_reward_workers_ignore_a_terminal_ctrl_c():
    """A terminal's Ctrl-C reaches the reward processes too; they must not die mid-step."""
    import time

    from flowrl.rewards.pool import CallPool
    from tests.unit.misbehaving_rewards import ok_fn

    pool = CallPool(1)
    try:
        first = pool.run([(ok_fn, ("q", "1", "1", {}))], timeout_s=30)
        pid = pool._workers[0].process.pid
        os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        second = pool.run([(ok_fn, ("q", "1", "1", {}))], timeout_s=30)
        assert first[0].status == second[0].status == "ok"
        assert pool._workers[0].process.pid == pid and pool._workers[0].process.poll() is None
    finally:
        pool.close()


def test_the_automatic_hang_timeout_follows_the_slowest_step():
    from types import SimpleNamespace

    from flowrl.config import load_config
    from flowrl.trainer.placement import first_hang_timeout, hang_timeout_for
    from flowrl.trainer.runtime import Runtime

    base = ["actor.model.path=m", "data.train_files=[x.jsonl]"]
    for setting, first, after in ((None, 1800.0, [300.0, 300.0, 450.0, 450.0]), (60.0, 60.0, [60.0] * 4)):
        overrides = base + [f"trainer.hang_timeout_s={'null' if setting is None else setting}"]
        cfg = load_config("recipes/grpo_arithmetic_tiny.yaml", overrides)
        group = SimpleNamespace(hang_timeout_s=first_hang_timeout(cfg.trainer.hang_timeout_s))
        rt = Runtime(cfg=cfg, actor=group, ref=None, critic=None, train_data=None, val_data=None, rewards=None,
                     tracker=None, tokenizer=None, groups={"actor": group})  # fmt: skip
        assert group.hang_timeout_s == first
        seen = []
        for seconds in (3.0, 20.0, 45.0, 10.0):  # the timeout follows the slowest step, never shrinks
            rt.step_timed(seconds)
            seen.append(group.hang_timeout_s)
        assert seen == after
    assert hang_timeout_for(0.5) == 300.0 and hang_timeout_for(100.0) == 1000.0
