"""From a rollout batch to model inputs, and from logits to per-token log-probs.

A rollout row is a left-padded prompt (P columns) followed by a right-padded response
(R columns), so the response starts at column P in every row. The token at response
column j is predicted by the logits at sequence column P - 1 + j: the trainer keeps the
logits of columns P - 1 .. P + R - 2 only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from flowrl.batch import Batch
from flowrl.keys import Keys


@dataclass(frozen=True)
class ModelInputs:
    """One micro-batch ready for a causal LM: ``P' + R'`` columns after trimming padding."""

    input_ids: torch.Tensor  # [b, P' + R'] int64
    attention_mask: torch.Tensor  # [b, P' + R'] int64
    position_ids: torch.Tensor  # [b, P' + R'] int64
    response_ids: torch.Tensor  # [b, R'] int64, the targets
    response_valid: torch.Tensor  # [b, R'] bool, columns before the end of each response
    response_width: int  # R, the width of the batch's response columns before trimming


def response_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-zero mask column plus one (0 for an empty response).  # [b]"""
    cols = torch.arange(1, response_mask.shape[1] + 1, device=response_mask.device)  # [R]
    return (cols * (response_mask > 0)).amax(dim=1)  # [b]


def model_inputs(batch: Batch, trim: bool = True) -> ModelInputs:
    """Concatenate prompt and response; with ``trim``, drop columns that are padding in every row.

    The attention mask covers the real prompt tokens and each response up to its end
    (``response_lengths``), so a zero inside a response mask (a token excluded from the
    loss) still takes part in attention. Positions count real tokens from 0.
    """
    prompt_ids, prompt_mask = batch[Keys.PROMPT_IDS], batch[Keys.PROMPT_MASK]  # [b, P]
    response_ids = batch[Keys.RESPONSE_IDS]  # [b, R]
    width = response_ids.shape[1]
    lengths = response_lengths(batch[Keys.RESPONSE_MASK])  # [b]
    start, keep = 0, width
    if trim:
        real_cols = prompt_mask.any(dim=0).nonzero()
        start = int(real_cols[0]) if len(real_cols) else prompt_ids.shape[1] - 1
        start = min(start, prompt_ids.shape[1] - 1)  # keep column P - 1: it predicts token 0
        keep = max(int(lengths.max()), 1)
    prompt_ids, prompt_mask = prompt_ids[:, start:], prompt_mask[:, start:]  # [b, P']
    response_ids = response_ids[:, :keep]  # [b, R']
    valid = torch.arange(keep, device=lengths.device)[None, :] < lengths[:, None]  # [b, R']
    attention_mask = torch.cat([prompt_mask.long(), valid.long()], dim=1)  # [b, P' + R']
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [b, P' + R']
    return ModelInputs(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=attention_mask,
        position_ids=position_ids,
        response_ids=response_ids,
        response_valid=valid,
        response_width=width,
    )


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[target] in fp32.  logits [b, R, V], targets [b, R] -> [b, R]"""
    scaled = logits.float() / temperature  # [b, R, V]
    log_z = torch.logsumexp(scaled, dim=-1)  # [b, R]
    picked = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [b, R]
    return picked - log_z


def entropy_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v with z = logits / T.  [b, R, V] -> [b, R]"""
    scaled = logits.float() / temperature  # [b, R, V]
    probs = torch.softmax(scaled, dim=-1)  # [b, R, V]
    return torch.logsumexp(scaled, dim=-1) - (probs * scaled).sum(dim=-1)


def pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad ``x`` [b, R'] with zeros to [b, width]."""
    if x.shape[1] == width:
        return x
    out = x.new_zeros(x.shape[0], width)
    out[:, : x.shape[1]] = x
    return out


def head_token_outputs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    chunk_size: int,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of ``targets`` from final hidden states, ``chunk_size`` tokens
    at a time: only one chunk's [c, V] logits exist at once, in fp32. With autograd on and
    more than one chunk, each chunk is checkpointed, so backward recomputes its logits instead
    of keeping them; a single chunk keeps them (recomputing would cost time and save nothing).

    hidden [n, H], targets [n] -> [n], [n] | None; ``chunk_size`` <= 0: one chunk.
    """

    def outputs(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h)  # [c, V], the head's dtype
        if softcap is not None:  # Gemma 2 style final soft-capping, as the model's forward does
            logits = torch.tanh(logits / softcap) * softcap
        lp = token_logprobs(logits, t, temperature)  # [c]
        return lp, entropy_from_logits(logits, temperature) if with_entropy else lp.new_zeros(())

    n = hidden.shape[0]
    step = chunk_size if chunk_size > 0 else max(n, 1)
    grad = torch.is_grad_enabled() and hidden.requires_grad and n > step
    logprobs, entropies = [], []
    for start in range(0, n, step):
        h, t = hidden[start : start + step], targets[start : start + step]  # [c, H], [c]
        if grad:
            lp, ent = torch.utils.checkpoint.checkpoint(outputs, h, t, use_reentrant=False)
        else:
            lp, ent = outputs(h, t)
        logprobs.append(lp)
        entropies.append(ent)
    if n == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty if with_entropy else None
    return torch.cat(logprobs), torch.cat(entropies) if with_entropy else None
