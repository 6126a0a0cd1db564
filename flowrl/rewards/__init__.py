"""Rule rewards: scorers, the data_source -> function registry, and a robust batch runner.

This package's ``__init__`` stays free of heavy imports (torch) because reward worker
processes import it; ``RewardRunner``, ``compute_scores`` and ``reward_metrics`` load on
first use.
"""

from typing import Any

from flowrl.rewards.registry import DEFAULT_SOURCES, RewardConfig, RewardFn, RewardResolver, load_function

__all__ = [
    "DEFAULT_SOURCES",
    "RewardConfig",
    "RewardFn",
    "RewardResolver",
    "RewardRunner",
    "RewardStatus",
    "compute_scores",
    "load_function",
    "reward_metrics",
]

_LAZY = {"RewardRunner", "RewardStatus", "compute_scores", "reward_metrics"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from flowrl.rewards import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'flowrl.rewards' has no attribute {name!r}")
