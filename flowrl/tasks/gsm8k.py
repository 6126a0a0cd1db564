"""GSM8K-format grade-school math rows, made offline (optional: needs ``reasoning-gym``).

The problems come from reasoning-gym's ``gsm_symbolic``: templates taken from GSM8K test
problems with the names and numbers drawn anew, each with its worked solution ending in
``#### <answer>``. Rows follow verl's GSM8K preprocessing, so the built-in
``openai/gsm8k`` reward (``flowrl.rewards.gsm8k``) scores them and recipes written for
the real data set run on them unchanged::

    {"prompt": [{"role": "user", "content": "<question> Let's think step by step and output
                 the final answer after \\"####\\"."}],
     "data_source": "openai/gsm8k", "ability": "math",
     "reward_model": {"style": "rule", "ground_truth": "28080"},
     "extra_info": {"split": "train", "index": 0, "question": ..., "answer": "...\\n#### 28080"}}

How this differs from the real GSM8K: train and test come from the same ~85 templates
(different seeds, no question in both), so test accuracy measures new numbers on known
problem shapes, not new problems. A few answers are decimals (``9281.25``). The
``sft_*`` files add ``response`` = the worked solution, for an SFT warm start.

Command line: ``python -m flowrl.tasks.gsm8k OUT_DIR --n-train 7473 --n-test 1319 --seed 0``.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from typing import Any

DATA_SOURCE = "openai/gsm8k"
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'  # verl's wording
TASK = "gsm_symbolic"
_RG_SUFFIX = " Give the result as your final answer. Do not include units."  # reasoning-gym's, replaced
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")  # "28080", "9281.25": no units, commas or fractions
TEST_SEED_OFFSET = 10**9  # reasoning-gym seeds item i with seed + i: test draws from another range


def _rg() -> Any:
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError(
            "the gsm8k task needs the reasoning-gym package: pip install 'flowrl[tasks]'"
        ) from e
    return reasoning_gym


def question_of(entry: dict[str, Any]) -> str:
    """A ``gsm_symbolic`` entry's question without reasoning-gym's closing instruction."""
    return str(entry["question"]).removesuffix(_RG_SUFFIX)


def make_row(entry: dict[str, Any], split: str, index: int, sft: bool = False) -> dict[str, Any]:
    """One verl-format row from a ``gsm_symbolic`` entry; its answer must be a plain number.
    ``sft``: add ``response``, the worked solution ending in ``#### <answer>``."""
    question = question_of(entry)
    answer = str(entry["answer"]).strip()
    if not _PLAIN_NUMBER.fullmatch(answer):
        raise ValueError(f"gsm8k: {split} item {index}: answer {entry['answer']!r} is not a plain number")
    solution = entry["metadata"]["answer_cot"]
    row = {
        "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
        "data_source": DATA_SOURCE,
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": split, "index": index, "question": question, "answer": solution},
    }
    return {**row, "response": solution} if sft else row


def make_entries(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """``n`` ``gsm_symbolic`` entries generated with ``seed``, less those whose question is in ``exclude``."""
    entries = _rg().create_dataset(TASK, size=n, seed=seed)
    return [entry for entry in entries if question_of(entry) not in exclude]


def write_splits(
    out_dir: str | os.PathLike, n_train: int, n_test: int, seed: int = 0, fmt: str = "parquet"
) -> dict[str, str]:
    """Write ``train`` and ``test`` RL rows, and ``sft_train``/``sft_test``: the same rows with
    ``response`` = the worked solution (``... #### N``), for ``flowrl sft``. A train question that
    is also a test question is dropped (train may hold a few less than ``n_train`` rows).
    Returns name -> path."""
    from flowrl.data.rows import write_rows

    if fmt not in ("parquet", "jsonl"):
        raise ValueError(f"gsm8k: fmt={fmt!r}; use 'parquet' or 'jsonl'")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"gsm8k: n_train={n_train} and n_test={n_test} must both be >= 1")
    test = make_entries(n_test, seed + TEST_SEED_OFFSET)
    train = make_entries(n_train, seed, frozenset(question_of(entry) for entry in test))
    paths = {}
    for split, entries in (("train", train), ("test", test)):
        for name, sft in ((split, False), (f"sft_{split}", True)):
            rows = [make_row(entry, split, i, sft) for i, entry in enumerate(entries)]
            paths[name] = write_rows(os.path.join(os.fspath(out_dir), f"{name}.{fmt}"), rows)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write GSM8K-format train/test rows (data_source openai/gsm8k) from reasoning-gym's "
        "gsm_symbolic generator, offline."
    )
    parser.add_argument("out_dir")
    parser.add_argument("--n-train", type=int, default=7473, help="(default: GSM8K's train size)")
    parser.add_argument("--n-test", type=int, default=1319, help="(default: GSM8K's test size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", default="parquet", choices=["parquet", "jsonl"])
    args = parser.parse_args(argv)
    for name, path in write_splits(args.out_dir, args.n_train, args.n_test, args.seed, args.format).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
