"""What the training loop does when a step goes wrong or the user stops the run.

- ``BadStepGuard``: an update whose loss or gradient is NaN/Inf is skipped by the engine
  (``optimizer_step``: no parameter, optimizer or schedule change) and reported as
  ``*/skipped``; the guard counts such steps (``train/bad_step``,
  ``train/bad_steps_in_a_row``, ``train/bad_steps_total``) and stops the run with
  ``TrainingDiverged`` after ``trainer.max_bad_steps`` in a row.
- ``GracefulStop``: the first SIGINT (Ctrl-C) or SIGTERM lets the current step finish,
  then the loop saves a checkpoint (``trainer.save_on_interrupt``) and raises
  ``RunInterrupted``; a second SIGINT stops at once (``KeyboardInterrupt``). Either way
  the workers are shut down by the loop's ``finally``. SIGUSR1 asks for a checkpoint
  after the current step, and training goes on (a checkpoint on demand).
"""

from __future__ import annotations

import _thread
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

SKIP_KEYS = ("actor/skipped", "critic/skipped", "train/skipped")


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a NaN/Inf loss or gradient."""


class RewardsFailing(TrainingDiverged):
    """Every reward call failed in too many steps in a row: training on all-zero rewards is no training."""


class RewardFailureGuard:
    """Counts steps whose every reward call failed (``reward/failed_frac`` == 1); ``max_steps`` in
    a row stop the run (0: never)."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.in_a_row = 0

    def count(self, metrics: Mapping[str, float]) -> None:
        failed = metrics.get("reward/failed_frac", 0.0) >= 1.0
        self.in_a_row = self.in_a_row + 1 if failed else 0

    def check(self, step: int) -> None:
        if self.max_steps > 0 and self.in_a_row >= self.max_steps:
            raise RewardsFailing(
                f"steps {step - self.in_a_row + 1}-{step}: every reward call failed, {self.in_a_row} steps in a row "
                f"(trainer.max_reward_failure_steps={self.max_steps}); the reward function is broken: see the "
                "'reward calls failed' warnings above and fix reward.function / reward.by_source"
            )


class RunInterrupted(RuntimeError):
    """The user stopped the run (Ctrl-C / SIGTERM) between two steps."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint"
        super().__init__(
            f"stopped by the user after step {step}; {where}"
            + ("; continue with trainer.resume=auto" if checkpoint else "")
        )
        self.step, self.checkpoint = step, checkpoint


def is_bad(metrics: Mapping[str, float]) -> bool:
    """A step whose update was (partly) skipped, or whose losses are not finite."""
    skipped = any(metrics.get(k, 0.0) > 0 for k in SKIP_KEYS)
    losses = [v for k, v in metrics.items() if k.endswith(("/loss", "/pg_loss"))]
    return skipped or not all(math.isfinite(v) for v in losses)


class BadStepGuard:
    """Counts steps with NaN/Inf updates; ``max_bad_steps`` in a row stop the run (0: never)."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.in_a_row = 0
        self.total = 0

    def count(self, metrics: dict[str, float]) -> dict[str, float]:
        """The step's metrics with the three ``train/bad_*`` counters added."""
        bad = is_bad(metrics)
        self.in_a_row = self.in_a_row + 1 if bad else 0
        self.total += int(bad)
        return metrics | {
            "train/bad_step": float(bad),
            "train/bad_steps_in_a_row": float(self.in_a_row),
            "train/bad_steps_total": float(self.total),
        }

    def check(self, step: int, checkpoint: str | None) -> None:
        """Raise ``TrainingDiverged`` once ``max_bad_steps`` steps in a row were bad."""
        if self.max_bad_steps > 0 and self.in_a_row >= self.max_bad_steps:
            raise TrainingDiverged(
                f"steps {step - self.in_a_row + 1}-{step}: {self.in_a_row} steps in a row had a NaN/Inf loss "
                f"or gradient (their updates were skipped; trainer.max_bad_steps={self.max_bad_steps}); "
                f"last good checkpoint: {checkpoint or 'none'}. Lower the learning rate or check the "
                "rewards and data, then continue with trainer.resume=auto"
            )


class StopTimedOut(KeyboardInterrupt):
    """The step under way did not finish within the grace period after a stop signal."""


class GracefulStop:
    """``with GracefulStop(grace_s) as stop:`` ... ``if stop.requested:`` save and leave.

    Installs handlers for SIGINT and SIGTERM in the main thread (elsewhere it does
    nothing) and puts the previous ones back on exit. The first SIGINT/SIGTERM asks the
    loop to stop after the step under way (which then saves); if that step has not ended
    ``grace_s`` seconds later (a stuck rank, a long step), the main thread is interrupted
    (``StopTimedOut``), so a scheduler's SIGTERM always ends the run promptly. A second
    SIGINT or SIGTERM interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, grace_s: float = 120.0) -> None:
        self.grace_s = grace_s
        self.requested = False
        self.save_requested = False  # SIGUSR1: checkpoint after this step and go on
        self._previous: dict[int, Any] = {}
        self._timer: threading.Timer | None = None
        self._timed_out = False

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def take_save_request(self) -> bool:
        """Whether a checkpoint was asked for (SIGUSR1) since the last call."""
        asked, self.save_requested = self.save_requested, False
        return asked

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGUSR1:
            self.save_requested = True
            print("flowrl: SIGUSR1: saving a checkpoint after this step", file=sys.stderr, flush=True)
            return
        if self._timed_out:
            raise StopTimedOut(f"the step did not end within {self.grace_s:g} s of the stop signal")
        name = signal.Signals(signum).name
        if self.requested:
            print(f"flowrl: {name} again: stopping now", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"flowrl: {name}: stopping after this step, at most {self.grace_s:g} s from now "
            "(Ctrl-C again to stop now)",
            file=sys.stderr,
            flush=True,
        )
        if self.grace_s > 0:
            self._timer = threading.Timer(self.grace_s, self._out_of_time)
            self._timer.daemon = True
            self._timer.start()

    def _out_of_time(self) -> None:
        print(f"flowrl: the step did not end within {self.grace_s:g} s of the stop signal; stopping now",
              file=sys.stderr, flush=True)  # fmt: skip
        self._timed_out = True
        _thread.interrupt_main(signal.SIGINT)  # runs _handle in the main thread

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def worker_failure_line(error: Any) -> str:
    """One line naming the role, rank, method and cause of a ``WorkerError``."""
    message = str(error)
    first = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    if "process died" not in first:
        return first
    exit_type = re.search(r"[Ww]orker exit type: (\w+)", message)
    detail = re.search(r"[Ww]orker exit detail: ([^\n]+?)(?:\.\s|\n|$)", message)
    cause = "; ".join(m.group(1) for m in (exit_type, detail) if m)
    return f"role {error.role!r} rank {error.rank}: the worker process died in {error.method}" + (
        f" ({cause})" if cause else ""
    )


def run_training(main: Callable[[Any], Mapping[str, float]], cfg: Any, usage_error: type[Exception]) -> int:
    """``flowrl train``'s call of a driver: the result line, or each failure as a short report.

    Exit status: 0 done; 2 a bad input (``usage_error``, raised); 130 stopped by the user;
    1 a worker failure or a diverged run (the message names the last checkpoint).
    """
    from flowrl.trainer.checkpoint import CHECKPOINTS, find_latest
    from flowrl.controller.errors import WorkerError
    from flowrl.trainer.preflight import InputError

    def say(line: str) -> None:
        print(f"flowrl train: {line}", file=sys.stderr, flush=True)

    try:
        result = main(cfg)
    except InputError as e:
        raise usage_error(str(e)) from None
    except RunInterrupted as e:
        say(str(e))
        return 130
    except KeyboardInterrupt:
        say("interrupted; the workers were shut down and the step under way was not saved")
        return 130
    except TrainingDiverged as e:
        say(str(e))
        return 1
    except WorkerError as e:
        last = find_latest(os.path.join(cfg.trainer.run_dir, CHECKPOINTS))
        say(f"{worker_failure_line(e)}; last checkpoint: {last.path if last else 'none'}")
        print(f"\n{e}", file=sys.stderr)
        return 1
    print(" | ".join(f"{k}={v:.4g}" for k, v in result.items()))
    return 0
