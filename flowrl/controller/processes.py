"""The Ray actors behind a worker group, and what happens when one of them fails."""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayError, RayTaskError

from flowrl.batch import Batch
from flowrl.controller.dispatch import Call
from flowrl.controller.errors import WorkerError
from flowrl.controller.host import RoleSpec, WorkerHost
from flowrl.controller.resource_pool import ResourcePool


class CallInfo(NamedTuple):
    cls_name: str
    role: str
    method: str

    @property
    def label(self) -> str:
        return f"{self.cls_name}.{self.method} (role {self.role!r})"


POLL_S = 0.5  # longest a wait blocks the driver's Python code


class Processes:
    """One Ray actor per bundle of a pool, each holding an instance of every role.

    Failure policy: the first rank that fails is raised at once. If other ranks of that
    call are still running ``failure_grace_s`` later (typically blocked in a collective
    that the failed rank never joined), every actor is killed so nothing hangs; later
    calls then raise at once. A failure that all ranks share leaves the group usable.

    Hangs: with ``hang_timeout_s``, once one rank of a call has returned, the others get
    that long to return too. Ranks of one call run in step (they meet in collectives), so
    ranks still running long after a peer returned are stuck (a collective the others
    left, a deadlock): the group is killed and the call raises, naming the stuck ranks.
    """

    def __init__(
        self,
        pool: ResourcePool,
        roles: dict[str, RoleSpec],
        env: Mapping[str, str] | None,
        failure_grace_s: float,
        start_timeout_s: float,
        hang_timeout_s: float | None = None,
        log_paths: list[str] | None = None,
        concurrency: int = 1,
    ) -> None:
        names = "+".join(cls.__name__ for cls, _, _ in roles.values())
        pool.claim(f"group {names}")
        self.pool = pool
        self.world_size = pool.num_bundles
        self.failure_grace_s = failure_grace_s
        self.hang_timeout_s = hang_timeout_s or None  # 0 or None: no limit
        self.dead: str | None = None
        self.log_paths = log_paths  # rank r's stdout and stderr go to log_paths[r]; None: to Ray
        host: Any = ray.remote(WorkerHost)
        # concurrency > 1: a threaded actor serving that many calls at once (a rollout worker takes
        # weights while it generates); 1: one call at a time, on the process's main thread
        threads = {"max_concurrency": concurrency} if concurrency > 1 else {}
        self.actors: list[Any] = [
            host.options(**pool.actor_options(i), **threads).remote(self.log_path(i)) for i in range(self.world_size)
        ]
        try:
            self.pids = self._start(
                roles, dict(env or {}), CallInfo(names, ",".join(roles), "__init__"), start_timeout_s
            )
        except BaseException:
            self.kill("it failed to start")
            raise

    def _start(
        self, roles: dict[str, RoleSpec], env: dict[str, str], info: CallInfo, timeout_s: float
    ) -> list[int]:
        everyone: dict[int, Call] = {rank: ((), {}) for rank in range(self.world_size)}
        nodes = self.gather(self._submit_to("node", everyone), info, timeout=timeout_s)
        master_addr = nodes[0][0]
        master_port = ray.get(self.actors[0].free_port.remote())
        local_rank, local_world = _local_ranks([nodes[r][1] for r in range(self.world_size)])
        roles_ref = ray.put(roles)  # one copy of the classes and init arguments for all ranks
        calls: dict[int, Call] = {}
        for rank in range(self.world_size):
            rank_env = {
                "RANK": str(rank),
                "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(local_rank[rank]),
                "LOCAL_WORLD_SIZE": str(local_world[rank]),
                "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(master_port),
            }
            calls[rank] = ((rank_env | env, roles_ref), {})
        pids = self.gather(self._submit_to("setup", calls), info)
        return [pids[rank] for rank in range(self.world_size)]

    def log_path(self, rank: int) -> str | None:
        return self.log_paths[rank] if self.log_paths is not None else None

    def _submit_to(self, host_method: str, calls: dict[int, Call]) -> dict[int, ray.ObjectRef]:
        return {r: getattr(self.actors[r], host_method).remote(*a, **k) for r, (a, k) in calls.items()}

    def submit(self, role: str, method: str, calls: dict[int, Call]) -> dict[int, ray.ObjectRef]:
        """Start ``role.method`` on the given ranks; returns {rank: ObjectRef}."""
        self.check_alive()
        calls = _put_shared(calls)
        return {r: self.actors[r].call.remote(role, method, *a, **k) for r, (a, k) in calls.items()}

    def gather(
        self, refs: dict[int, ray.ObjectRef], info: CallInfo, timeout: float | None = None
    ) -> dict[int, Any]:
        """Wait for every rank; the first failure is raised as soon as it is known."""
        self.check_alive()
        pending = {ref: rank for rank, ref in refs.items()}
        results: dict[int, Any] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        hang_deadline = None  # set when the first rank returns
        while pending:
            limits = [t - time.monotonic() for t in (deadline, hang_deadline) if t is not None]
            left = max(0.0, min(limits)) if limits else None
            # short waits, so the driver's signal handlers (Ctrl-C, a scheduler's SIGTERM) run promptly
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S if left is None else min(left, POLL_S))
            if not ready and left is not None and left <= POLL_S:
                raise self._timed_out(info, sorted(pending.values()), sorted(results), timeout, deadline)
            if not ready:
                continue
            if hang_deadline is None and self.hang_timeout_s is not None:
                hang_deadline = time.monotonic() + self.hang_timeout_s
            rank = pending.pop(ready[0])
            try:
                results[rank] = ray.get(ready[0])
            except RayError as e:
                error = _as_worker_error(e, rank, self.world_size, info, self.log_path(rank))
                raise self._fail(error, pending) from None
        return results

    def _timed_out(
        self, info: CallInfo, stuck: list[int], done: list[int], timeout: float | None, deadline: float | None
    ) -> WorkerError:
        """Kill the group; the error for a call that ran out of time (``timeout``) or hung."""
        if deadline is not None and time.monotonic() >= deadline:
            self.kill(f"{info.label} timed out")
            return WorkerError(
                f"{info.label}: ranks {stuck} did not answer within {timeout:g} s; the group was shut down"
            )
        self.kill(f"{info.label} hung")
        return WorkerError(
            f"{info.label}: ranks {stuck} were still running {self.hang_timeout_s:g} s after ranks "
            f"{done} had returned (hang_timeout_s); they are probably stuck, e.g. in a collective "
            "that the other ranks left or in a deadlock. The group was shut down.",
            method=info.method,
            role=info.role,
            rank=stuck[0],
        )

    def _fail(self, error: WorkerError, pending: dict[ray.ObjectRef, int]) -> WorkerError:
        """Decide what the failure means for the other ranks; returns the error to raise."""
        if not pending:
            return error
        ready, stuck = ray.wait(
            list(pending), num_returns=len(pending), timeout=self.failure_grace_s, fetch_local=False
        )
        also_failed = sorted(pending[ref] for ref in ready if _failed(ref))
        note = f"\n(ranks {also_failed} failed too.)" if also_failed else ""
        if stuck:
            stuck_ranks = sorted(pending[ref] for ref in stuck)
            self.kill(f"rank {error.rank} failed in {error.method} while ranks {stuck_ranks} waited")
            note += (
                f"\nRanks {stuck_ranks} were still running {self.failure_grace_s:g} s after this failure "
                "(probably waiting in a collective for the failed rank), "
                "so the group's processes were killed; "
                "create a new WorkerGroup to go on."
            )
        if not note:
            return error
        return WorkerError(
            error.message + note,
            method=error.method,
            role=error.role,
            rank=error.rank,
            remote_type=error.remote_type,
        )

    def check_alive(self) -> None:
        if self.dead is not None:
            raise WorkerError(f"this worker group was shut down ({self.dead}); create a new WorkerGroup")

    def kill(self, reason: str) -> None:
        if self.dead is not None:
            return
        self.dead = reason
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.pool.release()


def _failed(ref: ray.ObjectRef) -> bool:
    try:
        ray.get(ref, timeout=0)
        return False
    except RayError:
        return True


def _as_worker_error(
    e: RayError, rank: int, world_size: int, info: CallInfo, log_path: str | None = None
) -> WorkerError:
    if isinstance(e, RayTaskError) and isinstance(e.cause, WorkerError):
        return e.cause  # raised by the worker host: it already names role, method, rank and traceback
    logs = f"its output: {log_path}" if log_path else "see the Ray logs"
    if isinstance(e, RayActorError):
        what = f"its worker process died (a crash, os._exit or an out-of-memory kill; {logs})"
    else:
        what = "Ray raised an error"
    return WorkerError(
        f"{info.label} failed on rank {rank} of {world_size}: {what}:\n{e}{_log_tail(log_path)}",
        method=info.method,
        role=info.role,
        rank=rank,
        remote_type=type(e).__name__,
    )


def _log_tail(path: str | None, lines: int = 20) -> str:
    """The last ``lines`` lines of a worker's log file, as a block to append to a message."""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, errors="replace") as f:
        tail = deque(f, maxlen=lines)
    text = "".join(tail).rstrip()
    return f"\n\nLast lines of {path}:\n{text}" if text else ""


def _local_ranks(node_ids: list[str]) -> tuple[list[int], list[int]]:
    """Per rank: its index among the ranks on its node, and how many ranks share that node."""
    seen: Counter[str] = Counter()
    local = []
    for node in node_ids:
        local.append(seen[node])
        seen[node] += 1
    return local, [seen[node] for node in node_ids]


def _put_shared(calls: dict[int, Call]) -> dict[int, Call]:
    """Put each large argument that goes to several ranks into the object store once."""
    big = (Batch, torch.Tensor, np.ndarray)
    uses = Counter(id(v) for a, k in calls.values() for v in [*a, *k.values()] if isinstance(v, big))
    refs: dict[int, ray.ObjectRef] = {}

    def share(value: Any) -> Any:
        if not isinstance(value, big) or uses[id(value)] < 2:
            return value
        if id(value) not in refs:
            refs[id(value)] = ray.put(value)
        return refs[id(value)]

    return {
        r: (tuple(share(v) for v in a), {n: share(v) for n, v in k.items()}) for r, (a, k) in calls.items()
    }
