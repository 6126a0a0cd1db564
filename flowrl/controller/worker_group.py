"""WorkerGroup: a group of Ray worker processes called like one object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ray

from flowrl.controller.dispatch import (
    Call,
    Dispatch,
    DPLayout,
    Execute,
    Layout,
    MethodSpec,
    as_dispatch_info,
    get_dispatch_mode,
    registered_methods,
)
from flowrl.controller.future import DataFuture
from flowrl.controller.host import RoleSpec
from flowrl.controller.processes import CallInfo, Processes
from flowrl.controller.resource_pool import ResourcePool
from flowrl.controller.worker import Worker

RoleArg = type[Worker] | tuple[Any, ...]  # Cls, (Cls,), (Cls, args) or (Cls, args, kwargs)


class WorkerGroup:
    """One Ray actor per bundle of ``pool``, each running ``worker_cls(*args, **kwargs)``.

    Every ``@register``-ed method of the worker class becomes a method of the group:
    ``group.generate(batch)`` splits or broadcasts the arguments (the method's dispatch
    mode), runs the method on the ranks, and collects the results.

    ``log_path`` (e.g. ``"run/logs/worker_{rank}.log"``, ``{rank}`` replaced by each rank)
    sends each process's stdout and stderr to its own file instead of to Ray, which
    forwards them to the driver's console; ``env`` adds variables to every process.
    """

    def __init__(
        self,
        pool: ResourcePool,
        worker_cls: type[Worker],
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        failure_grace_s: float = 3.0,
        start_timeout_s: float = 300.0,
        hang_timeout_s: float | None = None,
        log_path: str | None = None,
    ) -> None:
        spec = _role_spec(worker_cls.__name__, (worker_cls, args, dict(kwargs or {})))
        logs = rank_log_paths(log_path, pool.num_bundles)
        procs = Processes(
            pool, {worker_cls.__name__: spec}, env, failure_grace_s, start_timeout_s, hang_timeout_s, logs
        )
        self._attach(procs, worker_cls.__name__, worker_cls)

    @classmethod
    def colocated(
        cls,
        pool: ResourcePool,
        roles: Mapping[str, RoleArg],
        *,
        env: Mapping[str, str] | None = None,
        failure_grace_s: float = 3.0,
        start_timeout_s: float = 300.0,
        hang_timeout_s: float | None = None,
        log_path: str | None = None,
        concurrency: int = 1,
    ) -> dict[str, WorkerGroup]:
        """Several roles in one process per bundle; returns one group view per role.

        ``WorkerGroup.colocated(pool, {"actor": (Actor, args, kwargs), "ref": Ref})`` builds,
        in each process, an ``Actor`` and a ``Ref``; ``groups["actor"].generate(...)`` calls
        the actor role with its own dispatch modes. The roles share the process, its
        devices and its ``torch.distributed`` world; shutting one view down stops them all.
        ``log_path`` and ``env`` are those of one group (see the class); ``concurrency`` > 1 lets each
        process serve that many calls at once (threads).
        """
        specs = {role: _role_spec(role, spec) for role, spec in roles.items()}
        logs = rank_log_paths(log_path, pool.num_bundles)
        procs = Processes(pool, specs, env, failure_grace_s, start_timeout_s, hang_timeout_s, logs, concurrency)
        views = {}
        for role, (worker_cls, _, _) in specs.items():
            view = cls.__new__(cls)
            view._attach(procs, role, worker_cls)
            views[role] = view
        return views

    def _attach(self, procs: Processes, role: str, worker_cls: type) -> None:
        self._procs = procs
        self.role = role
        self.worker_cls = worker_cls
        self._layout = Layout(procs.world_size, self._query_dp_layout)
        for name, spec in registered_methods(worker_cls).items():
            setattr(self, name, GroupMethod(self, name, spec))

    # ---- what the group offers besides the worker's methods --------------------------
    @property
    def world_size(self) -> int:
        return self._procs.world_size

    @property
    def pool(self) -> ResourcePool:
        return self._procs.pool

    @property
    def hang_timeout_s(self) -> float | None:
        """Once one rank of a call returned, how long the others get (None: no limit)."""
        return self._procs.hang_timeout_s

    @hang_timeout_s.setter
    def hang_timeout_s(self, seconds: float | None) -> None:
        self._procs.hang_timeout_s = seconds or None

    @property
    def pids(self) -> list[int]:
        """Process id of each rank."""
        return list(self._procs.pids)

    @property
    def log_paths(self) -> list[str] | None:
        """The file that holds each rank's stdout and stderr; None: where Ray puts them (its session
        logs, forwarded to the driver's console unless ``ray.init(log_to_driver=False)``)."""
        return None if self._procs.log_paths is None else list(self._procs.log_paths)

    def execute_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call any method (registered or not) with the same arguments on every rank."""
        return self._submit(method, MethodSpec(Dispatch.ONE_TO_ALL), args, kwargs).get()

    def shutdown(self) -> None:
        """Kill the group's processes (all colocated roles) and free its share of the pool."""
        self._procs.kill("shut down by the driver")

    def __repr__(self) -> str:
        return f"WorkerGroup({self.worker_cls.__name__}, role={self.role!r}, world_size={self.world_size})"

    # ---- the call path -------------------------------------------------------------------
    def _submit(
        self, method: str, spec: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> DataFuture:
        mode = get_dispatch_mode(spec.dispatch)
        upstream = [v for v in [*args, *kwargs.values()] if isinstance(v, DataFuture)]
        if not mode.takes_futures:
            args = tuple(_value(a) for a in args)
            kwargs = {k: _value(v) for k, v in kwargs.items()}
        plan = mode.dispatch(self._layout, args, kwargs)
        calls, context = plan.calls, plan.context
        info = CallInfo(self.worker_cls.__name__, self.role, method)
        bad = sorted(r for r in calls if not 0 <= r < self.world_size)
        if bad:
            raise ValueError(
                f"{info.label}: dispatch mode {mode.name} planned calls on ranks {bad} of {self.world_size}"
            )
        if spec.execute == Execute.RANK_ZERO:
            if 0 not in calls:
                raise ValueError(
                    f"{info.label}: Execute.RANK_ZERO, but dispatch mode {mode.name} gives rank 0 nothing"
                )
            calls, context = {0: calls[0]}, None

        def collect(outputs: dict[int, Any]) -> Any:
            if spec.execute == Execute.RANK_ZERO:
                return outputs[0]
            return mode.collect(self._layout, outputs, plan.context)

        def gather(refs: dict[int, ray.ObjectRef]) -> dict[int, Any]:
            return self._procs.gather(refs, info)

        refs = self._procs.submit(self.role, method, calls)
        return DataFuture(refs, collect, context, gather, f"{info.cls_name}.{method}", upstream)

    def _query_dp_layout(self) -> DPLayout:
        info = CallInfo(self.worker_cls.__name__, self.role, "dispatch_info")
        everyone: dict[int, Call] = {rank: ((), {}) for rank in range(self.world_size)}
        answers = self._procs.gather(self._procs.submit(self.role, "dispatch_info", everyone), info)
        where = f"{info.cls_name}.dispatch_info"
        return DPLayout.from_infos(
            [as_dispatch_info(answers[r], where) for r in range(self.world_size)], where
        )


class GroupMethod:
    """A worker method bound on a group: calling it dispatches, runs on the ranks, collects.

    Blocking methods return the collected result; ``@register(..., blocking=False)`` ones
    return a ``DataFuture``.
    """

    def __init__(self, group: WorkerGroup, name: str, spec: MethodSpec) -> None:
        self._group = group
        self.name = name
        self.spec = spec
        self.__doc__ = getattr(group.worker_cls, name).__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        future = self._group._submit(self.name, self.spec, args, kwargs)
        return future.get() if self.spec.blocking else future

    def __repr__(self) -> str:
        return f"<group method {self._group.worker_cls.__name__}.{self.name} [{self.spec.dispatch}]>"


def _value(arg: Any) -> Any:
    return arg.get() if isinstance(arg, DataFuture) else arg


def rank_log_paths(pattern: str | None, world_size: int) -> list[str] | None:
    """``pattern`` with ``{rank}`` replaced by each rank, as absolute paths (workers may not share
    the driver's working directory)."""
    if pattern is None:
        return None
    if "{rank}" not in pattern and world_size > 1:
        raise ValueError(
            f"log_path={pattern!r}: put {{rank}} in it, so that each of the {world_size} ranks has its file"
        )
    return [os.path.abspath(pattern.replace("{rank}", str(rank))) for rank in range(world_size)]


def _role_spec(role: str, spec: RoleArg) -> RoleSpec:
    parts = spec if isinstance(spec, tuple) else (spec,)
    if not 1 <= len(parts) <= 3 or not isinstance(parts[0], type):
        raise TypeError(f"role {role!r}: give a Worker class or (cls, args, kwargs), got {spec!r}")
    worker_cls = parts[0]
    args = parts[1] if len(parts) > 1 else ()
    kwargs = parts[2] if len(parts) > 2 else {}
    if not issubclass(worker_cls, Worker):
        raise TypeError(f"role {role!r}: {worker_cls.__name__} must subclass flowrl.controller.Worker")
    reserved = set(dir(WorkerGroup)) | {"role", "worker_cls"}  # the group's own attributes
    clashes = sorted(
        name for name in registered_methods(worker_cls) if name in reserved or name.startswith("_")
    )
    if clashes:
        raise ValueError(
            f"role {role!r}: {worker_cls.__name__} registers {clashes}, "
            "which WorkerGroup itself uses; rename them"
        )
    for name, method in registered_methods(worker_cls).items():
        try:
            get_dispatch_mode(method.dispatch)
        except KeyError as e:
            raise KeyError(f"{worker_cls.__name__}.{name}: {e.args[0]}") from None
    return worker_cls, tuple(args), dict(kwargs or {})
