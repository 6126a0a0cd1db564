"""A built-in synthetic task with exact answers: integer arithmetic at graded difficulty.

``What is 37 + 48? Answer with just the number.`` -> ``85``. A level fixes how many
digits each operand has at most, how many operands there are and which operators
appear (``*`` binds tighter than ``+``/``-``, as in Python). Level 1, single-digit
addition, has only 100 distinct problems: a tiny model trained from scratch on CPU
learns it in minutes. Splits are disjoint (no test problem appears in train) and
depend only on the arguments.

Rows follow the standard format (``prompt``, ``data_source="flowrl/arithmetic"``,
``reward_model.ground_truth`` = the answer as a string, ``extra_info``); SFT rows add
``response`` (the answer) and preference rows carry ``chosen``/``rejected``.

Command line: ``python -m flowrl.tasks.arithmetic OUT_DIR --n-train 2000 --n-test 20 --level 1``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DATA_SOURCE = "flowrl/arithmetic"
INSTRUCTION = "Answer with just the number."
STYLES = ("words", "symbols")  # the prompt: "What is 37 + 48? Answer with ..." or "37+48="


@dataclass(frozen=True)
class Level:
    max_digits: int  # each operand is drawn uniformly from [0, 10**max_digits - 1]
    n_operands: int
    operators: str  # drawn uniformly per gap, from these characters among "+-*"

    @property
    def n_problems(self) -> int:
        """How many distinct problems the level has."""
        return (10**self.max_digits) ** self.n_operands * len(self.operators) ** (self.n_operands - 1)


LEVELS: dict[int, Level] = {
    1: Level(1, 2, "+"),
    2: Level(1, 2, "+-"),
    3: Level(2, 2, "+"),
    4: Level(2, 2, "+-"),
    5: Level(2, 3, "+-"),
    6: Level(2, 2, "+-*"),
    7: Level(3, 2, "+-*"),
    8: Level(3, 3, "+-*"),
}


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    operators: tuple[str, ...]

    @property
    def expression(self) -> str:
        parts = [str(self.operands[0])]
        for op, x in zip(self.operators, self.operands[1:]):
            parts += [op, str(x)]
        return " ".join(parts)

    @property
    def answer(self) -> int:
        return evaluate(self.operands, self.operators)

    @property
    def question(self) -> str:
        return f"What is {self.expression}? {INSTRUCTION}"

    def prompt(self, style: str = "words") -> str:
        """The user message: ``words`` is :attr:`question`; ``symbols`` is ``37+48=``."""
        if style == "words":
            return self.question
        if style == "symbols":
            return self.expression.replace(" ", "") + "="
        raise ValueError(f"arithmetic: style={style!r}; choose one of {list(STYLES)}")


def evaluate(operands: Sequence[int], operators: Sequence[str]) -> int:
    """Value of ``a op b op c ...`` with ``*`` before ``+``/``-``."""
    terms, signs = [operands[0]], [1]
    for op, x in zip(operators, operands[1:]):
        if op == "*":
            terms[-1] *= x
        elif op in "+-":
            terms.append(x)
            signs.append(1 if op == "+" else -1)
        else:
            raise ValueError(f"arithmetic: unknown operator {op!r}")
    return sum(s * t for s, t in zip(signs, terms))


def get_level(level: int) -> Level:
    if level not in LEVELS:
        raise ValueError(f"arithmetic: level={level} does not exist; choose one of {sorted(LEVELS)}")
    return LEVELS[level]


def sample_problem(level: Level, rng: random.Random) -> Problem:
    top = 10**level.max_digits - 1
    operands = tuple(rng.randint(0, top) for _ in range(level.n_operands))
    operators = tuple(rng.choice(level.operators) for _ in range(level.n_operands - 1))
    return Problem(operands, operators)


def sample_problems(
    level: Level, n: int, rng: random.Random, exclude: frozenset[Problem] = frozenset(), unique: bool = True
) -> list[Problem]:
    """``n`` problems not in ``exclude``; all different when ``unique``."""
    out: list[Problem] = []
    seen: set[Problem] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 10_000:
            raise ValueError(f"arithmetic: could not draw {n} problems from a level of {level.n_problems}")
        p = sample_problem(level, rng)
        if p in exclude or (unique and p in seen):
            continue
        seen.add(p)
        out.append(p)
    return out


def make_splits(n_train: int, n_test: int, level: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, test): test problems are distinct; train never contains a test problem.

    Train problems are distinct too while the level has enough of them; beyond that
    (e.g. level 1 has 100 problems) train repeats problems, still never test ones.
    """
    spec = get_level(level)
    if n_test >= spec.n_problems:
        raise ValueError(
            f"arithmetic: n_test={n_test} leaves no training problems at level {level} "
            f"({spec.n_problems} distinct problems); lower n_test or raise the level"
        )
    test = sample_problems(spec, n_test, random.Random(f"{DATA_SOURCE}/{seed}/test"))
    left = spec.n_problems - n_test
    unique = n_train <= left
    if not unique:
        log.info("arithmetic level %d: %d train rows repeat its %d non-test problems", level, n_train, left)
    train_rng = random.Random(f"{DATA_SOURCE}/{seed}/train")
    return sample_problems(spec, n_train, train_rng, frozenset(test), unique), test


def rl_row(p: Problem, level: int, split: str, index: int, style: str = "words") -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": p.prompt(style)}],
        "data_source": DATA_SOURCE,
        "reward_model": {"style": "rule", "ground_truth": str(p.answer)},
        "extra_info": {
            "split": split,
            "index": index,
            "level": level,
            "operands": list(p.operands),
            "operators": list(p.operators),
        },
    }


def sft_row(
    p: Problem, level: int, split: str, index: int, style: str = "words", restate: bool = False
) -> dict[str, Any]:
    """An RL row plus ``response``: the correct answer, or with ``restate`` the whole
    equation (``37 + 48 = 85``), which the scorer counts as wrong: its first number is not
    the answer, and the prompt asks for just the number."""
    response = f"{p.expression} = {p.answer}" if restate else str(p.answer)
    if restate and style == "symbols":
        response = response.replace(" ", "")
    return {**rl_row(p, level, split, index, style), "response": response}


def wrong_answer(answer: int, rng: random.Random) -> int:
    """A near miss: the answer shifted by 1..9 either way."""
    return answer + rng.choice([-1, 1]) * rng.randint(1, 9)


def pair_row(
    p: Problem, level: int, split: str, index: int, rng: random.Random, style: str = "words"
) -> dict[str, Any]:
    """A preference pair: the correct answer chosen, a wrong one rejected."""
    row = rl_row(p, level, split, index, style)
    return {**row, "chosen": str(p.answer), "rejected": str(wrong_answer(p.answer, rng))}


def write_splits(
    out_dir: str | os.PathLike,
    n_train: int,
    n_test: int,
    level: int = 1,
    seed: int = 0,
    fmt: str = "parquet",
    style: str = "words",
    restate_fraction: float = 0.0,
) -> dict[str, str]:
    """Write RL, SFT and preference splits; returns {"train", "test", "sft_train", ...} -> path.

    ``restate_fraction`` of the SFT *train* responses restate the equation before the
    answer (``37+48=85``): demonstrations of mixed quality, as SFT data often is. A model
    fine-tuned on them can add but often answers in the wrong format; RL on the scorer
    fixes that (the main job, ``flowrl.main``). Test SFT rows always hold the bare answer.
    """
    from flowrl.data.rows import write_rows

    if fmt not in ("parquet", "jsonl"):
        raise ValueError(f"arithmetic: fmt={fmt!r}; use 'parquet' or 'jsonl'")
    if style not in STYLES:
        raise ValueError(f"arithmetic: style={style!r}; choose one of {list(STYLES)}")
    if not 0.0 <= restate_fraction <= 1.0:
        raise ValueError(f"arithmetic: restate_fraction={restate_fraction} must be in [0, 1]")
    splits = dict(zip(("train", "test"), make_splits(n_train, n_test, level, seed)))
    paths = {}
    for split, problems in splits.items():
        rng = random.Random(f"{DATA_SOURCE}/{seed}/{split}/rejected")
        restate_rng = random.Random(f"{DATA_SOURCE}/{seed}/{split}/restate")
        fraction = restate_fraction if split == "train" else 0.0
        restate = [restate_rng.random() < fraction for _ in problems]
        kinds = {
            split: [rl_row(p, level, split, i, style) for i, p in enumerate(problems)],
            f"sft_{split}": [sft_row(p, level, split, i, style, r) for i, (p, r) in enumerate(zip(problems, restate))],
            f"pairs_{split}": [pair_row(p, level, split, i, rng, style) for i, p in enumerate(problems)],
        }
        for name, rows in kinds.items():
            paths[name] = write_rows(os.path.join(os.fspath(out_dir), f"{name}.{fmt}"), rows)
    return paths


# ---- reward -----------------------------------------------------------------------------
_FIRST_INT = re.compile(r"-?\d+")
_ONLY_INT = re.compile(r"\s*-?\d+\s*")


def compute_score(
    prompt: str,
    response: str,
    ground_truth: Any,
    extra: dict[str, Any] | None = None,
    format_score: float = 0.0,
) -> dict[str, float]:
    """1.0 when the first integer in the response equals the answer; else ``format_score``
    if the response is a bare integer (right format, wrong value), else 0.0."""
    target = int(str(ground_truth).strip())
    found = _FIRST_INT.search(response)
    if found is not None and int(found.group()) == target:
        return {"score": 1.0, "acc": 1.0}
    well_formed = _ONLY_INT.fullmatch(response) is not None
    return {"score": float(format_score) if well_formed else 0.0, "acc": 0.0}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic arithmetic task's splits.")
    parser.add_argument("out_dir")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--level", type=int, default=1, choices=sorted(LEVELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", default="parquet", choices=["parquet", "jsonl"])
    parser.add_argument("--style", default="words", choices=STYLES, help="words: 'What is 3 + 4? ...'; symbols: '3+4='")
    parser.add_argument("--restate-fraction", type=float, default=0.0, help="SFT train responses that restate the equation")
    args = parser.parse_args(argv)
    paths = write_splits(
        args.out_dir, args.n_train, args.n_test, args.level, args.seed, args.format, args.style, args.restate_fraction
    )
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
