"""RL prompt datasets: rows -> chat template -> token ids -> left-padded prompt batches.

``PromptDataset`` reads parquet/JSONL files in the standard row format (see
``flowrl.data.rows``), renders each prompt with the tokenizer's chat template
(``add_generation_prompt=True``), tokenizes it without adding special tokens (the
template already has them) and applies the prompt-length policy:

- ``overlong="filter"``: drop prompts longer than ``max_prompt_length`` tokens;
- ``overlong="truncate_left"``: keep the last ``max_prompt_length`` tokens (the end of a
  prompt holds the question and the generation prompt); the prompt text is re-decoded
  from the kept ids so text and ids agree;
- ``overlong="error"``: refuse, naming the first long row.

``stats`` counts what happened: ``n_rows``, ``n_filtered``, ``n_truncated``, ``n_kept``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from flowrl.batch import Batch
from flowrl.data.padding import left_pad
from flowrl.data.rows import Prompt, RowColumns, RowRef, as_messages, check_prompt_row, read_files
from flowrl.keys import Keys

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

OVERLONG_POLICIES = ("filter", "truncate_left", "error")


@dataclass  # not frozen: OmegaConf 2.3 makes a frozen dataclass a read-only node that recipes cannot set
class PromptDataConfig:
    """Prompt length after the chat template, and what to do with longer prompts."""

    max_prompt_length: int = 512  # tokens after the chat template
    overlong: str = "filter"  # "filter" | "truncate_left" | "error"
    # datasets in other layouts (docs/data.md), read without converting them:
    prompt_key: str = "prompt"  # the column with the prompt (OpenRLHF's input_key, verl's prompt_key)
    # a top-level column with the answer (TRL's "solution", OpenRLHF's "label"); "": reward_model.ground_truth
    ground_truth_key: str = ""
    data_source: str = ""  # for rows without a data_source column (picks the rule reward); "": required

    def __post_init__(self) -> None:
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"data.overlong={self.overlong!r}: choose one of {list(OVERLONG_POLICIES)}")
        if self.max_prompt_length <= 0:
            raise ValueError(f"data.max_prompt_length={self.max_prompt_length} must be positive")


@dataclass(frozen=True)
class PromptItem:
    """One tokenized prompt with what its reward needs."""

    messages: list[dict[str, str]]
    prompt_text: str
    prompt_ids: list[int]
    ground_truth: Any
    data_source: str
    extra_info: dict[str, Any] = field(default_factory=dict)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "tokenizer has no pad token; set one before building datasets "
            "(e.g. tokenizer.pad_token = tokenizer.eos_token, knowing that pad then equals EOS)"
        )
    return int(tokenizer.pad_token_id)


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], ref: RowRef | str
) -> str:
    """The prompt as text: the chat template with the generation prompt appended."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{ref}: the tokenizer has no chat template; use an instruct/chat tokenizer "
            "or set tokenizer.chat_template"
        )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):
        raise TypeError(f"{ref}: apply_chat_template returned {type(text).__name__}, expected text")
    return text


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, ref: RowRef | str) -> str:
    """Chat messages through the chat template; plain text as it is."""
    return prompt if isinstance(prompt, str) else render_chat(tokenizer, prompt, ref)


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added by the tokenizer."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


class PromptDataset:
    """Tokenized prompts of one or more files; ``collate(indices)`` makes a left-padded Batch."""

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer: PreTrainedTokenizerBase,
        config: PromptDataConfig = PromptDataConfig(),
    ) -> None:
        self.config = config
        self.pad_id = pad_token_id(tokenizer)
        columns = RowColumns(config.prompt_key, config.ground_truth_key, config.data_source)
        rows = [(ref, check_prompt_row(row, ref, columns)) for ref, row in read_files(paths)]
        texts = [render_prompt(tokenizer, row["prompt"], ref) for ref, row in rows]
        all_ids = tokenize_texts(tokenizer, texts)
        self.items: list[PromptItem] = []
        self.stats = {"n_rows": len(rows), "n_filtered": 0, "n_truncated": 0, "n_kept": 0}
        for (ref, row), text, ids in zip(rows, texts, all_ids):
            if len(ids) > config.max_prompt_length:
                kept = self._handle_overlong(ref, ids, tokenizer)
                if kept is None:
                    continue
                ids, text = kept, str(tokenizer.decode(kept, skip_special_tokens=False))
            self.items.append(_item(row, text, ids))
        self.stats["n_kept"] = len(self.items)
        log.info("prompt dataset %s: %s", paths, self.stats)

    def _handle_overlong(
        self, ref: RowRef, ids: list[int], tokenizer: PreTrainedTokenizerBase
    ) -> list[int] | None:
        limit = self.config.max_prompt_length
        if self.config.overlong == "error":
            raise ValueError(
                f"{ref}: prompt has {len(ids)} tokens, more than data.max_prompt_length={limit}; "
                "raise the limit or set data.overlong to 'filter' or 'truncate_left'"
            )
        if self.config.overlong == "filter":
            self.stats["n_filtered"] += 1
            return None
        self.stats["n_truncated"] += 1
        return ids[len(ids) - limit :]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> PromptItem:
        return self.items[index]

    def collate(self, indices: Sequence[int]) -> Batch:
        return collate_prompts([self.items[i] for i in indices], self.pad_id)


def _item(row: dict[str, Any], text: str, ids: list[int]) -> PromptItem:
    return PromptItem(
        messages=as_messages(row["prompt"]),
        prompt_text=text,
        prompt_ids=ids,
        ground_truth=row["reward_model"]["ground_truth"],
        data_source=row["data_source"],
        extra_info=row["extra_info"],
    )


def collate_prompts(items: Sequence[PromptItem], pad_id: int) -> Batch:
    """Left-pad prompt ids to the longest prompt; strings and dicts ride as non-tensor fields."""
    if not items:
        raise ValueError("collate_prompts: no prompts to collate")
    ids, mask = left_pad([it.prompt_ids for it in items], pad_id)  # [B, P], [B, P]
    return Batch(
        {Keys.PROMPT_IDS: ids, Keys.PROMPT_MASK: mask},
        {
            Keys.MESSAGES: [it.messages for it in items],
            Keys.PROMPT_TEXT: [it.prompt_text for it in items],
            Keys.GROUND_TRUTH: [it.ground_truth for it in items],
            Keys.DATA_SOURCE: [it.data_source for it in items],
            Keys.EXTRA_INFO: [it.extra_info for it in items],
        },
    )


def concat_prompt_batches(batches: Sequence[Batch], pad_id: int) -> Batch:
    """Concatenate batches whose prompts were collated apart: ``PROMPT_IDS`` / ``PROMPT_MASK``
    [b, P_i] are left-padded to the widest P first (pad id, mask 0); every other field as is."""
    width = max(b[Keys.PROMPT_IDS].shape[1] for b in batches)
    widened = []
    for b in batches:
        pad = width - b[Keys.PROMPT_IDS].shape[1]
        if pad:
            b = b.clone()
            b[Keys.PROMPT_IDS] = torch.nn.functional.pad(b[Keys.PROMPT_IDS], (pad, 0), value=pad_id)  # [b, P]
            b[Keys.PROMPT_MASK] = torch.nn.functional.pad(b[Keys.PROMPT_MASK], (pad, 0), value=0)  # [b, P]
        widened.append(b)
    return Batch.concat(widened)
