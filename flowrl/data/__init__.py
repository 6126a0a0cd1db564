"""Datasets in the standard row format, deterministic resumable loaders, and collation into Batches."""

from flowrl.data.dataset import PromptDataConfig, PromptDataset, PromptItem, collate_prompts, concat_prompt_batches
from flowrl.data.padding import left_pad, right_pad
from flowrl.data.rows import RowError, read_rows, write_rows
from flowrl.data.sampler import DataLoader, PromptSampler
from flowrl.data.sft import PreferenceDataset, SequenceDataConfig, SFTDataset, collate_pairs, collate_sft

__all__ = [
    "DataLoader",
    "PreferenceDataset",
    "PromptDataConfig",
    "PromptDataset",
    "PromptItem",
    "PromptSampler",
    "RowError",
    "SFTDataset",
    "SequenceDataConfig",
    "collate_pairs",
    "collate_prompts",
    "collate_sft",
    "concat_prompt_batches",
    "left_pad",
    "read_rows",
    "right_pad",
    "write_rows",
]
