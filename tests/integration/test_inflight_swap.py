"""Partial rollouts through real vLLM (CPU): generation paused mid-sequence for a weight swap and resumed.

The samples' tokens before the swap keep the old policy's version tag and log-probs; every token after
it is sampled from the new weights: its sampler log-prob equals the new model's, recomputed by
transformers on the whole sequence, and not the old model's."""

from __future__ import annotations

import os

import pytest
import torch

from flowrl.keys import Keys
from flowrl.models.tiny import make_tiny_model
from tests.integration.generation import make_prompts
from tests.integration.multirank import run_plain

pytestmark = pytest.mark.slow
SWAP_AFTER = 6  # engine steps under the old weights (the first one prefills and samples one token)


def _swap_mid_sequence(old_dir: str, new_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    from flowrl.engines.inflight import generate_versioned
    from flowrl.engines.sequences import model_inputs, token_logprobs
    from flowrl.engines.vllm_rollout import VLLMRollout, VLLMRolloutConfig

    rollout = VLLMRollout(VLLMRolloutConfig(model_path=old_dir, max_model_len=128))
    new = AutoModelForCausalLM.from_pretrained(new_dir, dtype=torch.float32).eval()
    old = AutoModelForCausalLM.from_pretrained(old_dir, dtype=torch.float32).eval()
    steps = [0]

    def take_weights():
        steps[0] += 1
        if steps[0] == SWAP_AFTER + 1:  # asked before each engine step
            return 1, list(new.state_dict().items())
        return None

    prompts = make_prompts(3, seed=1)
    sampling = {"temperature": 1.0, "ignore_eos": True}
    out, stats = generate_versioned(rollout, prompts, 2, sampling, 20, [11, 12, 13], 0, take_weights)
    inputs = model_inputs(out, trim=False)
    p = out[Keys.PROMPT_IDS].shape[1]
    with torch.no_grad():
        lp = {
            name: token_logprobs(m(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                   position_ids=inputs.position_ids).logits[:, p - 1 : -1], out[Keys.RESPONSE_IDS], 1.0)
            for name, m in (("old", old), ("new", new))
        }  # fmt: skip
    versions, sampler = out[Keys.TOKEN_VERSIONS], out[Keys.ROLLOUT_LOGPROBS]
    before, after = versions == 0, versions == 1
    return {
        "versions": versions.tolist(),
        "lengths": out[Keys.RESPONSE_MASK].sum(-1).tolist(),
        "swaps": stats.swaps,
        "paused": stats.paused_samples,
        "before_vs_old": float((sampler - lp["old"])[before].abs().max()),
        "after_vs_new": float((sampler - lp["new"])[after].abs().max()),
        "after_vs_old": float((sampler - lp["old"])[after].abs().max()),
        "rows": len(out),
    }


def test_paused_sequence_continues_under_the_new_weights(tmp_path) -> None:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    make_tiny_model(tmp_path / "old", seed=0)
    make_tiny_model(tmp_path / "new", seed=1)
    res = run_plain(_swap_mid_sequence, str(tmp_path / "old"), str(tmp_path / "new"))
    assert res["rows"] == 6 and res["swaps"] == 1 and res["paused"] == 6
    assert res["lengths"] == [20.0] * 6
    for row in res["versions"]:  # the old version on the tokens sampled before the swap, the new after
        assert row == [0] * SWAP_AFTER + [1] * (20 - SWAP_AFTER), row
    assert res["before_vs_old"] < 1e-4, res
    assert res["after_vs_new"] < 1e-4, res  # the continued tokens are the new policy's samples
    assert res["after_vs_old"] > 0.1, res  # ... and visibly not the old one's
