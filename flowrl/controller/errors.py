"""The one exception a group call raises when a worker fails."""

from __future__ import annotations

from typing import Any


class WorkerError(RuntimeError):
    """A worker method raised, its process died, or its group was shut down after a failure.

    The message names the class, role, method and rank, and carries the worker's own
    traceback; the fields repeat them for code that wants to branch on them.
    """

    def __init__(
        self,
        message: str,
        *,
        method: str = "",
        role: str = "",
        rank: int = -1,
        remote_type: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.role = role
        self.rank = rank
        self.remote_type = remote_type  # the worker exception's class name, e.g. "ValueError"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields do not survive the default exception pickling; Ray pickles
        # this on the worker and unpickles it in the driver.
        fields = (self.method, self.role, self.rank, self.remote_type)
        return (_rebuild, (self.message, *fields))

    def __str__(self) -> str:
        return self.message


def _rebuild(message: str, method: str, role: str, rank: int, remote_type: str) -> WorkerError:
    return WorkerError(message, method=method, role=role, rank=rank, remote_type=remote_type)
