"""The environment interface of multi-turn rollouts, and its registry.

An environment drives one trajectory. The rollout makes a fresh one for every sample
(``make_env``), calls ``reset`` with the sample's dataset row, then alternates: the model
writes a turn, ``step`` answers it. What ``step`` returns is inserted after the model's
turn as tokens the model reads but is not trained on (an observation), until it says
``done`` or a limit of the rollout (turns, tokens, time) ends the trajectory::

    from flowrl.envs import Environment, StepResult, register_env

    @register_env("guess")
    class Guess(Environment):
        def reset(self, row):
            self.target = int(row["reward_model"]["ground_truth"])
        def step(self, action):
            guess = int(action.strip() or 0)
            if guess == self.target:
                return StepResult(reward=1.0, done=True)
            return StepResult(observation="higher\\n" if guess < self.target else "lower\\n")

Rewards may come on any turn (``StepResult.reward``); a trajectory's score is their sum,
and each lands on the last token of the turn it answers (per-turn credit for token-level
estimators). A recipe names the environment in ``rollout.multi_turn.env`` by its
registered name or by a dotted path ``"pkg.module:Class"``; a module listed in
``trainer.plugins`` may register more. ``step`` runs in a thread of the rollout worker,
many trajectories at once: keep state on ``self``, and run anything that could hang or
misbehave (user code, tools) in a sandbox (``flowrl.envs.sandbox``) with limits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flowrl.plugins import PluginError, load_attr


@dataclass(frozen=True)
class StepResult:
    """What the environment says after one model turn."""

    observation: str | None = None  # text the model reads next (None or "": nothing inserted)
    reward: float = 0.0  # this turn's reward; the trajectory's score is the sum over turns
    done: bool = False  # the trajectory is over (no further turn is generated)
    tool_calls: int = 0  # tool calls this turn made (metrics)
    tool_errors: int = 0  # of which failed, timed out or were refused (metrics)
    info: dict[str, Any] = field(default_factory=dict)  # anything else, for the user's own logging


class Environment(ABC):
    """One trajectory's environment (module docstring). Subclasses take keyword arguments
    from ``rollout.multi_turn.env_kwargs``."""

    # Strings at which the sampler ends a model turn (e.g. a tool call's closing tag), so the
    # environment can answer before the model writes on; EOS always ends a turn.
    stop: tuple[str, ...] = ()

    def reset(self, row: dict[str, Any]) -> str | None:
        """Start a trajectory for a dataset row (``prompt``, ``reward_model``, ``extra_info``...).
        A returned string is inserted before the first model turn as an observation."""
        return None

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Answer the model's turn ``action`` (its decoded text)."""

    def close(self) -> None:
        """Release what the trajectory holds; called once it is over, whatever happened."""


ENVIRONMENTS: dict[str, type[Environment]] = {}


def register_env(name: str) -> Callable[[type[Environment]], type[Environment]]:
    """Class decorator: make an ``Environment`` selectable as ``rollout.multi_turn.env=name``."""

    def add(cls: type[Environment]) -> type[Environment]:
        if not (isinstance(cls, type) and issubclass(cls, Environment)):
            raise TypeError(f"register_env({name!r}): {cls!r} is not a subclass of flowrl.envs.Environment")
        if name in ENVIRONMENTS and ENVIRONMENTS[name] is not cls:
            raise ValueError(f"register_env: an environment named {name!r} is registered already")
        ENVIRONMENTS[name] = cls
        return cls

    return add


def env_class(name: str) -> type[Environment]:
    """The environment class registered as ``name``, or at the dotted path ``"pkg.module:Class"``."""
    _load_builtins()
    if name in ENVIRONMENTS:
        return ENVIRONMENTS[name]
    if ":" not in name:
        known = ", ".join(sorted(ENVIRONMENTS))
        raise ValueError(
            f"rollout.multi_turn.env={name!r} is not registered; known: {known} "
            "(or give a dotted path 'pkg.module:Class', or register yours in a module in trainer.plugins)"
        )
    try:
        cls = load_attr(name, "rollout.multi_turn.env", noun="class")
    except PluginError as e:
        raise ValueError(str(e)) from e.__cause__
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ValueError(f"rollout.multi_turn.env={name!r} is not a subclass of flowrl.envs.Environment")
    return cls


def make_env(name: str, kwargs: dict[str, Any] | None = None) -> Environment:
    """A fresh environment ``name`` built with ``kwargs``; a bad keyword is one clear line."""
    cls = env_class(name)
    try:
        return cls(**dict(kwargs or {}))
    except TypeError as e:
        raise ValueError(f"rollout.multi_turn.env_kwargs do not fit environment {name!r}: {e}") from None


def _load_builtins() -> None:
    """Register the environments that ship with flowrl (imported on first use)."""
    from flowrl.envs import tool_env  # noqa: F401  (registers "tools")
