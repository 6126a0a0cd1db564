"""Reading dataset rows from parquet and JSONL, and checking them.

The row format is the field's de facto standard (the one verl-prepared datasets use)::

    {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],   # chat messages, non-empty
     "data_source": "openai/gsm8k",                                # selects the rule reward
     "reward_model": {"style": "rule", "ground_truth": "5"},
     "extra_info": {"split": "train", "index": 0}}                 # optional dict

``prompt`` may also be plain text (TRL's "standard" format): it is then the model's input as it
is, with no chat template, which is also how a base model without a template is prompted.
SFT rows add ``response`` (a string; TRL's ``completion`` is read as the same, a string or one
assistant message) or carry ``messages`` ending with an assistant turn; preference rows carry
``prompt``, ``chosen`` and ``rejected`` (strings, or conversations ending with the assistant's
answer, as TRL writes them, the prompt then also implicit in their shared beginning). Every error names the
file, the row (0-based; JSONL also gives the 1-based line) and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]


class RowError(ValueError):
    """A dataset row is malformed; the message names file, row and field."""


@dataclass(frozen=True)
class RowRef:
    """Where a row came from, for error messages."""

    path: str
    index: int  # 0-based row index within the file
    line: int | None = None  # 1-based line number (JSONL only)

    def __str__(self) -> str:
        where = f"{self.path} row {self.index}"
        return where if self.line is None else f"{where} (line {self.line})"

    def error(self, field: str | None, problem: str) -> RowError:
        return RowError(f"{self}: {problem}" if field is None else f"{self}: {problem} {field!r}")


def read_rows(path: str | os.PathLike) -> list[tuple[RowRef, Row]]:
    """All rows of one ``.parquet`` or ``.jsonl``/``.json`` file with where each came from."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file not found: {path}")
    if path.endswith(".parquet"):
        return list(_read_parquet(path))
    if path.endswith((".jsonl", ".json")):
        return list(_read_jsonl(path))
    raise ValueError(f"{path}: unknown dataset format; use a .parquet or .jsonl file")


def read_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[tuple[RowRef, Row]]:
    """Rows of one or several files, in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [item for p in paths for item in read_rows(p)]


def _read_parquet(path: str) -> Iterator[tuple[RowRef, Row]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
    for i, row in enumerate(table.to_pylist()):
        yield RowRef(path, i), row


def _read_jsonl(path: str) -> Iterator[tuple[RowRef, Row]]:
    index = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            ref = RowRef(path, index, line_no)
            index += 1
            text = raw.decode("utf-8", errors="surrogateescape")
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ref.error(None, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ref.error(None, f"expected a JSON object, got {type(row).__name__}")
            bad = _find_bad_text(row, "")
            if bad is not None:
                raise ref.error(bad, "text is not valid UTF-8 in")
            yield ref, row


def _find_bad_text(value: Any, where: str) -> str | None:
    """Path of the first string holding undecodable bytes or lone surrogates, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "<row>"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            key = f"{where}.{k}" if where else str(k)
            found = _find_bad_text(k, key) or _find_bad_text(v, key)
            if found is not None:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _find_bad_text(v, f"{where}[{i}]")
            if found is not None:
                return found
    return None


# ---- field checks -------------------------------------------------------------------------
def require_field(row: Row, ref: RowRef, field: str) -> Any:
    if field not in row or row[field] is None:
        raise ref.error(field, "missing")
    return row[field]


def check_messages(messages: Any, ref: RowRef, field: str) -> list[dict[str, str]]:
    """A non-empty list of {"role": str, "content": str} dicts."""
    if not isinstance(messages, list):
        raise ref.error(field, f"expected a list of chat messages, got {type(messages).__name__} in")
    if not messages:
        raise ref.error(field, "empty message list in")
    out = []
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise ref.error(where, f"expected a {{'role', 'content'}} dict, got {type(m).__name__} in")
        for key in ("role", "content"):
            if m.get(key) is None:
                raise ref.error(f"{where}.{key}", "missing")
            if not isinstance(m[key], str):
                raise ref.error(f"{where}.{key}", f"expected a string, got {type(m[key]).__name__} in")
        if not m["role"]:
            raise ref.error(f"{where}.role", "empty")
        out.append({"role": m["role"], "content": m["content"]})
    return out


Prompt = list[dict[str, str]] | str  # chat messages, or plain text used as it is (no chat template)


def check_prompt(value: Any, ref: RowRef, field: str = "prompt") -> Prompt:
    """Chat messages (a non-empty list), or plain non-empty text."""
    if isinstance(value, str):
        if not value:
            raise ref.error(field, "empty string in")
        return value
    if not isinstance(value, list):
        raise ref.error(field, f"expected chat messages (a list) or text, got {type(value).__name__} in")
    return check_messages(value, ref, field)


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """The prompt as chat messages (plain text: one user turn), e.g. for an environment's ``reset``."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def check_str(row: Row, ref: RowRef, field: str, allow_empty: bool = False) -> str:
    value = require_field(row, ref, field)
    if not isinstance(value, str):
        raise ref.error(field, f"expected a string, got {type(value).__name__} in")
    if not value and not allow_empty:
        raise ref.error(field, "empty string in")
    return value


@dataclass(frozen=True)
class RowColumns:
    """Where an RL prompt row keeps its fields, for datasets laid out as other frameworks write them."""

    prompt: str = "prompt"  # the prompt's column
    ground_truth: str = ""  # a top-level answer column; "": reward_model.ground_truth
    data_source: str = ""  # the data_source of rows without one; "": the column is required


def check_prompt_row(row: Row, ref: RowRef, columns: RowColumns = RowColumns()) -> Row:
    """Validate an RL prompt row; returns it normalised (the standard keys, extra_info always a dict)."""
    prompt = check_prompt(require_field(row, ref, columns.prompt), ref, columns.prompt)
    if row.get("data_source") is None and columns.data_source:
        data_source = columns.data_source
    elif row.get("data_source") is None:
        raise RowError(f"{ref}: missing 'data_source' (a dataset without the column: set data.prompts.data_source)")
    else:
        data_source = check_str(row, ref, "data_source")
    extra = check_extra_info(row, ref)
    if columns.ground_truth:
        truth = require_field(row, ref, columns.ground_truth)
        extra = {columns.ground_truth: truth, **extra}  # under its own name too (a TRL reward's keyword)
        return {"prompt": prompt, "data_source": data_source,
                "reward_model": {"style": "rule", "ground_truth": truth}, "extra_info": extra}  # fmt: skip
    reward_model = row.get("reward_model")
    if reward_model is None:
        raise RowError(
            f"{ref}: missing 'reward_model' (an answer in a column of its own: set data.prompts.ground_truth_key)"
        )
    if not isinstance(reward_model, dict):
        raise ref.error("reward_model", f"expected a dict, got {type(reward_model).__name__} in")
    style = reward_model.get("style") or "rule"
    if not isinstance(style, str):
        raise ref.error("reward_model.style", f"expected a string, got {type(style).__name__} in")
    if style != "model" and reward_model.get("ground_truth") is None:
        raise ref.error("reward_model.ground_truth", "missing")
    return {
        "prompt": prompt,
        "data_source": data_source,
        "reward_model": {"style": style, "ground_truth": reward_model.get("ground_truth")},
        "extra_info": extra,
    }


def check_extra_info(row: Row, ref: RowRef) -> dict[str, Any]:
    extra = row.get("extra_info")
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise ref.error("extra_info", f"expected a dict, got {type(extra).__name__} in")
    return extra


def write_rows(path: str | os.PathLike, rows: Sequence[Row]) -> str:
    """Write rows as ``.parquet`` or ``.jsonl`` (chosen by the file name); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(rows)), path)
    elif path.endswith(".jsonl"):
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"{path}: unknown dataset format; use a .parquet or .jsonl file name")
    return path
