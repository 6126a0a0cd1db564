"""Registries of advantage estimators and policy losses.

Users add their own with the decorators::

    @register_estimator("my_adv", needs=(Keys.SCORES, Keys.RESPONSE_MASK))
    def my_adv(batch: Batch, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]: ...

    @register_policy_loss("my_loss")
    def my_loss(logprobs, old_logprobs, advantages, mask, cfg) -> tuple[Tensor, dict]: ...

An estimator declares the batch keys it reads, so config validation can refuse a
recipe whose workers do not produce them (``check_estimator_inputs``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from flowrl.batch import Batch
from flowrl.keys import Keys

from .config import AdvantageConfig, PolicyLossConfig

T = TypeVar("T")
EstimatorFn = Callable[[Batch, AdvantageConfig], tuple[torch.Tensor, torch.Tensor]]
PolicyLossFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PolicyLossConfig],
    tuple[torch.Tensor, dict[str, torch.Tensor]],
]

# Who puts a key into the batch: used to say what a recipe is missing.
KEY_PROVIDERS: dict[str, str] = {
    Keys.VALUES: "a critic",
    Keys.OLD_VALUES: "a critic",
    Keys.REF_LOGPROBS: "a reference policy",
    Keys.TEACHER_LOGPROBS: "a distillation teacher (trainer.algorithm=distill with teacher.path)",
    Keys.OLD_LOGPROBS: "a driver that computes the old log-probs before the advantages (distill)",
    Keys.TOKEN_REWARDS: "the reward step (token_scores, then apply_kl_penalty)",
    Keys.SCORES: "a reward function or reward model",
    Keys.GROUP_IDS: "the rollout (several samples per prompt)",
    Keys.BASELINE_SCORES: "a baseline rollout (ReMax: a greedy sample per prompt, scored)",
    Keys.RESPONSE_MASK: "the rollout",
}


class Registry(Generic[T]):
    """Named entries of one kind; a name is registered once."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        self._entries.pop(name)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {self.names()}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


@dataclass(frozen=True)
class EstimatorSpec:
    name: str
    fn: EstimatorFn
    needs: tuple[str, ...]  # batch keys the estimator reads


ESTIMATORS: Registry[EstimatorSpec] = Registry("advantage estimator")
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


def register_estimator(name: str, needs: Iterable[str]) -> Callable[[EstimatorFn], EstimatorFn]:
    def deco(fn: EstimatorFn) -> EstimatorFn:
        ESTIMATORS.add(name, EstimatorSpec(name, fn, tuple(needs)))
        return fn

    return deco


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES.add(name, fn)
        return fn

    return deco


def get_estimator(name: str) -> EstimatorSpec:
    return ESTIMATORS.get(name)


def get_policy_loss(name: str) -> PolicyLossFn:
    return POLICY_LOSSES.get(name)


def check_estimator_inputs(name: str, available: Iterable[str]) -> None:
    """Raise if estimator ``name`` needs a key that is not in ``available``.

    The message names the missing key and what provides it, e.g.
    "advantage estimator 'gae' needs 'values', which only a critic provides".
    """
    have = set(available)
    missing = [k for k in get_estimator(name).needs if k not in have]
    if missing:
        why = "; ".join(f"{k!r}, which only {KEY_PROVIDERS.get(k, 'another step')} provides" for k in missing)
        raise ValueError(f"advantage estimator {name!r} needs {why}. Add it or choose another estimator.")
