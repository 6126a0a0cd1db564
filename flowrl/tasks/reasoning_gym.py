"""Reasoning-gym tasks in the standard row format (optional: needs ``reasoning-gym``).

``write_splits(out_dir, "basic_arithmetic", n_train, n_test, seed)`` writes rows with
``data_source="reasoning_gym/<task>"``; the reward is reasoning-gym's own
``score_answer`` on the response's ``<answer>...</answer>`` content (or the whole
response, stripped, when it has no such tags). The full reasoning-gym entry travels in
``extra_info["entry"]`` as a JSON string, since its metadata differs between tasks.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from typing import Any

PREFIX = "reasoning_gym/"
INSTRUCTION = "Give your final answer inside <answer></answer> tags."
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _rg() -> Any:
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError(
            "reasoning-gym tasks need the reasoning-gym package: pip install 'flowrl[tasks]'"
        ) from e
    return reasoning_gym


def make_rows(task: str, n: int, seed: int, split: str, **task_config: Any) -> list[dict[str, Any]]:
    """``n`` rows of reasoning-gym task ``task`` generated with ``seed``."""
    dataset = _rg().create_dataset(task, size=n, seed=seed, **task_config)
    rows = []
    for i, entry in enumerate(dataset):
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"{entry['question']}\n{INSTRUCTION}"}],
                "data_source": PREFIX + task,
                "reward_model": {"style": "rule", "ground_truth": str(entry["answer"])},
                "extra_info": {"split": split, "index": i, "task": task, "entry": json.dumps(entry)},
            }
        )
    return rows


def write_splits(
    out_dir: str | os.PathLike,
    task: str,
    n_train: int,
    n_test: int,
    seed: int = 0,
    fmt: str = "parquet",
    **task_config: Any,
) -> dict[str, str]:
    """Write train/test files; test questions that also occur in train are dropped from train.

    ``task_config``: the task's own options (e.g. ``max_digits=1`` for ``basic_arithmetic``).
    """
    from flowrl.data.rows import write_rows

    test = make_rows(task, n_test, 2 * seed + 1, "test", **task_config)
    test_questions = {r["prompt"][0]["content"] for r in test}
    train = make_rows(task, n_train, 2 * seed, "train", **task_config)
    train = [r for r in train if r["prompt"][0]["content"] not in test_questions]
    out = os.fspath(out_dir)
    return {
        "train": write_rows(os.path.join(out, f"train.{fmt}"), train),
        "test": write_rows(os.path.join(out, f"test.{fmt}"), test),
    }


@functools.lru_cache(maxsize=None)
def _scorer(task: str) -> Callable[[str | None, dict[str, Any]], float]:
    return _rg().get_score_answer_fn(task)


UNTAGGED = ("whole", "last_number")  # what an answer without <answer> tags is scored as


def extract_answer(response: str, untagged: str = "whole") -> str:
    """The last ``<answer>`` content; without tags the whole response, or with
    ``untagged="last_number"`` the last number in it (``"4 - 1 = 3"`` -> ``"3"``; none: ``""``)."""
    tagged = _ANSWER_TAG.findall(response)
    if tagged:
        return tagged[-1].strip()
    if untagged == "last_number":
        numbers = _NUMBER.findall(response)
        return numbers[-1] if numbers else ""
    if untagged != "whole":
        raise ValueError(f"reasoning_gym reward: untagged={untagged!r}; choose one of {list(UNTAGGED)}")
    return response.strip()


def compute_score(
    prompt: str, response: str, ground_truth: Any, extra: dict[str, Any], untagged: str = "whole"
) -> float:
    """reasoning-gym's ``score_answer`` for the task named in ``extra["task"]``.

    ``untagged`` (set with ``reward.kwargs``): how a response without ``<answer>`` tags is
    read: ``whole`` (reasoning-gym's own habit; for ``basic_arithmetic`` "4 - 1 = 3" then
    earns only partial credit) or ``last_number``, the flexible extraction common for
    arithmetic word problems (GSM8K's "flexible" mode)."""
    if "entry" not in extra or "task" not in extra:
        raise ValueError("reasoning_gym reward: extra_info needs 'task' and 'entry' (rows from make_rows)")
    entry = json.loads(extra["entry"])
    return float(_scorer(extra["task"])(extract_answer(response, untagged), entry))
