"""A task where the tool is needed: products of two numbers, too hard to do in the head.

    python -m flowrl.tasks.tool_arithmetic DATA [--n-train 2000] [--n-test 64] [--digits 2] [--seed 0]

Each prompt is a product, ``47*86=`` (user message). With the built-in ``tools`` environment
(``rollout.multi_turn.env=tools``) the model may call the calculator,
``<calculator>47*86</calculator>``, read ``<result>4042</result>`` and answer ``4042``. The reward
(``compute_score``, data source ``flowrl/tool_arithmetic``) is 1 when the first integer of the
final turn is the product, else 0.

Alongside the RL splits (``train``, ``test``) it writes SFT demonstrations (``sft_train``,
``sft_test``) of mixed quality: ``direct_fraction`` of them answer at once, without the tool (the
right product, which a small model cannot compute and so learns to guess), the rest call the
calculator and copy its result. A model fine-tuned on them does either; RL on the reward teaches
it to call the tool, since only that is reliably right. Held-out problems never appear in training.
"""

from __future__ import annotations

import argparse
import os
import random
import re
from collections.abc import Sequence
from typing import Any

DATA_SOURCE = "flowrl/tool_arithmetic"


def make_problems(n: int, digits: int, rng: random.Random, exclude: frozenset[tuple[int, int]]) -> list[tuple[int, int]]:
    """``n`` pairs of ``digits``-digit numbers, none in ``exclude`` (repeats allowed beyond that)."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    out: list[tuple[int, int]] = []
    while len(out) < n:
        pair = (rng.randint(lo, hi), rng.randint(lo, hi))
        if pair not in exclude:
            out.append(pair)
    return out


def rl_row(a: int, b: int, split: str, index: int) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": f"{a}*{b}="}],
        "data_source": DATA_SOURCE,
        "reward_model": {"style": "rule", "ground_truth": str(a * b)},
        "extra_info": {"split": split, "index": index, "operands": [a, b]},
    }


def demonstration(a: int, b: int, direct: bool) -> str:
    """The whole trajectory as text: a tool call, its result and the answer; or just the answer."""
    if direct:
        return str(a * b)
    return f"<calculator>{a}*{b}</calculator><result>{a * b}</result>{a * b}"


def write_splits(
    out_dir: str | os.PathLike,
    n_train: int,
    n_test: int,
    digits: int = 2,
    seed: int = 0,
    direct_fraction: float = 0.5,
) -> dict[str, str]:
    """Write ``train``, ``test``, ``sft_train``, ``sft_test`` parquet files; returns name -> path."""
    from flowrl.data.rows import write_rows

    if not 1 <= digits <= 9:
        raise ValueError(f"tool_arithmetic: digits={digits} must be in 1..9")
    if not 0.0 <= direct_fraction <= 1.0:
        raise ValueError(f"tool_arithmetic: direct_fraction={direct_fraction} must be in [0, 1]")
    test = make_problems(n_test, digits, random.Random(f"{DATA_SOURCE}/{seed}/test"), frozenset())
    train = make_problems(n_train, digits, random.Random(f"{DATA_SOURCE}/{seed}/train"), frozenset(test))
    paths = {}
    for split, pairs in (("train", train), ("test", test)):
        rng = random.Random(f"{DATA_SOURCE}/{seed}/{split}/direct")
        rows = [rl_row(a, b, split, i) for i, (a, b) in enumerate(pairs)]
        direct = [split == "train" and rng.random() < direct_fraction for _ in pairs]
        sft = [{**row, "response": demonstration(a, b, d)} for row, (a, b), d in zip(rows, pairs, direct)]
        paths[split] = write_rows(os.path.join(os.fspath(out_dir), f"{split}.parquet"), rows)
        paths[f"sft_{split}"] = write_rows(os.path.join(os.fspath(out_dir), f"sft_{split}.parquet"), sft)
    return paths


_FIRST_INT = re.compile(r"-?\d+")


def compute_score(prompt: str, response: str, ground_truth: Any, extra: dict[str, Any] | None = None) -> dict[str, float]:
    """1.0 when the first integer of the final answer ``response`` is the product, else 0.0."""
    found = _FIRST_INT.search(response)
    right = found is not None and int(found.group()) == int(str(ground_truth).strip())
    return {"score": float(right), "acc": float(right)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the tool-arithmetic task's splits (module docstring).")
    parser.add_argument("out_dir")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--direct-fraction", type=float, default=0.5, help="SFT demonstrations without the tool")
    args = parser.parse_args(argv)
    paths = write_splits(args.out_dir, args.n_train, args.n_test, args.digits, args.seed, args.direct_fraction)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
