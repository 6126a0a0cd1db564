"""Padding-free model inputs and token-budget micro-batches.

A micro-batch's sequences are packed into one row: the real tokens of every row, one
after another, with position ids that restart at 0 for each sequence. Attention stays
within a sequence: flash-attention kernels find the sequence boundaries from the position
ids (varlen), other implementations (sdpa, eager; CPU) get a block-diagonal causal 4D
mask. The padded layout ([b, T], a 2D mask) stays available (``packing=False``).

Either way the model's per-position outputs are read through one flat index: output
column w of row i comes from the flattened position ``index[i, w]`` of the model's
[rows * N] outputs, so the code after the forward does not care how rows were laid out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowrl.algos.rewards import last_token_index
from flowrl.batch import Batch
from flowrl.engines.sequences import head_token_outputs, model_inputs, response_lengths
from flowrl.keys import Keys


@dataclass(frozen=True)
class TokenInputs:
    """One forward's inputs, and where each output column is read from its outputs."""

    input_ids: torch.Tensor  # [rows, N] int64: [1, tokens] packed, or [b, T] padded
    position_ids: torch.Tensor  # [rows, N] int64
    attention_mask: torch.Tensor | None  # [b, T] padded; [1, 1, N, N] packed; None: varlen from positions
    index: torch.Tensor  # [b, W] int64, into the flattened [rows * N] positions (0 where not valid)
    valid: torch.Tensor  # [b, W] bool
    targets: torch.Tensor  # [b, W] int64, the token each column scores (language models)


def block_causal_mask(seq_ids: torch.Tensor, dtype: torch.dtype, implementation: str) -> torch.Tensor | None:
    """Causal attention within each sequence of a packed row.  seq_ids [N] -> [1, 1, N, N]

    Boolean (True: attend) for sdpa; additive (0 or the dtype's min) for eager, which adds
    the mask to the scores; None for flash attention, which reads the position ids instead.
    """
    if implementation.startswith("flash"):
        return None
    n = seq_ids.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=seq_ids.device).tril()  # [N, N]
    allowed = (seq_ids[:, None] == seq_ids[None, :]) & causal  # [N, N]
    if implementation == "eager":
        mask = torch.zeros(n, n, dtype=dtype, device=seq_ids.device)
        allowed = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed[None, None]


def token_inputs(
    ids: torch.Tensor,
    mask: torch.Tensor,
    cols: torch.Tensor,
    valid: torch.Tensor,
    targets: torch.Tensor,
    packing: bool,
    implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 0,
) -> TokenInputs:
    """Padded rows (``ids``, ``mask`` [b, T]) as the model's inputs; ``cols`` [b, W] names the
    column of row i whose output fills output column w (valid columns must be real tokens).
    With ``packing`` and a ``hidden_size``, rows are packed only where ``packing_pays``."""
    b, t = ids.shape
    keep = mask.bool()  # [b, T]
    if packing and hidden_size > 0:
        packing = packing_pays(int(keep.sum()), b, t, hidden_size, implementation)
    positions = (keep.long().cumsum(dim=1) - 1).clamp(min=0)  # [b, T]: real tokens counted from 0
    cols = torch.where(valid, cols, 0)  # [b, W]
    if not packing:
        index = torch.arange(b, device=ids.device)[:, None] * t + cols  # [b, W]
        return TokenInputs(ids, positions, mask.long(), torch.where(valid, index, 0), valid, targets)
    flat = (keep.flatten().long().cumsum(0) - 1).view(b, t)  # [b, T]: packed position of each real token
    seq_ids = torch.arange(b, device=ids.device)[:, None].expand(b, t)[keep]  # [N]
    return TokenInputs(
        input_ids=ids[keep][None],  # [1, N]
        position_ids=positions[keep][None],  # [1, N]
        attention_mask=block_causal_mask(seq_ids, dtype, implementation),
        index=torch.where(valid, flat.gather(1, cols), 0),  # [b, W]
        valid=valid,
        targets=targets,
    )


def packing_pays(tokens: int, rows: int, width: int, hidden_size: int, implementation: str) -> bool:
    """Whether one packed row of ``tokens`` costs fewer FLOPs than ``rows`` padded rows of ``width``.

    Flash attention (varlen) attends within each sequence: packing never costs more. With a
    block-diagonal mask (sdpa, eager) attention is computed over all tokens x tokens, so
    packing pays only where the padding it removes outweighs that. Per token, the linear
    layers cost about 24 d^2 FLOPs per layer and attention 4 d per attended token, so in
    units of the linear cost: packed N + N^2 / (6 d), padded b T + b T^2 / (6 d).
    (bench/bench_packing.py, SmolLM2-135M on 2 CPU cores: equal lengths 1.3x slower packed,
    lengths spread over 10-100% of the width 1.2x faster.)
    """
    if implementation.startswith("flash"):
        return True
    scale = 6.0 * hidden_size
    return tokens + tokens * tokens / scale < rows * width + rows * width * width / scale


@dataclass(frozen=True)
class Layout:
    """How an engine lays out a forward: packed or padded, for which attention, in which dtype."""

    packing: bool = True
    trim: bool = False  # padded rollout rows: drop the columns that are padding in every row
    implementation: str = "sdpa"  # the model's attention implementation
    dtype: torch.dtype = torch.float32  # the compute dtype (an eager additive mask's)
    hidden_size: int = 0  # the model's; > 0: pack a micro-batch only where it pays (``packing_pays``)

    def inputs(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        cols: torch.Tensor,
        valid: torch.Tensor,
        targets: torch.Tensor,
    ) -> TokenInputs:
        return token_inputs(
            ids, mask, cols, valid, targets, self.packing, self.implementation, self.dtype, self.hidden_size
        )

    def rollout(self, micro: Batch) -> tuple[TokenInputs, int]:
        """Prompt + response rows; column j scores response token j (read at column P' - 1 + j).
        -> inputs with W = R' columns, and R (the batch's response width)"""
        m = model_inputs(micro, trim=self.trim or self.packing)
        keep = m.response_ids.shape[1]  # R'
        first = m.input_ids.shape[1] - keep - 1  # P' - 1
        cols = first + torch.arange(keep, device=m.input_ids.device).expand_as(m.response_ids)  # [b, R']
        inputs = self.inputs(m.input_ids, m.attention_mask, cols, m.response_valid, m.response_ids)
        return inputs, m.response_width

    def sequences(self, ids: torch.Tensor, mask: torch.Tensor) -> TokenInputs:
        """Right-padded sequences [b, L]; column t scores token t + 1 (W = L - 1)."""
        cols = torch.arange(ids.shape[1] - 1, device=ids.device).expand(ids.shape[0], -1)  # [b, L - 1]
        return self.inputs(ids, mask, cols, mask[:, 1:].bool(), ids[:, 1:])

    def last_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> TokenInputs:
        """One column per row: its last attended token (a reward model's score).  W = 1"""
        last = last_token_index(mask)[:, None]  # [b, 1]
        return self.inputs(ids, mask, last, torch.ones_like(last, dtype=torch.bool), torch.zeros_like(last))


def row_tokens(batch: Batch) -> torch.Tensor:
    """Real tokens per row: what a row costs in a micro-batch's token budget.  -> [B]"""
    if Keys.CHOSEN_IDS in batch:
        return batch[Keys.CHOSEN_MASK].sum(dim=1).long() + batch[Keys.REJECTED_MASK].sum(dim=1).long()
    if Keys.INPUT_IDS in batch:
        return batch[Keys.ATTENTION_MASK].sum(dim=1).long()
    return batch[Keys.PROMPT_MASK].sum(dim=1).long() + response_lengths(batch[Keys.RESPONSE_MASK]).long()


def budget_sizes(tokens: list[int], budget: int) -> list[int]:
    """Rows per micro-batch: consecutive rows while their tokens fit ``budget`` (a row over
    the budget alone). Rows keep their order, so outputs concatenate back in place."""
    sizes: list[int] = []
    used = 0
    for n in tokens:
        if sizes and used + n <= budget:
            sizes[-1] += 1
            used += n
        else:
            sizes.append(1)
            used = n
    return sizes


def split_to_count(tokens: list[int], sizes: list[int], count: int) -> list[int]:
    """Split the micro-batch with the most tokens (at its token midpoint) until there are
    ``count``: every rank then runs the same number of forwards, none over its budget."""
    sizes = list(sizes)
    while len(sizes) < count:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        loads = [sum(tokens[s : s + n]) if n > 1 else -1 for s, n in zip(starts, sizes)]
        i = max(range(len(sizes)), key=lambda k: loads[k])
        if loads[i] < 0:
            raise ValueError(
                f"token budget: {len(tokens)} rows cannot fill {count} micro-batches; give every rank "
                "the same number of rows"
            )
        part = tokens[starts[i] : starts[i] + sizes[i]]
        cum = torch.tensor(part).cumsum(0)[:-1]  # [n - 1]: tokens before each possible cut
        cut = int(torch.maximum(cum, sum(part) - cum).argmin()) + 1  # the most even cut
        sizes[i : i + 1] = [cut, sizes[i] - cut]
    return sizes


def scatter_columns(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Values of the valid columns, in order, back in place with zeros elsewhere.  [n] -> [b, W]"""
    out = values.new_zeros(valid.shape)
    out[valid] = values
    return out


def lm_token_outputs(
    model: torch.nn.Module,
    inputs: TokenInputs,
    temperature: float,
    with_entropy: bool,
    chunk_size: int,
) -> dict[str, torch.Tensor]:
    """A causal LM's log-probs (and entropies) of ``inputs.targets``.  -> {key: [b, W] fp32}

    The decoder runs once; the LM head runs only on the valid columns, in chunks
    (``head_token_outputs``). Under FSDP2 call it as a registered forward method of the
    root module (``register_fsdp_forward_method``), so the head's weight is gathered.
    """
    decoder = model.get_decoder() or model.base_model  # transformers < 4.57 returns None for Llama/Qwen2
    hidden = decoder(  # type: ignore[operator]
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
    ).last_hidden_state  # [rows, N, H]
    picked = hidden.flatten(0, 1)[inputs.index[inputs.valid]]  # [n, H]
    softcap = getattr(model.config, "final_logit_softcapping", None)
    logprobs, entropy = head_token_outputs(
        picked,
        model.get_output_embeddings(),  # type: ignore[operator]
        inputs.targets[inputs.valid],
        temperature,
        with_entropy,
        chunk_size,
        softcap,
    )  # [n], [n]
    out = {Keys.LOGPROBS: scatter_columns(logprobs, inputs.valid)}
    if entropy is not None:
        out[Keys.ENTROPY] = scatter_columns(entropy, inputs.valid)
    return out


def head_scores(model: torch.nn.Module, inputs: TokenInputs) -> torch.Tensor:
    """A value head's output at each valid column (0 elsewhere).  -> [b, W] fp32"""
    scores = model(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
    ).logits[..., 0]  # [rows, N]
    return scatter_columns(scores.flatten()[inputs.index[inputs.valid]].float(), inputs.valid)  # [b, W]
