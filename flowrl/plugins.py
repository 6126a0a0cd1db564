"""Import user code named in a recipe: plugin modules and ``pkg.module:attr`` paths.

A plugin is any importable module (``trainer.plugins: [my_pkg.my_losses]``); importing it
runs its ``@register_estimator`` / ``@register_policy_loss`` / ``register_rollout_engine``
decorators. The driver process imports the plugins before it validates the config, and
every worker imports them before it builds a model, so a name registered by a plugin
means the same thing everywhere.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from types import ModuleType
from typing import Any


class PluginError(ValueError):
    """A plugin module or dotted path that cannot be imported; the message names it."""


def import_module(name: str, what: str) -> ModuleType:
    """Import module ``name``; ``what`` says where it was named (e.g. ``trainer.plugins``)."""
    if not name or not all(part.isidentifier() for part in name.split(".")):
        raise PluginError(f"{what}={name!r} is not a module path like 'my_pkg.my_module'")
    if os.getcwd() not in sys.path:  # `flowrl train` run from the user's project finds its modules
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise PluginError(
            f"{what}={name!r}: cannot import it ({e}); put its folder on PYTHONPATH or run from it"
        ) from None


def load_attr(path: str, what: str, noun: str = "name") -> Any:
    """Import ``"pkg.module:attr"`` (``attr`` may be dotted: ``Class.method``)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"{what} {path!r}: write it as 'pkg.module:{noun}'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(f"{what} {path!r}: cannot import module {module_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{what} {path!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_plugins(modules: Iterable[str], what: str = "trainer.plugins") -> list[ModuleType]:
    """Import every plugin module once (importing again is a no-op); returns them in order."""
    return [import_module(name, what) for name in modules]


def plugin_modules(trainer: Any) -> list[str]:
    """What a process imports before it builds anything: ``trainer.plugins``, then the driver
    module when ``trainer.algorithm`` is a module path (it usually registers what it uses)."""
    modules = list(trainer.plugins)
    if "." in trainer.algorithm and trainer.algorithm not in modules:
        modules.append(trainer.algorithm)
    return modules
