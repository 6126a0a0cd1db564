"""Scoring a whole Batch with rule reward functions, robust to failing functions.

A reward function that raises, returns NaN/Inf or a wrong type, or runs past the time
limit does not stop training: that sample scores 0, its status says why, and
``reward_metrics`` counts it (``reward/errors``, ``reward/timeouts``, ``reward/invalid``).
Configuration mistakes (an unknown data source, a function that cannot be sent to a
worker process) do raise, before any call runs.
"""

from __future__ import annotations

import logging
import math
import numbers
import pickle
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any

import torch

from flowrl.batch import Batch
from flowrl.keys import Keys
from flowrl.rewards.pool import CallPool, Outcome, run_inline
from flowrl.rewards.registry import RewardConfig, RewardFn, RewardResolver

log = logging.getLogger(__name__)


class RewardStatus(IntEnum):
    OK = 0
    ERROR = 1  # the function raised (or its worker died)
    TIMEOUT = 2  # no result within timeout_s
    INVALID = 3  # NaN/Inf, or not a number / {"score": number, ...} dict


def check_result(value: Any) -> tuple[RewardStatus, float, dict[str, Any]]:
    """(status, score, extra values) of a reward function's return value."""
    extra: dict[str, Any] = {}
    if isinstance(value, dict):
        extra = {str(k): v for k, v in value.items() if k != "score"}
        if "score" not in value:
            return RewardStatus.INVALID, 0.0, {"error": f"dict without 'score': keys {sorted(value)}"}
        value = value["score"]
    if not isinstance(value, numbers.Real):
        return RewardStatus.INVALID, 0.0, {"error": f"score of type {type(value).__name__}, not a number"}
    if not math.isfinite(float(value)):
        return RewardStatus.INVALID, 0.0, {"error": f"score is {float(value)}"}
    return RewardStatus.OK, float(value), extra


class RewardRunner:
    """Scores batches; holds worker processes between calls (``close()`` or use as a context)."""

    def __init__(
        self,
        resolver: Callable[[str], RewardFn],
        timeout_s: float = 10.0,
        num_workers: int = 2,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"reward.timeout_s={timeout_s} must be positive")
        if num_workers < 0:
            raise ValueError(f"reward.num_workers={num_workers} must be >= 0 (0 runs inline)")
        self.resolver, self.timeout_s = resolver, timeout_s
        self._pool = CallPool(num_workers) if num_workers > 0 else None

    @classmethod
    def from_config(cls, config: RewardConfig) -> RewardRunner:
        return cls(RewardResolver(config), config.timeout_s, config.num_workers)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _functions(self, data_sources: Sequence[str]) -> dict[str, RewardFn]:
        fns = {ds: self.resolver(ds) for ds in dict.fromkeys(data_sources)}
        if self._pool is not None:
            for ds, fn in fns.items():
                try:
                    pickle.dumps(fn)
                except Exception as e:
                    raise ValueError(
                        f"the reward function for data_source {ds!r} ({fn!r}) cannot be sent to a reward "
                        f"worker process ({e}); define it at module level in an importable module, "
                        "or set reward.num_workers=0"
                    ) from e
        return fns

    def score(self, batch: Batch) -> Batch:
        """A Batch with SCORES [B] float32, REWARD_STATUS [B] int64 and REWARD_EXTRA (dicts)."""
        sources = [str(s) for s in batch[Keys.DATA_SOURCE]]
        fns = self._functions(sources)
        extras = batch[Keys.EXTRA_INFO] if Keys.EXTRA_INFO in batch else [{}] * len(batch)
        calls = [
            (fns[ds], (prompt, response, truth, extra or {}))
            for ds, prompt, response, truth, extra in zip(
                sources, batch[Keys.PROMPT_TEXT], batch[Keys.RESPONSE_TEXT], batch[Keys.GROUND_TRUTH], extras
            )
        ]
        if self._pool is not None:
            outcomes = self._pool.run(calls, self.timeout_s)
        else:
            outcomes = run_inline(calls, self.timeout_s)
        return _to_batch(outcomes)


def _to_batch(outcomes: Sequence[Outcome]) -> Batch:
    scores, statuses, extras = [], [], []
    for out in outcomes:
        if out.status == "ok":
            status, score, extra = check_result(out.value)
        else:
            status = RewardStatus.TIMEOUT if out.status == "timeout" else RewardStatus.ERROR
            score, extra = 0.0, {"error": str(out.value)}
        scores.append(score)
        statuses.append(int(status))
        extras.append(extra)
    failed = [(s, e["error"]) for s, e in zip(statuses, extras) if s != RewardStatus.OK]
    if failed:
        log.warning(
            "%d of %d reward calls failed; first: %s: %s",
            len(failed), len(outcomes), RewardStatus(failed[0][0]).name, failed[0][1],
        )
    return Batch(
        {
            Keys.SCORES: torch.tensor(scores, dtype=torch.float32),  # [B]
            Keys.REWARD_STATUS: torch.tensor(statuses, dtype=torch.long),  # [B]
        },
        {Keys.REWARD_EXTRA: extras},
        batch_size=len(outcomes),
    )


def reward_metrics(scored: Batch) -> dict[str, float]:
    """Counts of failures, the mean score (overall and per data source if present), extra means."""
    status = scored[Keys.REWARD_STATUS]  # [B]
    scores = scored[Keys.SCORES]  # [B]
    metrics = {
        "reward/errors": float((status == RewardStatus.ERROR).sum()),
        "reward/timeouts": float((status == RewardStatus.TIMEOUT).sum()),
        "reward/invalid": float((status == RewardStatus.INVALID).sum()),
        "reward/failed_frac": float((status != RewardStatus.OK).float().mean()) if len(scored) else 0.0,
        "reward/score_mean": float(scores.mean()) if len(scored) else 0.0,
    }
    if Keys.DATA_SOURCE in scored:
        sources = scored[Keys.DATA_SOURCE]
        for ds in sorted(set(sources)):
            picked = torch.tensor([s == ds for s in sources])  # [B] bool
            metrics[f"reward/score_mean/{ds}"] = float(scores[picked].mean())
    sums: dict[str, list[float]] = {}
    for s, extra in zip(status.tolist(), scored[Keys.REWARD_EXTRA]):
        for k, v in extra.items() if s == RewardStatus.OK else ():
            if isinstance(v, numbers.Real) and math.isfinite(float(v)):
                sums.setdefault(k, []).append(float(v))
    metrics.update({f"reward/{k}_mean": sum(v) / len(v) for k, v in sorted(sums.items())})
    return metrics


def compute_scores(
    batch: Batch,
    fn_resolver: Callable[[str], RewardFn],
    timeout_s: float = 10.0,
    num_workers: int = 2,
) -> tuple[Batch, dict[str, float]]:
    """One-shot scoring: (Batch with SCORES/REWARD_STATUS/REWARD_EXTRA, metrics)."""
    with RewardRunner(fn_resolver, timeout_s, num_workers) as runner:
        scored = runner.score(batch)
    scored_with_source = scored | batch.select(Keys.DATA_SOURCE, meta=False)
    return scored, reward_metrics(scored_with_source)
