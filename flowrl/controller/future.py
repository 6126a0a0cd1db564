"""DataFuture: the pending result of a non-blocking group call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

Gather = Callable[[dict[int, "ray.ObjectRef"]], dict[int, Any]]
Collect = Callable[[dict[int, Any]], Any]

_UNSET = object()


class DataFuture:
    """Per-rank ObjectRefs of one group call, and how to collect them into one result.

    ``get()`` waits for every rank (raising the first worker failure) and collects.
    Passed as an argument to a ``DP_COMPUTE`` method of a group with the same DP size, the
    per-rank ObjectRefs go straight to the matching ranks: the driver never holds the data.
    ``materialized`` says whether the driver has fetched the values.
    """

    def __init__(
        self,
        refs: dict[int, ray.ObjectRef],
        collect: Collect,
        context: Any,
        gather: Gather,
        label: str,
        upstream: list[DataFuture] | None = None,
    ) -> None:
        self.refs = refs  # rank -> ObjectRef of that rank's output
        self.context = context  # the dispatch plan's context (DP_COMPUTE: layout and padding)
        self.label = label  # e.g. "Actor.generate"
        self.materialized = False
        self._collect = collect
        self._gather = gather
        self._value: Any = _UNSET
        # Futures this call took as arguments: when it fails, a failure upstream is the cause.
        self._upstream = list(upstream or [])

    def get(self) -> Any:
        """Wait for all ranks and return the collected result (cached)."""
        if self._value is _UNSET:
            try:
                outputs = self._gather(self.refs)
            except Exception:
                for future in self._upstream:
                    future.get()  # raises the producer's own error if the producer failed
                raise
            try:
                self._value = self._collect(outputs)
            except Exception as e:
                e.add_note(f"while collecting the results of {self.label}")
                raise
            self.materialized = True
        return self._value

    def done(self) -> bool:
        """True when every rank has finished (successfully or not); never blocks."""
        refs = list(self.refs.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        return len(ready) == len(refs)

    def __reduce__(self) -> Any:
        raise TypeError(
            f"a DataFuture ({self.label}) cannot be sent to a worker inside another object: pass it as a "
            "top-level argument of a group method, or call .get() first"
        )

    def __repr__(self) -> str:
        state = "materialized" if self.materialized else ("done" if self.done() else "pending")
        return f"DataFuture({self.label}, ranks={sorted(self.refs)}, {state})"
