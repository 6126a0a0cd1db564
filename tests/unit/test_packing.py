"""Packed rows, chunked LM-head log-probs and token-budget micro-batches, on a plain tiny model.

Packed and padded layouts must give the same log-probs, values and gradients (fp32, CPU)
for ragged rows, including a length-1 response and a row that fills every column.
"""

from __future__ import annotations

import pytest
import torch

from flowrl.batch import Batch
from flowrl.engines.packing import (
    Layout,
    packing_pays,
    token_inputs,
    budget_sizes,
    head_scores,
    lm_token_outputs,
    row_tokens,
    split_to_count,
)
from flowrl.engines.sequences import entropy_from_logits, head_token_outputs, token_logprobs
from flowrl.keys import Keys

VOCAB = 50


def tiny_llama(seed: int = 0, attn: str = "sdpa", value_head: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation=attn, num_labels=1,
    )
    model = LlamaForTokenClassification(config) if value_head else LlamaForCausalLM(config)
    return model.float().eval()


def ragged_batch(seed: int = 0, rows: int = 5, prompt: int = 6, response: int = 5) -> Batch:
    """Left-padded prompts and right-padded responses: a length-1 response, one of full width."""
    g = torch.Generator().manual_seed(seed)
    plens = [1, prompt, 3, 2, prompt][:rows]
    rlens = [1, response, 2, 0, 4][:rows]  # row 3: an empty response
    pid, rid = torch.zeros(rows, prompt, dtype=torch.long), torch.zeros(rows, response, dtype=torch.long)
    pmask, rmask = torch.zeros(rows, prompt, dtype=torch.long), torch.zeros(rows, response)
    for i, (p, r) in enumerate(zip(plens, rlens)):
        pid[i, prompt - p :] = torch.randint(3, VOCAB, (p,), generator=g)
        pmask[i, prompt - p :] = 1
        rid[i, :r] = torch.randint(3, VOCAB, (r,), generator=g)
        rmask[i, :r] = 1.0
    return Batch({Keys.PROMPT_IDS: pid, Keys.PROMPT_MASK: pmask, Keys.RESPONSE_IDS: rid, Keys.RESPONSE_MASK: rmask})


def reference_logprobs(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Row by row, unpadded.  -> [B, R]"""
    out = torch.zeros(batch[Keys.RESPONSE_IDS].shape)
    for i in range(len(batch)):
        prompt = batch[Keys.PROMPT_IDS][i][batch[Keys.PROMPT_MASK][i].bool()]
        response = batch[Keys.RESPONSE_IDS][i][batch[Keys.RESPONSE_MASK][i].bool()]
        logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1 : -1]
        out[i, : len(response)] = torch.log_softmax(logits.float(), -1).gather(-1, response[:, None])[:, 0]
    return out


def rollout_logprobs(model, batch: Batch, layout: Layout, chunk: int = 4, with_entropy: bool = False):
    inputs, width = layout.rollout(batch)
    out = lm_token_outputs(model, inputs, 1.0, with_entropy, chunk)
    pad = width - inputs.valid.shape[1]
    return {k: torch.nn.functional.pad(v, (0, pad)) for k, v in out.items()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_logprobs_equal_the_unpadded_reference(attn: str) -> None:
    model, batch = tiny_llama(attn=attn), ragged_batch()
    with torch.no_grad():
        want = reference_logprobs(model, batch)
        packed = rollout_logprobs(model, batch, Layout(packing=True, implementation=attn))[Keys.LOGPROBS]
        padded = rollout_logprobs(model, batch, Layout(packing=False, implementation=attn))[Keys.LOGPROBS]
    assert packed.shape == padded.shape == want.shape
    assert (packed - want).abs().max() <= 1e-6
    assert (padded - want).abs().max() <= 1e-6
    assert (packed[batch[Keys.RESPONSE_MASK] == 0] == 0).all()


def test_packed_and_padded_gradients_equal() -> None:
    batch = ragged_batch(seed=3)
    mask = batch[Keys.RESPONSE_MASK]
    grads = {}
    for packing in (True, False):
        model = tiny_llama(seed=1).train()
        lp = rollout_logprobs(model, batch, Layout(packing=packing), chunk=3, with_entropy=True)
        loss = -(lp[Keys.LOGPROBS] * mask).sum() / mask.sum() - 0.1 * (lp[Keys.ENTROPY] * mask).sum()
        loss.backward()
        grads[packing] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads[True].items():
        assert torch.allclose(g, grads[False][name], atol=1e-6, rtol=1e-5), name


def test_packed_sequences_and_last_token_scores_equal_padded() -> None:
    model, critic = tiny_llama(seed=2), tiny_llama(seed=2, value_head=True)
    ids = torch.randint(3, VOCAB, (3, 7))
    mask = torch.tensor([[1] * 7, [1, 1, 0, 0, 0, 0, 0], [1] * 4 + [0] * 3])  # full, length 2, length 4
    with torch.no_grad():
        outs = {}
        for packing in (True, False):
            layout = Layout(packing=packing)
            seq = lm_token_outputs(model, layout.sequences(ids, mask), 1.0, True, 2)
            outs[packing] = (seq[Keys.LOGPROBS], seq[Keys.ENTROPY], head_scores(critic, layout.last_tokens(ids, mask)))
    for a, b in zip(outs[True], outs[False]):
        assert (a - b).abs().max() <= 1e-6
    assert outs[True][0].shape == (3, 6) and outs[True][2].shape == (3, 1)


def test_packed_values_equal_padded() -> None:
    critic, batch = tiny_llama(seed=4, value_head=True), ragged_batch(seed=5)
    with torch.no_grad():
        values = [head_scores(critic, Layout(packing=p).rollout(batch)[0]) for p in (True, False)]
    assert (values[0] - values[1]).abs().max() <= 1e-6


@pytest.mark.parametrize("chunk", [0, 1, 3, 64])
def test_chunked_logprobs_and_entropy_equal_the_full_computation(chunk: int) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 40, (11,))
    logits = head(hidden)  # [n, V]
    full_lp, full_ent = token_logprobs(logits, targets, 0.7), entropy_from_logits(logits, 0.7)
    full_grad = torch.autograd.grad((full_lp + full_ent).sum(), hidden)[0]
    lp, ent = head_token_outputs(hidden, head, targets, 0.7, True, chunk)
    grad = torch.autograd.grad((lp + ent).sum(), hidden)[0]
    assert torch.allclose(lp, full_lp, atol=1e-6) and torch.allclose(ent, full_ent, atol=1e-6)
    assert torch.allclose(grad, full_grad, atol=1e-6)


def test_budget_sizes_keep_order_and_budget() -> None:
    assert budget_sizes([3, 3, 3, 9, 1, 1], budget=6) == [2, 1, 1, 2]  # a row over the budget alone
    assert budget_sizes([1, 1, 1], budget=100) == [3]


def test_split_to_count_splits_the_heaviest_at_its_midpoint() -> None:
    tokens = [5, 5, 5, 5, 1, 1]
    assert split_to_count(tokens, [6], 2) == [2, 4]
    assert split_to_count(tokens, [4, 2], 3) == [2, 2, 2]
    assert split_to_count([100, 1, 1], [3], 2) == [1, 2]
    with pytest.raises(ValueError, match="cannot fill"):
        split_to_count([1, 1], [1, 1], 3)


def test_row_tokens_count_prompt_and_response() -> None:
    assert row_tokens(ragged_batch()).tolist() == [2, 11, 5, 2, 10]


def test_packing_only_where_it_saves_flops():
    # equal lengths: a masked packed row attends over all tokens x tokens and saves no padding
    assert not packing_pays(tokens=8 * 128, rows=8, width=128, hidden_size=576, implementation="sdpa")
    # lengths spread over 10-100% of the width: the padding removed outweighs the wider attention
    assert packing_pays(tokens=1088, rows=8, width=256, hidden_size=576, implementation="sdpa")
    # varlen flash attention attends within each sequence: packing never costs more
    assert packing_pays(tokens=8 * 128, rows=8, width=128, hidden_size=576, implementation="flash_attention_2")
    ids = torch.arange(1, 9).view(2, 4)
    full, ragged = torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    cols = torch.zeros(2, 1, dtype=torch.long)
    valid = torch.ones(2, 1, dtype=torch.bool)
    assert token_inputs(ids, full, cols, valid, cols, True, hidden_size=64).input_ids.shape == (2, 4)  # padded
    assert token_inputs(ids, ragged, cols, valid, cols, True, hidden_size=64).input_ids.shape == (1, 5)  # packed
    assert token_inputs(ids, full, cols, valid, cols, True).input_ids.shape == (1, 8)  # no size: always packed
