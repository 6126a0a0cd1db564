"""Workers that say where they run (importable by Ray workers, unlike a test module)."""

from __future__ import annotations

import ray

from flowrl.workers.critic import Critic


class LocatedCritic(Critic):
    """The critic, able to say which Ray node runs it."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()
