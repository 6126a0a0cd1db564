"""A reward built to make all-equal groups: the dynamic-sampling test of tests/e2e/test_recipes.py.

A prompt whose answer is even scores 1.0 for every response, so its group is all-equal and
carries no signal; an odd answer's responses score by a hash of their text (0 or 1), which
varies within a group of sampled responses almost always.
"""

from __future__ import annotations

import zlib
from typing import Any


def half_all_equal(prompt: str, response: str, ground_truth: Any, extra: dict | None = None) -> float:
    if int(str(ground_truth).strip()) % 2 == 0:
        return 1.0
    return float(zlib.crc32(response.encode()) % 2)
