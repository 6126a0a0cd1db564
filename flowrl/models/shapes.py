"""Benchmark models: real Qwen2.5 architectures with random weights.

Throughput does not depend on weight values, so a benchmark needs only the shape:

    make_random_model("/tmp/qwen-0.5b", "qwen2.5-0.5b")   # config, bf16 safetensors, tokenizer

Its responses hardly ever end before the length limit (EOS is one of ~152k near-uniform
tokens). With ``stop_mean`` the weights alone end them after ``stop_mean`` tokens on average
(``add_stop``), so every engine that reads the folder samples the same lengths at temperature 1.

The tokenizer is the tiny byte-level one (``flowrl.models.tiny``): one token per
character, with the same chat template, its vocabulary padded to the model's with entries
that decode to their own text, so every id the model samples is one the tokenizer knows.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import Qwen2Config, Qwen2ForCausalLM

# hidden, intermediate, layers, attention heads, kv heads, vocab, tied embeddings
QWEN25_SHAPES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False),
}
STOP_FILE = "stop.json"  # add_stop's calibration, next to config.json
CALIBRATION_IDS = (2, 512)  # random-token sequences x positions that calibrate the stop probability


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
    stop_mean: float = 0.0,
) -> Path:
    """Write a random-weight model of ``shape`` with the tiny tokenizer to ``path`` (kept if present).

    ``stop_mean > 0``: EOS ends responses after ``stop_mean`` tokens on average (``add_stop``); the
    calibration goes to ``path/stop.json``. 0: EOS is (almost) never sampled.
    """
    from transformers import Qwen2ForCausalLM

    from flowrl.models.tiny import make_tokenizer

    out = Path(path)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(qwen25_config(shape)).to(dtype)
    stop = add_stop(model, stop_mean, seed) if stop_mean > 0 else None
    model.save_pretrained(out)
    make_tokenizer(model.config.vocab_size).save_pretrained(out)
    if stop is not None:
        (out / STOP_FILE).write_text(json.dumps(stop, indent=1))
    return out


@torch.no_grad()
def add_stop(model: Qwen2ForCausalLM, stop_mean: float, seed: int = 0) -> dict[str, float]:
    """Edit ``model`` in place so that EOS has probability 1/``stop_mean`` at every position.

    Hidden dimension k (the last) is ``a`` in every token's embedding; no layer writes it (rows k of
    ``o_proj`` and ``down_proj`` are 0) or reads it (the layer norms' weight at k is 0), so after the
    final norm it is the same ``y_k`` at every position. EOS's output row is ``beta`` at k and 0
    elsewhere: its logit is ``beta * y_k``, with ``beta`` bisected so that the mean EOS probability
    over random-token positions is 1/``stop_mean``. Lengths are then geometric, mean ``stop_mean``.
    """
    cfg, inner = model.config, model.model
    if stop_mean <= 1:
        raise ValueError(f"add_stop: stop_mean={stop_mean} must be > 1 (tokens per response, EOS included)")
    d, k, eos = cfg.hidden_size, cfg.hidden_size - 1, cfg.eos_token_id
    # k dominates every RMS norm (c against the embeddings' sigma per dimension): layer inputs shrink
    # by ~c, a layer's write into the residual has gain ~sigma^2 d / c <= 0.1, the other dimensions
    # stay near sigma, and the final norm's RMS is ~a / sqrt(d) everywhere
    c = max(1.0, 10 * cfg.initializer_range**2 * d)
    inner.embed_tokens.weight[:, k] = c * math.sqrt(d)
    for layer in inner.layers:
        layer.self_attn.o_proj.weight[k] = 0
        layer.mlp.down_proj.weight[k] = 0
        layer.input_layernorm.weight[k] = 0
        layer.post_attention_layernorm.weight[k] = 0
    # y_k ~ 1/a, so the a * y_k that tied embeddings add to every logit is ~1; a power of two, so y_k
    # is the same whether an engine rounds the normalized state to bf16 before the weight or after
    inner.norm.weight[k] = 2.0 ** round(math.log2(1 / (c * d)))
    head = model.lm_head.weight  # [V, d], the embedding itself when tied
    if not cfg.tie_word_embeddings:
        head[:, k] = 0
    head[eos] = 0
    hidden, rest = _final_states(model, seed)  # [N, d], [N]

    def eos_probs(beta: float) -> torch.Tensor:
        head[eos, k] = beta  # rounded to the model's dtype
        logits = (hidden @ head[eos]).float().cpu()  # [N], EOS's logit rounded as an engine rounds it
        return torch.sigmoid(logits - rest)  # [N]

    beta = _bisect(lambda beta: float(eos_probs(beta).mean()), 1 / stop_mean)
    p = eos_probs(beta).view(CALIBRATION_IDS)  # [B, T]
    return {
        "stop_mean": stop_mean,
        "hidden_dim": k,
        "a": float(inner.embed_tokens.weight[0, k]),
        "final_norm_weight": float(inner.norm.weight[k]),
        "beta": float(head[eos, k]),
        "eos_prob_mean": float(p.mean()),
        "eos_prob_std_over_positions": float(p.mean(0).std()),
        "eos_prob_min": float(p.min()),
        "eos_prob_max": float(p.max()),
        "calibration_ids": list(CALIBRATION_IDS),
    }


def _final_states(model: Qwen2ForCausalLM, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """On random tokens (no pad or EOS): the hidden states after the final norm, and the log-sum-exp
    of the logits of every token but EOS. -> [N, d] on the model's device, [N] on the CPU"""
    cfg = model.config
    ids = torch.randint(2, cfg.vocab_size, CALIBRATION_IDS, generator=torch.Generator().manual_seed(seed))
    hidden = model.model(input_ids=ids.to(model.device)).last_hidden_state.flatten(0, 1)  # [N, d]
    rest = []
    for rows in hidden.split(256):  # [<=256, d]
        logits = model.lm_head(rows).float()  # [<=256, V], rounded to the model's dtype like an engine's
        logits[:, cfg.eos_token_id] = -math.inf
        rest.append(logits.logsumexp(-1).cpu())
    return hidden, torch.cat(rest)


def _bisect(f: Callable[[float], float], target: float) -> float:
    """The x >= 0 where the increasing ``f`` reaches ``target`` (f(0) < target); of the two ends of
    the last interval, the one closer to it (``f`` may be a step function: bf16 logits)."""
    lo, hi = 0.0, 1.0
    while f(hi) < target:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda x: abs(f(x) - target))


def truncated_mean_length(p: float, max_len: int) -> float:
    """E[min(L, max_len)] for geometric lengths L (EOS included) with stop probability ``p`` per token:
    sum_{l < max_len} (1 - p)^l = (1 - (1 - p)^max_len) / p."""
    return (1 - (1 - p) ** max_len) / p
