"""The shape of a decoder-only transformer, read from a Hugging Face ``config.json``.

Everything the planner predicts (FLOPs, bytes, memory) is a function of these few numbers,
not of the weights: ``ModelShape.from_folder("MODEL_DIR")`` or ``ModelShape.from_hf_config(d)``.
Covers the Llama / Qwen2 family (gated MLP, grouped-query attention, RMSNorm; Qwen2 adds
biases to q/k/v).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = False

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelShape:
        """From the keys of a ``config.json`` (a multimodal config's ``text_config`` wins)."""
        c = {**config, **config.get("text_config", {})}
        missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size") if k not in c]
        if missing:
            raise ValueError(f"model config: no {', '.join(missing)}; the planner models decoder-only transformers")
        heads = int(c["num_attention_heads"])
        return cls(
            layers=int(c["num_hidden_layers"]),
            hidden=int(c["hidden_size"]),
            intermediate=int(c["intermediate_size"]),
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
            vocab=int(c["vocab_size"]),
            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")),
        )

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> ModelShape:
        try:
            with open(os.path.join(path, "config.json")) as f:
                return cls.from_hf_config(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{os.fspath(path)}: no readable config.json ({type(e).__name__}); give a Hugging Face model folder") from None

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """One decoder layer: attention projections (+ q/k/v biases), gated MLP, two norms."""
        h, q, kv = self.hidden, self.q_width, self.kv_width
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The LM head's own parameters (0 when tied to the embedding)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def params(self) -> int:
        """All parameters, a tied embedding counted once."""
        return self.layers * self.layer_params + self.embedding_params + self.head_params + self.hidden

    @property
    def root_params(self) -> int:
        """What FSDP2's root unit holds besides the layers: embedding, final norm, LM head."""
        return self.embedding_params + self.head_params + self.hidden

    def matmul_params(self) -> int:
        """Weights a token multiplies through in a forward: the layers' and the LM head's."""
        return self.layers * self.layer_params + self.vocab * self.hidden

    def key(self) -> str:
        """A short name of the shape, for cache files: ``L2-h128-i256-H2-kv1-d64-V262-untied``."""
        tie = "tied" if self.tied_embeddings else "untied"
        return f"L{self.layers}-h{self.hidden}-i{self.intermediate}-H{self.heads}-kv{self.kv_heads}-d{self.head_dim}-V{self.vocab}-{tie}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
