"""GSM8K-style answer scoring.

GSM8K solutions end with ``#### <number>``. Two ways to read a response's answer:

- ``strict``: the number after the last ``####``; a response without it has no answer;
- ``flexible``: the last number anywhere in the response.

Numbers compare as decimals after removing ``$`` and thousands commas, so ``12.0``
equals ``12`` and ``1,000`` equals ``1000``. The score is ``correct_score`` for a
right answer, ``format_score`` for a readable but wrong one, and 0 otherwise.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

_NUMBER = r"\$?-?\$?[\d,]*\.?\d+"
_STRICT = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)
METHODS = ("strict", "flexible")


def parse_number(text: str) -> Decimal | None:
    """``"$1,234.50"`` -> Decimal("1234.50"); None when the text is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def extract_answer(response: str, method: str = "strict") -> str | None:
    """The answer text of a response under ``method``, or None when it has none."""
    if method == "strict":
        matches = _STRICT.findall(response)
    elif method == "flexible":
        matches = _ANY_NUMBER.findall(response)
    else:
        raise ValueError(f"gsm8k: method={method!r}; choose one of {list(METHODS)}")
    return matches[-1] if matches else None


def ground_truth_number(ground_truth: Any) -> Decimal:
    """The reference number: a number, a numeric string, or a full solution ending in ``#### N``."""
    text = str(ground_truth)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    value = parse_number(text)
    if value is None:
        raise ValueError(f"gsm8k: ground truth {ground_truth!r} is not a number")
    return value


def compute_score(
    prompt: str,
    response: str,
    ground_truth: Any,
    extra: dict[str, Any] | None = None,
    method: str = "strict",
    format_score: float = 0.0,
    correct_score: float = 1.0,
) -> dict[str, float]:
    """Score a GSM8K response; returns ``{"score", "acc", "has_answer"}``."""
    target = ground_truth_number(ground_truth)
    answer = extract_answer(response, method)
    value = None if answer is None else parse_number(answer)
    if value is None:
        return {"score": 0.0, "acc": 0.0, "has_answer": 0.0}
    correct = value == target
    return {
        "score": float(correct_score if correct else format_score),
        "acc": float(correct),
        "has_answer": 1.0,
    }
