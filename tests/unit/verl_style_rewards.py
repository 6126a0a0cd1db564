"""Reward functions written the way verl's are: ``compute_score(data_source, solution_str, ground_truth,
extra_info=None)``, by name, returning a float or a dict with a "score"."""

from __future__ import annotations


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    correct = solution_str.strip() == str(ground_truth)
    return {"score": 1.0 if correct else 0.0, "acc": correct, "source_len": float(len(data_source)),
            "has_extra": float(bool(extra_info))}  # fmt: skip


def without_extra_info(data_source, solution_str, ground_truth, bonus=0.0):
    return float(solution_str.strip() == str(ground_truth)) + bonus


def with_kwargs(solution_str, ground_truth, **kwargs):
    return float(solution_str.strip() == str(ground_truth)) + 10.0 * ("data_source" in kwargs)


def trl_accuracy(completions, solution, **kwargs):
    """TRL's shape: a batch in, one score per completion out; dataset columns as keyword arguments."""
    return [float(c.strip() == str(s)) + 0.25 * ("prompts" in kwargs) for c, s in zip(completions, solution)]


def trl_wrong_length(completions, **kwargs):
    return [1.0, 2.0]
