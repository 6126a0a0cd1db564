"""Padding token-id lists into rectangular tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align sequences: returns (ids [B, P] int64, mask [B, P] int64), P = longest length."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, P]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, P]
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def right_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-align sequences: returns (ids [B, L] int64, mask [B, L] int64), L = width or longest."""
    longest = max((len(s) for s in seqs), default=0)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"right_pad: width={width} is shorter than the longest sequence ({longest})")
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, L]
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
