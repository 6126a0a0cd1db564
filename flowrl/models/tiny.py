"""Tiny models made on the spot: a byte-level tokenizer and a random Qwen2.

Tests and CPU recipes need a causal LM that transformers and vLLM both load from
a folder, with no download. ``make_tiny_model(path)`` writes one: a byte-level
tokenizer (one token per byte, plus chat-role and control tokens, with a chat
template) and a randomly initialised Qwen2 of a few hundred thousand parameters.
vLLM's CPU backend needs head_dim >= 32, so heads are 64 wide.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 64
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False


def make_tokenizer(size: int = 0):
    """A byte-level tokenizer: ids 0..3 are pad, eos, unk and control; then 256 bytes; then roles.

    ``size`` > 262 pads the vocabulary to that many ids with entries ``<262>``, ``<263>``, ...
    that encoding never produces (there are no merges) and that decode to their own text, so a
    model with a large vocabulary samples no id the tokenizer lacks (some engines mask those).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, EOS, UNK]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet + ROLE_TOKENS)}
    vocab.update({f"<{i}>": i for i in range(len(vocab), size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_tiny_model(
    path: str | os.PathLike | None = None,
    config: TinyModelConfig = TinyModelConfig(),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """Build (and, with ``path``, save) a random tiny Qwen2 and its tokenizer; returns (model, tokenizer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **asdict(config),
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg).to(dtype)
    if path is not None:
        os.makedirs(path, exist_ok=True)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        model.generation_config.save_pretrained(path)
    return model, tokenizer
