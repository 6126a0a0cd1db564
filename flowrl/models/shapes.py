"""Benchmark models: real Qwen2.5 architectures with random weights.

Throughput does not depend on weight values, so a benchmark needs only the shape:

    make_random_model("/tmp/qwen-0.5b", "qwen2.5-0.5b")   # config, bf16 safetensors, tokenizer

The tokenizer is the tiny byte-level one (``flowrl.models.tiny``): one token per
character, with the same chat template. Ids beyond its vocabulary (the model samples
from the full Qwen vocabulary) decode to nothing, which is fine for timing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import Qwen2Config

# hidden, intermediate, layers, attention heads, kv heads, vocab, tied embeddings
QWEN25_SHAPES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False),
}


def qwen25_config(shape: str) -> Qwen2Config:
    """The transformers config of a Qwen2.5 shape (``QWEN25_SHAPES``), eos id 1, pad id 0."""
    from transformers import Qwen2Config

    if shape not in QWEN25_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose one of {sorted(QWEN25_SHAPES)}")
    hidden, inter, layers, heads, kv_heads, vocab, tied = QWEN25_SHAPES[shape]
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        max_position_embeddings=32768,
        rope_theta=1e6,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )


def parameter_count(shape: str) -> int:
    """Parameters of the shape (a tied embedding counted once), counted on the meta device."""
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(qwen25_config(shape))
    return sum(p.numel() for p in model.parameters())


def make_random_model(
    path: str | os.PathLike,
    shape: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Write a random-weight model of ``shape`` with the tiny tokenizer to ``path`` (kept if present)."""
    from transformers import Qwen2ForCausalLM

    from flowrl.models.tiny import make_tokenizer

    out = Path(path)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(qwen25_config(shape)).to(dtype)
    model.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out
