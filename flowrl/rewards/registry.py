"""Choosing the reward function of each sample.

A reward function is a plain callable::

    fn(prompt: str, response: str, ground_truth: Any, extra: dict) -> float | dict

returning a score, or a dict with a ``"score"`` and other numeric values to log.
``RewardResolver`` maps a row's ``data_source`` to its function, in this order:

1. ``config.by_source[data_source]``: a dotted path ``"pkg.module:function"``;
2. ``config.function``: a dotted path that scores every data source;
3. the built-in default for known sources (``DEFAULT_SOURCES``, and
   ``reasoning_gym/<task>`` when the ``reasoning-gym`` package is installed).

``config.kwargs[data_source]`` (or ``config.kwargs["*"]`` for every source) are keyword
arguments bound to the chosen function, e.g. ``{"openai/gsm8k": {"method": "flexible"}}``.
A function written for verl, ``compute_score(data_source, solution_str, ground_truth,
extra_info=None)`` (known by its ``solution_str`` parameter), is called verl's way: with the
row's data source, the response, the ground truth and ``extra_info``, by name. One written for
TRL, ``reward_fn(completions, **kwargs) -> list[float]`` (known by its ``completions``
parameter), gets lists of one: ``prompts``, ``completions`` (text), ``ground_truth`` and each
``extra_info`` entry (a dataset read with ``data.prompts.ground_truth_key`` keeps the answer
there under its column's name too, e.g. ``solution``), and its one score is taken.
Functions are looked up by dotted path so that worker processes can import them.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flowrl.plugins import PluginError, load_attr

RewardFn = Callable[[str, str, Any, dict], "float | dict[str, Any]"]

DEFAULT_SOURCES: dict[str, str] = {
    "openai/gsm8k": "flowrl.rewards.gsm8k:compute_score",
    "gsm8k": "flowrl.rewards.gsm8k:compute_score",
    "flowrl/arithmetic": "flowrl.tasks.arithmetic:compute_score",
    "flowrl/tool_arithmetic": "flowrl.tasks.tool_arithmetic:compute_score",
}
REASONING_GYM_PREFIX = "reasoning_gym/"
REASONING_GYM_FN = "flowrl.tasks.reasoning_gym:compute_score"


@dataclass  # not frozen: OmegaConf 2.3 makes a frozen dataclass a read-only node that recipes cannot set
class RewardConfig:
    """Rule rewards: which function scores each data source, with what arguments and time limit."""

    function: str | None = None  # "pkg.module:function" scoring every data source
    by_source: dict[str, str] = field(default_factory=dict)  # data_source -> "pkg.module:function"
    kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # data_source or "*" -> kwargs
    timeout_s: float = 10.0  # per call; a call past it scores 0 and counts in reward/timeouts
    num_workers: int = 2  # worker processes; 0 runs calls inline (SIGALRM timeouts, main thread)


def load_function(path: str) -> Callable[..., Any]:
    """Import ``"pkg.module:function"`` (``function`` may be dotted: ``Class.method``)."""
    try:
        obj = load_attr(path, "reward function", noun="function")
    except PluginError as e:
        raise ValueError(str(e)) from e.__cause__
    if not callable(obj):
        raise ValueError(f"reward function {path!r} is a {type(obj).__name__}, not a callable")
    return obj


def reasoning_gym_available() -> bool:
    return importlib.util.find_spec("reasoning_gym") is not None


class RewardResolver:
    """``resolver(data_source) -> reward function``, cached per data source."""

    def __init__(self, config: RewardConfig = RewardConfig()) -> None:
        self.config = config
        self._cache: dict[str, RewardFn] = {}

    def path_for(self, data_source: str) -> str:
        cfg = self.config
        if data_source in cfg.by_source:
            return cfg.by_source[data_source]
        if cfg.function is not None:
            return cfg.function
        if data_source in DEFAULT_SOURCES:
            return DEFAULT_SOURCES[data_source]
        if data_source.startswith(REASONING_GYM_PREFIX):
            if not reasoning_gym_available():
                raise ValueError(
                    f"data_source {data_source!r} needs the reasoning-gym package: "
                    "pip install 'flowrl[tasks]' (or reasoning-gym==0.1.25)"
                )
            return REASONING_GYM_FN
        known = sorted(DEFAULT_SOURCES) + [REASONING_GYM_PREFIX + "<task>"]
        raise ValueError(
            f"no reward function for data_source {data_source!r} (built-in: {known}); set "
            f"reward.by_source={{{data_source!r}: 'pkg.module:function'}} or reward.function"
        )

    def __call__(self, data_source: str) -> RewardFn:
        if data_source not in self._cache:
            fn = adapt_signature(load_function(self.path_for(data_source)), data_source)
            kwargs = {**self.config.kwargs.get("*", {}), **self.config.kwargs.get(data_source, {})}
            self._cache[data_source] = functools.partial(fn, **kwargs) if kwargs else fn
        return self._cache[data_source]


def adapt_signature(fn: Callable[..., Any], data_source: str) -> Callable[..., Any]:
    """``fn`` itself, or, for a verl-style function (a ``solution_str`` parameter), ``fn`` called verl's way."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: flowrl's positional call
        return fn
    if "solution_str" in params:
        return functools.partial(call_verl_style, fn, data_source)
    return functools.partial(call_trl_style, fn) if "completions" in params else fn


def call_verl_style(
    fn: Callable[..., Any], data_source: str, prompt: str, response: str, ground_truth: Any, extra: dict,
    **kwargs: Any,
) -> Any:
    """``fn(data_source=..., solution_str=response, ground_truth=..., extra_info=extra, **kwargs)``,
    each argument only if ``fn`` takes it (verl's functions differ in whether they take ``extra_info``)."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {"data_source": data_source, "solution_str": response, "ground_truth": ground_truth, "extra_info": extra}
    return fn(**{k: v for k, v in named.items() if takes_any or k in params}, **kwargs)


def call_trl_style(
    fn: Callable[..., Any], prompt: str, response: str, ground_truth: Any, extra: dict, **kwargs: Any
) -> Any:
    """``fn(prompts=[prompt], completions=[response], ground_truth=[...], <extra_info key>=[...], **kwargs)[0]``
    (TRL calls a reward function on a batch, with the dataset's columns as keyword arguments)."""
    columns = {str(k): [v] for k, v in extra.items()} | {"ground_truth": [ground_truth]}
    scores = fn(prompts=[prompt], completions=[response], **columns, **kwargs)
    if not isinstance(scores, (list, tuple)) or len(scores) != 1:
        raise TypeError(f"a TRL-style reward function returns one score per completion; got {scores!r} for one")
    return scores[0]
