"""Supervised fine-tuning and preference-pair datasets.

SFT rows are either ``{"prompt": [messages], "response": str}`` or
``{"messages": [..., {"role": "assistant", "content": str}]}``. A sequence is
``chat_template(prompt, add_generation_prompt=True) + response + EOS``; the loss mask
is 1 exactly on the response tokens and the EOS (the tokens the model must learn to emit).
TRL's prompt-completion rows read the same way: ``completion`` is the response (text, or one
assistant message), and a plain-text ``prompt`` is the model's input as it is (no template).

Preference rows are ``{"prompt": [messages], "chosen": str, "rejected": str}``; both
sequences are built the same way and right-padded to one common width, so a reward
model can score ``cat([chosen, rejected])`` in one forward pass. ``chosen`` and ``rejected``
may be conversations ending with the assistant's answer (TRL's conversational format); without
a ``prompt`` the turns before those answers are the prompt, and must be the same in both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from flowrl.batch import Batch
from flowrl.data.dataset import pad_token_id, render_prompt, tokenize_texts
from flowrl.data.padding import left_pad, right_pad
from flowrl.data.rows import Prompt, Row, RowRef, check_messages, check_prompt, check_str, read_files, require_field
from flowrl.keys import Keys

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SEQUENCE_OVERLONG_POLICIES = ("filter", "truncate_right", "error")


@dataclass(frozen=True)
class SequenceDataConfig:
    max_length: int = 1024  # prompt + response + EOS, in tokens
    overlong: str = "filter"  # "filter" | "truncate_right" | "error"

    def __post_init__(self) -> None:
        if self.overlong not in SEQUENCE_OVERLONG_POLICIES:
            raise ValueError(
                f"data.overlong={self.overlong!r}: choose one of {list(SEQUENCE_OVERLONG_POLICIES)}"
            )
        if self.max_length <= 1:
            raise ValueError(f"data.max_length={self.max_length} must be at least 2")


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token; SFT needs one to end every response")
    return int(tokenizer.eos_token_id)


def split_sft_row(row: Row, ref: RowRef) -> tuple[Prompt, str]:
    """(prompt, response text) of an SFT row in any accepted form."""
    if row.get("prompt") is not None:
        prompt = check_prompt(row["prompt"], ref)
        if row.get("response") is None and row.get("completion") is not None:  # TRL's prompt-completion
            return prompt, answer_text(row["completion"], ref, "completion", alone=True)[1]
        return prompt, check_str(row, ref, "response", allow_empty=True)
    if row.get("messages") is None:
        raise ref.error("prompt", "an SFT row needs 'prompt' + 'response' (or 'completion') or 'messages'; missing")
    return answer_text(row["messages"], ref, "messages")


def answer_text(value: object, ref: RowRef, field: str, alone: bool = False) -> tuple[list[dict[str, str]], str]:
    """(the turns before, the answer) of a conversation ending with an assistant turn after at least
    one other (``alone``: the answer may be the only turn), or ([], text) of plain text."""
    if isinstance(value, str):
        return [], value
    messages = check_messages(value, ref, field)
    last = len(messages) - 1
    if messages[last]["role"] != "assistant" or (last < 1 and not alone):
        raise ref.error(f"{field}[{last}].role", "a conversation must end with an assistant turn after a prompt;")
    return messages[:last], messages[last]["content"]


class _SequenceBuilder:
    """Turns (prompt, response) pairs into ids with a length policy and counts what it did."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: SequenceDataConfig) -> None:
        self.tokenizer, self.config = tokenizer, config
        self.eos_id, self.pad_id = eos_token_id(tokenizer), pad_token_id(tokenizer)
        self.stats = {"n_rows": 0, "n_filtered": 0, "n_truncated": 0, "n_kept": 0}

    def encode(
        self, ref: RowRef, prompt_text: str, responses: Sequence[str]
    ) -> tuple[list[int], list[list[int]]] | None:
        """(prompt ids, [response ids + EOS] per response) or None when the row is filtered."""
        prompt_ids, *resp_ids = tokenize_texts(self.tokenizer, [prompt_text, *responses])
        resp_ids = [ids + [self.eos_id] for ids in resp_ids]
        limit = self.config.max_length
        longest = len(prompt_ids) + max(len(r) for r in resp_ids)
        if longest <= limit:
            return prompt_ids, resp_ids
        if self.config.overlong == "error":
            raise ValueError(
                f"{ref}: sequence has {longest} tokens, more than data.max_length={limit}; "
                "raise the limit or set data.overlong to 'filter' or 'truncate_right'"
            )
        if self.config.overlong == "filter" or len(prompt_ids) >= limit:
            self.stats["n_filtered"] += 1
            return None
        self.stats["n_truncated"] += 1
        return prompt_ids, [r[: limit - len(prompt_ids)] for r in resp_ids]


@dataclass(frozen=True)
class SFTItem:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS unless truncated


class SFTDataset:
    """Tokenized SFT sequences; ``collate(indices)`` makes a right-padded Batch with a loss mask."""

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer: PreTrainedTokenizerBase,
        config: SequenceDataConfig = SequenceDataConfig(),
    ) -> None:
        builder = _SequenceBuilder(tokenizer, config)
        self.pad_id = builder.pad_id
        self.items: list[SFTItem] = []
        for ref, row in read_files(paths):
            builder.stats["n_rows"] += 1
            prompt, response = split_sft_row(row, ref)
            encoded = builder.encode(ref, render_prompt(tokenizer, prompt, ref), [response])
            if encoded is not None:
                self.items.append(SFTItem(encoded[0], encoded[1][0]))
        builder.stats["n_kept"] = len(self.items)
        self.stats = builder.stats
        log.info("SFT dataset %s: %s", paths, self.stats)

    def __len__(self) -> int:
        return len(self.items)

    def collate(self, indices: Sequence[int]) -> Batch:
        return collate_sft([self.items[i] for i in indices], self.pad_id)

    def collate_prompts(self, indices: Sequence[int]) -> Batch:
        """The prompts alone, left-padded as for generation: PROMPT_IDS/PROMPT_MASK [B, P]."""
        ids, mask = left_pad([self.items[i].prompt_ids for i in indices], self.pad_id)  # [B, P]
        return Batch({Keys.PROMPT_IDS: ids, Keys.PROMPT_MASK: mask})


def collate_sft(items: Sequence[SFTItem], pad_id: int) -> Batch:
    """INPUT_IDS/ATTENTION_MASK [B, L] right-padded; LOSS_MASK [B, L] 1 on response tokens."""
    seqs = [it.prompt_ids + it.response_ids for it in items]
    ids, mask = right_pad(seqs, pad_id)  # [B, L], [B, L]
    loss_mask = torch.zeros(ids.shape, dtype=torch.float32)  # [B, L]
    for i, it in enumerate(items):
        start = len(it.prompt_ids)
        loss_mask[i, start : start + len(it.response_ids)] = 1.0
    return Batch({Keys.INPUT_IDS: ids, Keys.ATTENTION_MASK: mask, Keys.LOSS_MASK: loss_mask})


@dataclass(frozen=True)
class PairItem:
    chosen_ids: list[int]
    rejected_ids: list[int]


class PreferenceDataset:
    """(prompt, chosen, rejected) rows for reward-model training."""

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer: PreTrainedTokenizerBase,
        config: SequenceDataConfig = SequenceDataConfig(),
    ) -> None:
        builder = _SequenceBuilder(tokenizer, config)
        self.pad_id = builder.pad_id
        self.items: list[PairItem] = []
        for ref, row in read_files(paths):
            builder.stats["n_rows"] += 1
            prompt, answers = preference_row(row, ref)
            encoded = builder.encode(ref, render_prompt(tokenizer, prompt, ref), answers)
            if encoded is not None:
                p, (c, r) = encoded
                self.items.append(PairItem(p + c, p + r))
        builder.stats["n_kept"] = len(self.items)
        self.stats = builder.stats
        log.info("preference dataset %s: %s", paths, self.stats)

    def __len__(self) -> int:
        return len(self.items)

    def collate(self, indices: Sequence[int]) -> Batch:
        return collate_pairs([self.items[i] for i in indices], self.pad_id)


def preference_row(row: Row, ref: RowRef) -> tuple[Prompt, list[str]]:
    """(prompt, [chosen, rejected]) of a preference row with an explicit or implicit prompt."""
    (before_c, chosen), (before_r, rejected) = (
        answer_text(require_field(row, ref, key), ref, key, alone=row.get("prompt") is not None)
        for key in ("chosen", "rejected")
    )
    if row.get("prompt") is not None:
        if before_c or before_r:
            raise ref.error("chosen", "with a 'prompt', chosen and rejected hold only the answer, not earlier turns, in")
        return check_prompt(row["prompt"], ref), [chosen, rejected]
    if not before_c or before_c != before_r:
        raise ref.error(
            "prompt", "missing, and chosen and rejected are not conversations that share their turns before the answer:"
        )
    return before_c, [chosen, rejected]


def collate_pairs(items: Sequence[PairItem], pad_id: int) -> Batch:
    """CHOSEN_/REJECTED_ IDS and MASK [B, L], right-padded to one width L for both."""
    width = max(max(len(it.chosen_ids), len(it.rejected_ids)) for it in items)
    chosen, chosen_mask = right_pad([it.chosen_ids for it in items], pad_id, width)  # [B, L]
    rejected, rejected_mask = right_pad([it.rejected_ids for it in items], pad_id, width)  # [B, L]
    return Batch(
        {
            Keys.CHOSEN_IDS: chosen,
            Keys.CHOSEN_MASK: chosen_mask,
            Keys.REJECTED_IDS: rejected,
            Keys.REJECTED_MASK: rejected_mask,
        }
    )
