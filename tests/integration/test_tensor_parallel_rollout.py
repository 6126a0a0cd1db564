"""vLLM with tensor_parallel_size=2 inside a 2-rank FSDP2 world (gloo, CPU): one replica of 2 ranks.

vLLM's external launcher forms its tensor-parallel group from the torch world; each rank
loads only its shard, fed by the same full-tensor stream as with T=1 (vLLM's weight
loaders slice it). vLLM starts from *different* weights than the trainer, so only a
working sync can make its greedy output equal Hugging Face greedy on the trainer's
weights. The two ranks' trainer RNGs are pushed apart on purpose: the replica must
still draw identical samples, or its ranks would drift apart.
"""

from __future__ import annotations

import os

import pytest
import torch

from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig
from flowrl.engines.optim import OptimizerConfig
from flowrl.engines.sync import sync_weights
from flowrl.engines.vllm_rollout import VLLMRollout, VLLMRolloutConfig, replica_info
from flowrl.keys import Keys
from flowrl.models.tiny import TinyModelConfig, make_tiny_model
from tests.integration.generation import hf_greedy, make_prompts, responses
from tests.integration.multirank import run_ranks
from tests.integration.test_hybrid_engine import sampled_nll, sampling_gap

pytestmark = pytest.mark.slow

TP = 2
TOKENS = 12
# untied: with a tied head, random tiny models tend to repeat the prompt, whatever the weights
CONFIG = TinyModelConfig(num_key_value_heads=2)  # q, k and v heads split over the 2 ranks


def full_hf_model(trainer: FSDPEngine, model_dir: str) -> torch.nn.Module:
    """A plain Hugging Face model with the trainer's current full weights (collective)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict({n: t for b in trainer.state_dict_stream(torch.float32, 1 << 30) for n, t in b})
    return model.eval()


def _tp_checks(rank: int, trainer_dir: str, rollout_dir: str) -> dict:
    from vllm.distributed import parallel_state

    res: dict = {}
    trainer = FSDPEngine(FSDPEngineConfig(model_path=trainer_dir, optim=OptimizerConfig(lr=5e-2, grad_clip=0.0)))
    rollout = VLLMRollout(
        VLLMRolloutConfig(model_path=rollout_dir, max_model_len=128, seed=7, tensor_parallel_size=TP)
    )
    group = parallel_state.get_tp_group()
    res["tp_group"], res["tp_rank"] = list(group.ranks), group.rank_in_group
    prompts = make_prompts(6, seed=0)  # the same prompts on both ranks, as DP_COMPUTE sends them
    before = responses(rollout.generate(prompts, temperature=0.0, max_tokens=TOKENS))
    hf = hf_greedy(full_hf_model(trainer, trainer_dir), prompts, TOKENS)
    res["differs_before_sync"] = before != hf
    res["sync"] = sync_weights(trainer, rollout, bucket_bytes=16 << 10)
    res["greedy_matches_hf"] = responses(rollout.generate(prompts, temperature=0.0, max_tokens=TOKENS)) == hf

    torch.manual_seed(100 + rank)  # the trainers' RNGs differ between the ranks
    expected_draw = torch.rand(2)
    torch.manual_seed(100 + rank)
    samples = rollout.generate(prompts, n=3, temperature=1.0, max_tokens=TOKENS)
    res["caller_rng_untouched"] = torch.equal(torch.rand(2), expected_draw)
    res["samples"] = responses(samples)
    res["samples_2"] = responses(rollout.generate(prompts, n=3, temperature=1.0, max_tokens=TOKENS))
    res["gap"] = sampling_gap(trainer, samples, 1.0)

    res["train"] = trainer.train_step(samples, sampled_nll, micro_batch_size=18)
    sync_weights(trainer, rollout, bucket_bytes=16 << 10)
    after = responses(rollout.generate(prompts, temperature=0.0, max_tokens=TOKENS))
    res["after_train_matches_hf"] = after == hf_greedy(full_hf_model(trainer, trainer_dir), prompts, TOKENS)
    res["changed_by_train"] = after != hf
    res["response_shape"] = tuple(samples[Keys.RESPONSE_IDS].shape)
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    trainer_dir, rollout_dir = tmp_path_factory.mktemp("trainer"), tmp_path_factory.mktemp("rollout")
    make_tiny_model(trainer_dir, CONFIG, seed=0)
    make_tiny_model(rollout_dir, CONFIG, seed=1)
    # what a killed engine leaves behind (vLLM's CPU backend names every such segment alike): the
    # engines must start anyway
    for rank in range(TP):
        with open(f"/dev/shm/-tp:0-[{'-'.join(map(str, range(TP)))}]-cpushm_{rank}", "wb") as f:
            f.write(b"\0" * 4096)
    out = run_ranks(_tp_checks, TP, str(trainer_dir), str(rollout_dir))
    print("\ntensor-parallel rollout:", *out, sep="\n")
    return out


def test_replica_layout_is_consecutive_blocks_of_t() -> None:
    assert [replica_info(r, 8, 2) for r in (0, 1, 2, 7)] == [(0, 4, 0), (0, 4, 1), (1, 4, 0), (3, 4, 1)]
    assert [replica_info(r, 4, 4).replica for r in range(4)] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the number of ranks \\(4\\)"):
        replica_info(0, 4, 3)


def test_vllm_forms_one_tp_group_from_the_world(results: list[dict]) -> None:
    assert [(r["tp_group"], r["tp_rank"]) for r in results] == [([0, 1], 0), ([0, 1], 1)]


def test_sync_reaches_both_shards(results: list[dict]) -> None:
    for r in results:
        assert r["differs_before_sync"] and r["greedy_matches_hf"]
        assert r["sync"]["bytes"] > 0


def test_replica_ranks_draw_identical_samples(results: list[dict]) -> None:
    a, b = results
    assert a["samples"] == b["samples"] and a["samples_2"] == b["samples_2"]
    assert a["samples"] != a["samples_2"]  # each call draws anew
    assert all(r["caller_rng_untouched"] for r in results)
    assert a["response_shape"] == (18, TOKENS)


def test_sampler_logprobs_match_trainer_and_training_reaches_vllm(results: list[dict]) -> None:
    for r in results:
        assert r["gap"][1] <= 1e-3, r["gap"]
        assert r["train"]["skipped"] == 0.0
        assert r["after_train_matches_hf"] and r["changed_by_train"]
