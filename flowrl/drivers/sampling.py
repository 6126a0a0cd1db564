"""DAPO's dynamic sampling, the controller's part: refill a step with groups whose scores vary,
and merge the metrics of several sampling rounds into the step's (``steps.sample`` calls it)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowrl.algos import informative_groups
from flowrl.batch import Batch
from flowrl.data import concat_prompt_batches
from flowrl.keys import Keys

Metrics = dict[str, float]


def short_step_note(metrics: Metrics, wanted: int) -> str:
    """One line on a step that ``max_rounds`` left short of informative groups."""
    informative = int(metrics["dynamic_sampling/sampled_groups"] - metrics["dynamic_sampling/dropped_groups"])
    kept, rounds = int(metrics["dynamic_sampling/kept_groups"]), int(metrics["dynamic_sampling/rounds"])
    what = "the first round as sampled" if kept > informative else "those"
    return (
        f"dynamic sampling found {informative} of the {wanted} groups with varying scores it wants in "
        f"{rounds} rounds (algorithm.dynamic_sampling.max_rounds); training on {kept} groups, {what}"
    )


def fill_informative(
    one_round: Callable[[], tuple[Batch, Metrics]],
    groups: int,
    max_rounds: int,
    multiple: int = 1,
    pad_id: int = 0,
) -> tuple[Batch, Metrics]:
    """DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476): call ``one_round`` (a scored
    rollout of fresh prompts, ``GROUP_IDS`` 0..G-1) until ``groups`` groups whose scores are not
    all equal are in hand, ``max_rounds`` times at most. Returns exactly ``groups`` of them, in
    the order sampled, ``GROUP_IDS`` renumbered 0..groups-1, and the rounds' metrics merged.

    Short after ``max_rounds``: the informative groups it has, cut to a count whose samples are
    a multiple of ``multiple`` (the ranks that split the batch, so none gets a padding copy);
    if that leaves none, the first round as sampled (the step dynamic sampling off would take).
    Metrics ``dynamic_sampling/``: rounds, sampled / dropped (all-equal) / kept groups, short (1/0).
    """
    kept: list[Batch] = []
    rounds: list[tuple[int, Metrics]] = []
    first, n_kept, sampled, per_group = None, 0, 0, 1
    while len(rounds) < max_rounds and n_kept < groups:
        batch, metrics = one_round()
        rounds.append((len(batch), metrics))
        first = batch if first is None else first
        n_groups = int(torch.unique(batch[Keys.GROUP_IDS]).numel())
        sampled, per_group = sampled + n_groups, len(batch) // max(n_groups, 1)
        good = batch[informative_groups(batch[Keys.SCORES], batch[Keys.GROUP_IDS])]  # whole groups
        if len(good):
            _, local = torch.unique(good[Keys.GROUP_IDS], return_inverse=True)  # [b] in 0..g-1
            good[Keys.GROUP_IDS] = local + n_kept
            kept, n_kept = kept + [good], n_kept + int(local.max()) + 1
    target = min(groups, n_kept)
    while target > 0 and (target * per_group) % multiple:
        target -= 1
    assert first is not None  # max_rounds >= 1
    if target == 0:
        batch = first
    else:
        batch = concat_prompt_batches(kept, pad_id)
        batch = batch[batch[Keys.GROUP_IDS] < target]
    return batch, merge_rounds(rounds) | {
        "dynamic_sampling/rounds": float(len(rounds)),
        "dynamic_sampling/sampled_groups": float(sampled),
        "dynamic_sampling/dropped_groups": float(sampled - n_kept),
        "dynamic_sampling/kept_groups": float(int(torch.unique(batch[Keys.GROUP_IDS]).numel())),
        "dynamic_sampling/short": float(n_kept < groups),
    }


REWARD_COUNTS = ("reward/errors", "reward/timeouts", "reward/invalid")  # summed over rounds, not averaged


def merge_rounds(rounds: list[tuple[int, Metrics]]) -> Metrics:
    """The metrics of several scored rounds ``(samples, metrics)`` as one: the counts summed, a
    max or min the max or min of the rounds', every other metric (a mean over samples) averaged
    with the rounds' sizes as weights."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    extremes: dict[str, float] = {}
    for size, metrics in rounds:
        for key, value in metrics.items():
            if key.endswith(("max", "min")):
                pick = max if key.endswith("max") else min
                extremes[key] = pick(extremes.get(key, value), value)
                continue
            w = 1.0 if key in REWARD_COUNTS else float(size)
            totals[key] = totals.get(key, 0.0) + w * value
            weights[key] = weights.get(key, 0.0) + w
    return {k: v if k in REWARD_COUNTS else v / weights[k] for k, v in totals.items()} | extremes
