"""Prompts and greedy references shared by the generation tests."""

from __future__ import annotations

import torch

from flowrl.batch import Batch
from flowrl.keys import Keys

PAD, EOS = 0, 1  # ids of the tiny tokenizer (flowrl.models.tiny)


def make_prompts(rows: int, seed: int, vocab: int = 256, min_len: int = 3, max_len: int = 10) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, max_len), PAD)
    mask = torch.zeros(rows, max_len, dtype=torch.long)
    for i in range(rows):
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids[i, max_len - n :] = torch.randint(4, vocab, (n,), generator=g)
        mask[i, max_len - n :] = 1
    return Batch({Keys.PROMPT_IDS: ids, Keys.PROMPT_MASK: mask})


def hf_greedy(model: torch.nn.Module, prompts: Batch, max_new: int) -> list[list[int]]:
    """Hugging Face greedy continuations, cut after the first EOS."""
    out = model.generate(
        input_ids=prompts[Keys.PROMPT_IDS],
        attention_mask=prompts[Keys.PROMPT_MASK],
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )[:, prompts[Keys.PROMPT_IDS].shape[1] :]
    rows = []
    for row in out.tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return rows


def responses(batch: Batch) -> list[list[int]]:
    ids, mask = batch[Keys.RESPONSE_IDS], batch[Keys.RESPONSE_MASK]
    return [r[m.bool()].tolist() for r, m in zip(ids, mask)]
