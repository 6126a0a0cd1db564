"""VLLMRollout in a plain process (no torch.distributed world): vLLM's own single-process
executor, engine core in this process, weights loaded from a Hugging Face model."""

from __future__ import annotations

import os

import pytest
import torch

from flowrl.engines.vllm_rollout import VLLMRollout, VLLMRolloutConfig
from flowrl.keys import Keys
from flowrl.models.tiny import make_tiny_model
from tests.integration.generation import hf_greedy, make_prompts, responses
from tests.integration.multirank import run_plain

pytestmark = pytest.mark.slow


def _standalone(trainer_dir: str, rollout_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    rollout = VLLMRollout(VLLMRolloutConfig(model_path=rollout_dir, max_model_len=128))
    hf = AutoModelForCausalLM.from_pretrained(trainer_dir, dtype=torch.float32).eval()
    prompts = make_prompts(6, seed=3)
    want = hf_greedy(hf, prompts, 12)
    before = responses(rollout.generate(prompts, temperature=0.0, max_tokens=12))
    rollout.load_weights((name, t.detach().clone()) for name, t in hf.state_dict().items())
    after = rollout.generate(prompts, n=2, temperature=0.0, max_tokens=12)
    # seeded sampling (what makes a resumed run draw what an uninterrupted one drew)
    seeds = [11, 22, 33, 44, 55, 66]
    first = rollout.generate(prompts, n=3, temperature=1.0, max_tokens=12, seeds=seeds)
    unseeded = [responses(rollout.generate(prompts, n=3, temperature=1.0, max_tokens=12)) for _ in range(2)]
    again = rollout.generate(prompts, n=3, temperature=1.0, max_tokens=12, seeds=seeds)
    # seeded prompts of more tokens than one scheduler step of vLLM-CPU's default (4096):
    # a chunked prompt used to fail there ("CPU Generator does not use offset")
    many = make_prompts(96, seed=4, min_len=60, max_len=100)
    big = [rollout.generate(many, n=2, temperature=1.0, max_tokens=4, seeds=list(range(96))) for _ in range(2)]
    return {
        "many_seeded_prompts_repeat": responses(big[0]) == responses(big[1]) and len(big[0]) == 192,
        "seeded_repeats": responses(first) == responses(again)
        and torch.equal(first[Keys.ROLLOUT_LOGPROBS], again[Keys.ROLLOUT_LOGPROBS]),
        "unseeded_differs": unseeded[0] != unseeded[1],
        "samples_of_a_prompt_differ": len({tuple(r) for r in responses(first)[:3]}) > 1,
        "differs_before": before != want,
        "matches_after": responses(after)[::2] == want and responses(after)[1::2] == want,
        "engine_core_in_process": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0",
    }


def test_rollout_without_distributed_world(tmp_path) -> None:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    make_tiny_model(tmp_path / "a", seed=0)
    make_tiny_model(tmp_path / "b", seed=1)
    res = run_plain(_standalone, str(tmp_path / "a"), str(tmp_path / "b"))
    assert res["differs_before"] and res["matches_after"] and res["engine_core_in_process"]
    assert res["seeded_repeats"] and res["unseeded_differs"] and res["samples_of_a_prompt_differ"]
    assert res["many_seeded_prompts_repeat"]
