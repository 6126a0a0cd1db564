"""Run reward functions with a hard per-call time limit.

A Python thread cannot be stopped, so calls run in worker processes: each worker takes
one call at a time, and a worker that runs past its deadline is killed (SIGKILL) and
replaced; the other calls carry on. A worker that dies mid-call is replaced the same way.
``num_workers=0`` runs calls inline instead, bounded by ``SIGALRM`` when called from the
main thread (a C extension that never returns to the interpreter is only stopped by a
worker process).

Workers are fresh interpreters running this module (``python -m flowrl.rewards.pool``)
over a socket, not ``multiprocessing`` children: they neither inherit the parent's
threads (fork) nor re-run its ``__main__`` script (spawn/forkserver re-import it, which
costs seconds for a driver that imports torch), so a replacement starts in well under a
second (0.26 s for two workers plus 4 calls, measured on the 2-core dev machine). They
see the parent's ``sys.path``; a worker whose parent is gone exits by itself. This module
imports only the standard library so that workers start fast.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

log = logging.getLogger(__name__)

Call = tuple[Callable[..., Any], tuple[Any, ...]]
# Time a worker may take to receive a call (unpickling imports the function's module);
# the call's own timeout starts when the worker reports it has begun.
LOAD_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok" | "error" | "timeout"
    value: Any  # the return value, or an error message


def _serve(conn: Connection) -> None:
    """Worker loop: receive (index, pickled (fn, args)); answer ("started", index), then
    ("done", index, status, value).

    Unpickling a call imports the function's module, which may be slow the first time;
    the "started" message tells the parent that the call's own clock starts now.
    A terminal's Ctrl-C reaches this process too (same process group): it is ignored, the
    parent decides when the pool stops.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, payload = msg
        try:
            fn, args = pickle.loads(payload)
        except Exception as e:  # e.g. the function's module is not importable here
            conn.send(("done", index, "error", f"the call could not be loaded: {_describe(e)}"))
            continue
        conn.send(("started", index))
        try:
            reply = ("done", index, "ok", fn(*args))
        except Exception as e:
            reply = ("done", index, "error", _describe(e))
        try:
            conn.send(reply)
        except Exception as e:  # the result could not be pickled
            conn.send(("done", index, "error", f"the return value could not be sent back: {_describe(e)}"))


def _describe(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(e).__name__}: {e}{where}"


class _Worker:
    """One worker interpreter and its socket; runs at most one call at a time."""

    def __init__(self) -> None:
        mine, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(os.path.abspath(p) for p in sys.path))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flowrl.rewards.pool", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self.conn = Connection(mine.detach())
        self.index: int | None = None  # the call it runs, if any
        self.started = False  # whether that call has been unpickled and begun
        self.deadline = 0.0

    def submit(self, index: int, payload: bytes) -> None:
        self.index, self.started = index, False
        self.deadline = time.monotonic() + LOAD_TIMEOUT_S
        try:
            self.conn.send((index, payload))
        except OSError:  # the worker is gone: reading its socket will report that
            pass

    def exit_code(self) -> int | None:
        try:
            return self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, kill: bool) -> None:
        if not kill:
            try:
                self.conn.send(None)
                self.process.wait(timeout=2.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5.0)
        self.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    for w in workers:
        w.stop(kill=w.index is not None)
    workers.clear()


class CallPool:
    """A fixed number of worker processes running calls with a per-call deadline."""

    def __init__(self, num_workers: int) -> None:
        if num_workers <= 0:
            raise ValueError(f"CallPool: num_workers={num_workers} must be positive (0 means inline calls)")
        self.num_workers = num_workers
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    def close(self) -> None:
        self._finalizer()

    def _replace(self, worker: _Worker) -> None:
        worker.stop(kill=True)
        self._workers[self._workers.index(worker)] = _Worker()

    def run(self, calls: Sequence[Call], timeout_s: float) -> list[Outcome]:
        """Outcome of every call, in order; never raises for a failing or hanging call."""
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker())
        outcomes: list[Outcome | None] = [None] * len(calls)
        pending = deque(range(len(calls)))
        while pending or any(w.index is not None for w in self._workers):
            for w in self._workers:
                while w.index is None and pending:
                    index = pending.popleft()
                    try:
                        payload = pickle.dumps(calls[index])
                    except Exception as e:
                        outcomes[index] = Outcome("error", f"the call could not be pickled: {_describe(e)}")
                        continue
                    w.submit(index, payload)
            if not any(w.index is not None for w in self._workers):
                break
            busy = [w for w in self._workers if w.index is not None]
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=wait_s)
            for w in busy:
                if w.conn in ready:
                    self._receive(w, outcomes, timeout_s)
                elif time.monotonic() >= w.deadline:
                    limit = timeout_s if w.started else LOAD_TIMEOUT_S
                    what = "no result" if w.started else "the call was not even received"
                    outcomes[w.index] = Outcome("timeout", f"{what} after {limit:g} s")  # type: ignore[index]
                    self._replace(w)
        return outcomes  # type: ignore[return-value]

    def _receive(self, w: _Worker, outcomes: list[Outcome | None], timeout_s: float) -> None:
        index = w.index
        assert index is not None
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            code = w.exit_code()
            outcomes[index] = Outcome("error", f"the reward worker process died (exit code {code})")
            self._replace(w)
            return
        if msg[1] != index:
            raise RuntimeError(f"CallPool: worker answered call {msg[1]} while running call {index}")
        if msg[0] == "started":
            w.started, w.deadline = True, time.monotonic() + timeout_s
            return
        outcomes[index] = Outcome(msg[2], msg[3])
        w.index = None


class _Timeout(BaseException):
    """Raised by the alarm handler; a BaseException so `except Exception` in user code can't swallow it."""


def run_inline(calls: Sequence[Call], timeout_s: float) -> list[Outcome]:
    """Run calls in this thread; SIGALRM bounds each call when this is the main thread."""
    can_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if not can_alarm:
        log.warning("reward calls run inline outside the main thread: timeouts are not enforced")
    outcomes = []
    for fn, args in calls:
        outcomes.append(_call_with_alarm(fn, args, timeout_s) if can_alarm else _call(fn, args))
    return outcomes


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Outcome:
    try:
        return Outcome("ok", fn(*args))
    except Exception as e:
        return Outcome("error", _describe(e))


def _call_with_alarm(fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> Outcome:
    def on_alarm(signum: int, frame: Any) -> None:
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    start = time.monotonic()
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return _call(fn, args)
    except _Timeout:
        return Outcome("timeout", f"no result after {timeout_s:g} s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay > 0:  # someone else's alarm (e.g. a test timeout) was pending: put it back
            left = max(outer_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


if __name__ == "__main__":
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    _serve(Connection(int(sys.argv[1])))
