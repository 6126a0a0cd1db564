"""A reward function for the `flowrl eval` test: any response can be made right or wrong."""

from __future__ import annotations

from typing import Any


def prefix_score(prompt: str, response: str, ground_truth: Any, extra: dict | None = None) -> float:
    """1.0 when the response starts with the (non-empty) ground truth, else 0.0."""
    truth = str(ground_truth)
    return 1.0 if truth and response.startswith(truth) else 0.0
