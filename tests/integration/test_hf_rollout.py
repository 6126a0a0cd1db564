"""The ``hf`` rollout backend (Hugging Face ``generate``) against independent references:
greedy output equals transformers' own greedy decoding, sampler log-probs equal a plain
forward's log_softmax(logits / T), weights load in place, seeds repeat, EOS ends the mask."""

from __future__ import annotations

import pytest
import torch

from flowrl.engines.base import ROLLOUT_ENGINES, RolloutEngine
from flowrl.engines.hf_rollout import HFRollout, HFRolloutConfig
from flowrl.keys import Keys
from flowrl.models.tiny import make_tiny_model
from tests.integration.generation import EOS, hf_greedy, make_prompts, responses


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_rollout")
    make_tiny_model(root / "a", seed=0)
    make_tiny_model(root / "b", seed=1)
    return root / "a", root / "b"


def reference_logprobs(model, prompts, out, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each response token, one unpadded forward per row.  -> [B*n, R]"""
    prompt_rows = [r[m.bool()] for r, m in zip(prompts[Keys.PROMPT_IDS], prompts[Keys.PROMPT_MASK])]
    n = len(out) // len(prompt_rows)
    want = torch.zeros_like(out[Keys.ROLLOUT_LOGPROBS])
    for i, (ids, mask) in enumerate(zip(out[Keys.RESPONSE_IDS], out[Keys.RESPONSE_MASK])):
        prompt, response = prompt_rows[i // n], ids[mask.bool()]
        logits = model(torch.cat([prompt, response])[None]).logits[0].float()  # [P+r, V]
        lp = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, -1)  # [r, V]
        want[i, : len(response)] = lp.gather(-1, response[:, None]).squeeze(-1)
    return want


def test_hf_backend_matches_transformers_greedy_and_logprobs(models):
    from transformers import AutoModelForCausalLM

    a, b = models
    rollout = HFRollout(HFRolloutConfig(model_path=str(a)))
    assert isinstance(rollout, RolloutEngine) and "hf" in ROLLOUT_ENGINES
    hf_b = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).eval()
    prompts = make_prompts(5, seed=3)
    want = hf_greedy(hf_b, prompts, 12)
    assert responses(rollout.generate(prompts, temperature=0.0, max_tokens=12)) != want
    rollout.load_weights((name, t.detach().clone()) for name, t in hf_b.state_dict().items())
    greedy = rollout.generate(prompts, n=2, temperature=0.0, max_tokens=12)
    assert responses(greedy)[::2] == want and responses(greedy)[1::2] == want

    caller = torch.get_rng_state()
    seeds = [7, 8, 9, 10, 11]
    out = rollout.generate(prompts, n=3, temperature=0.7, max_tokens=12, seeds=seeds)
    assert torch.equal(torch.get_rng_state(), caller)  # sampling ran in a forked RNG
    again = rollout.generate(prompts, n=3, temperature=0.7, max_tokens=12, seeds=seeds)
    assert responses(out) == responses(again)
    assert len({tuple(r) for r in responses(out)[:3]}) > 1  # the samples of one prompt differ
    with torch.no_grad():
        expected = reference_logprobs(hf_b, prompts, out, temperature=0.7)
    mask = out[Keys.RESPONSE_MASK]
    assert torch.allclose(out[Keys.ROLLOUT_LOGPROBS] * mask, expected * mask, atol=1e-5)
    for row, stopped in zip(responses(out), (~out[Keys.TRUNCATED]).tolist()):
        assert (EOS in row) == stopped and (not stopped or row.index(EOS) == len(row) - 1)
    forced = rollout.generate(prompts, temperature=0.7, max_tokens=12, ignore_eos=True, seeds=seeds)
    assert forced[Keys.RESPONSE_MASK].sum().item() == 5 * 12 and bool(forced[Keys.TRUNCATED].all())


def test_hf_backend_refuses_weights_it_does_not_have(models):
    rollout = HFRollout(HFRolloutConfig(model_path=str(models[0])))
    with pytest.raises(KeyError, match="has no tensor 'nope.weight'"):
        rollout.load_weights([("nope.weight", torch.zeros(1))])
