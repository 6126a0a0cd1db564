"""Which driver runs a recipe, and what it asks of the recipe.

``trainer.algorithm`` is a built-in short name (``grpo``, ``ppo``, ...) or the dotted path of
any importable module (``my_pkg.my_algo``). A driver module has

- ``main(cfg) -> dict[str, float]``: the program (usually ``loop.run(cfg, train_step)``);
- ``SPEC = DriverSpec(...)`` (optional): what the driver needs and provides, which config
  validation asks instead of special-casing algorithms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from flowrl.plugins import PluginError, import_module

BUILTIN_DRIVERS: dict[str, str] = {
    "ppo": "flowrl.drivers.ppo",
    "grpo": "flowrl.drivers.grpo",
    "remax": "flowrl.drivers.remax",
    "rloo": "flowrl.drivers.rloo",
    "reinforce_pp": "flowrl.drivers.reinforce_pp",
    "distill": "flowrl.drivers.distill",
}
CRITIC_NEEDS = ("optional", "required", "never")


@dataclass(frozen=True)
class DriverSpec:
    """What a driver needs from the recipe and what it adds to the batch."""

    critic: str = "optional"  # required: refuses critic.enable=false; never: refuses critic.enable=true
    kl_in_reward: bool = False  # applies algorithm.use_kl_in_reward (else the option is refused)
    provides: tuple[str, ...] = ()  # batch keys the driver adds before the advantage estimator runs
    teacher: bool = False  # scores samples with a teacher (teacher.path required); else a teacher is refused

    def __post_init__(self) -> None:
        if self.critic not in CRITIC_NEEDS:
            raise ValueError(f"DriverSpec(critic={self.critic!r}): one of {', '.join(CRITIC_NEEDS)}")


@dataclass(frozen=True)
class Driver:
    name: str  # as the recipe wrote it
    module: ModuleType
    spec: DriverSpec
    main: Callable[[Any], Mapping[str, float]]


def load_driver(name: str) -> Driver:
    """The driver ``trainer.algorithm`` names; raises ``PluginError`` (one line) if there is none."""
    what = "trainer.algorithm"
    if name in BUILTIN_DRIVERS:
        module = import_module(BUILTIN_DRIVERS[name], what)
    elif "." in name:
        module = import_module(name, what)
    else:
        raise PluginError(
            f"{what}={name!r}: known drivers are {', '.join(sorted(BUILTIN_DRIVERS))}, "
            "or name your own by module path (my_pkg.my_algo)"
        )
    main = getattr(module, "main", None)
    if not callable(main):
        raise PluginError(f"{what}={name!r}: module {module.__name__!r} has no main(cfg) function")
    spec = getattr(module, "SPEC", DriverSpec())
    if not isinstance(spec, DriverSpec):
        raise PluginError(f"{what}={name!r}: {module.__name__}.SPEC is a {type(spec).__name__}, not a DriverSpec")
    return Driver(name, module, spec, main)
