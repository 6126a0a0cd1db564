"""make_random_model(stop_mean=...): the weights alone give geometric response lengths (CPU, tiny shape)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowrl.models import shapes

# hidden 64, intermediate 128, 2 layers, 2 heads of 64 / 2 = 32, 1 kv head, vocab 512
TINY = (64, 128, 2, 2, 1, 512)


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def tiny_shape(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(shapes.QWEN25_SHAPES, "tiny-test", (*TINY, request.param))
    return "tiny-test"


def test_stop_mean_zero_writes_the_plain_random_weights(tmp_path: Path, tiny_shape: str) -> None:
    from transformers import Qwen2ForCausalLM

    out = shapes.make_random_model(tmp_path / "m", tiny_shape)
    torch.manual_seed(0)
    expected = Qwen2ForCausalLM(shapes.qwen25_config(tiny_shape)).to(torch.bfloat16).state_dict()
    saved = load_file(str(out / "model.safetensors"))
    assert saved and all(torch.equal(saved[name], expected[name]) for name in saved)
    assert not (out / shapes.STOP_FILE).exists()


def test_sampled_lengths_are_geometric_with_the_asked_mean(tmp_path: Path, tiny_shape: str) -> None:
    from transformers import Qwen2ForCausalLM

    samples, max_len, stop_mean = 600, 150, 50.0
    out = shapes.make_random_model(tmp_path / "m", tiny_shape, stop_mean=stop_mean)
    stop = json.loads((out / shapes.STOP_FILE).read_text())
    assert stop["eos_prob_mean"] == pytest.approx(1 / stop_mean, rel=0.02)
    assert stop["eos_prob_std_over_positions"] < 0.05 * stop["eos_prob_mean"]  # the same at every position

    model = Qwen2ForCausalLM.from_pretrained(out).eval()  # bf16, as saved
    torch.manual_seed(0)
    prompts = torch.randint(2, TINY[-1], (samples, 8))  # [N, 8], no pad or EOS
    with torch.no_grad():
        ids = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, max_new_tokens=max_len, min_new_tokens=0, eos_token_id=1, pad_token_id=0,
        )[:, prompts.shape[1]:]  # [N, <=max_len]
    is_eos = ids == 1  # [N, R]
    lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, max_len).float()  # [N], EOS included

    # E[min(L, 150)] for p = 1/50 is 47.6; a stop probability off by 20% misses it by 4-5 standard errors
    expected = shapes.truncated_mean_length(1 / stop_mean, max_len)
    assert abs(lengths.mean() - expected) < 3 * lengths.std() / math.sqrt(samples)


def test_the_tokenizer_knows_every_id_the_model_can_sample(tmp_path: Path, tiny_shape: str) -> None:
    from transformers import AutoTokenizer

    from flowrl.models.tiny import make_tokenizer

    out = shapes.make_random_model(tmp_path / "m", tiny_shape)
    tok, plain = AutoTokenizer.from_pretrained(out), make_tokenizer()
    assert len(tok) == shapes.qwen25_config(tiny_shape).vocab_size > len(plain)
    text = "12 + 7 = <300>"  # encoding is unchanged: the padding entries are never produced
    assert tok(text).input_ids == plain(text).input_ids
    assert tok.decode([len(plain), len(tok) - 1]) == f"<{len(plain)}><{len(tok) - 1}>"
    assert (tok.eos_token_id, tok.pad_token_id) == (plain.eos_token_id, plain.pad_token_id)
