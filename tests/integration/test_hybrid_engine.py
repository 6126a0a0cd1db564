"""FSDP2 trainer + in-process vLLM on 2 gloo ranks: weight sync, generation, log-prob agreement.

One spawned 2-rank run does everything (vLLM start-up dominates) and returns its
measurements; the tests assert on them. vLLM starts from a *different* model folder
than the trainer, so only a working sync can make its outputs match the trainer's.
The trainer's model has tied embeddings and an EOS row tuned so that greedy decoding
ends some prompts with EOS and runs others to the length limit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from flowrl.batch import Batch
from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig, Normalizer
from flowrl.engines.optim import OptimizerConfig
from flowrl.engines.sync import sync_weights
from flowrl.engines.vllm_rollout import VLLMRollout, VLLMRolloutConfig
from flowrl.keys import Keys
from flowrl.models.tiny import TinyModelConfig, make_tiny_model
from tests.integration.generation import EOS, PAD, hf_greedy, make_prompts, responses
from tests.integration.multirank import run_ranks

pytestmark = pytest.mark.slow

WORLD = 2
PROMPTS = 8  # per rank
GREEDY_TOKENS = 16
SAMPLES = 4  # per prompt
TIED = TinyModelConfig(tie_word_embeddings=True)


def tune_eos(model_dir: Path) -> float:
    """Point the (tied) EOS row along the mean final hidden state, scaled so that greedy
    decoding of the test prompts ends about half of them with EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = Batch.concat([make_prompts(PROMPTS, seed=r) for r in range(WORLD)])
    with torch.no_grad():
        hidden = model.model(input_ids=prompts[Keys.PROMPT_IDS]).last_hidden_state  # [B, P, H]
        direction = hidden.mean(dim=(0, 1)) / hidden.mean(dim=(0, 1)).norm() ** 2  # [H]
        weight = model.get_output_embeddings().weight
        for scale in (0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0):
            weight[EOS] = direction * scale
            stopped = sum(EOS in r for r in hf_greedy(model, prompts, GREEDY_TOKENS)) / len(prompts)
            if 0.25 <= stopped <= 0.75:
                model.save_pretrained(model_dir)
                return stopped
    raise AssertionError("could not tune the EOS row of the tiny model")


def sampling_gap(trainer: FSDPEngine, samples: Batch, temperature: float) -> tuple[float, float]:
    """(mean, max) |trainer log-prob - vLLM sampler log-prob| over response tokens."""
    logprobs, _ = trainer.compute_logprobs(samples, temperature, micro_batch_size=8)
    mask = samples[Keys.RESPONSE_MASK]
    gap = (logprobs - samples[Keys.ROLLOUT_LOGPROBS]).abs()[mask > 0]
    return float(gap.mean()), float(gap.max())


def sampled_nll(micro: Batch, out: dict[str, torch.Tensor], norm: Normalizer):
    mask = micro[Keys.RESPONSE_MASK]  # [b, R]
    return -(out[Keys.LOGPROBS] * mask).sum() / norm.global_tokens, {}


def full_hf_model(trainer: FSDPEngine, model_dir: str) -> torch.nn.Module:
    """A plain Hugging Face model holding the trainer's current full weights (collective)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = {n: t for bucket in trainer.state_dict_stream(torch.float32, 1 << 30) for n, t in bucket}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # tied: one copy
    return model.eval()


def response_checks(samples: Batch, max_tokens: int) -> dict:
    mask, ids = samples[Keys.RESPONSE_MASK], samples[Keys.RESPONSE_IDS]
    lengths = mask.sum(dim=1).long()
    reasons = samples[Keys.FINISH_REASON]
    stop_ok = all(
        ids[i, lengths[i] - 1] == EOS and not samples[Keys.TRUNCATED][i]
        for i in range(len(samples))
        if reasons[i] == "stop"
    )
    length_ok = all(
        lengths[i] == max_tokens and samples[Keys.TRUNCATED][i]
        for i in range(len(samples))
        if reasons[i] == "length"
    )
    return {
        "finish_reasons": sorted(set(reasons)),
        "stop_rows_end_with_eos": stop_ok,
        "length_rows_full_and_truncated": length_ok,
        "eos_only_at_end": all(EOS not in r[:-1] for r in responses(samples)),
        "pads_after_end": bool((ids[mask == 0] == PAD).all()),
        "rollout_logprobs_zero_after_end": bool((samples[Keys.ROLLOUT_LOGPROBS][mask == 0] == 0).all()),
        "shape": tuple(ids.shape),
    }


def _hybrid_checks(rank: int, trainer_dir: str, rollout_dir: str) -> dict:
    res: dict = {}
    trainer = FSDPEngine(
        FSDPEngineConfig(model_path=trainer_dir, optim=OptimizerConfig(lr=5e-2, grad_clip=0.0))
    )
    set_num_threads = torch.set_num_threads
    torch.manual_seed(1234)
    expected_draw = torch.rand(3)
    torch.manual_seed(1234)
    start = time.perf_counter()
    rollout = VLLMRollout(VLLMRolloutConfig(model_path=rollout_dir, max_model_len=128, seed=rank))
    res["vllm_init_s"] = time.perf_counter() - start
    res["rng_untouched"] = torch.equal(torch.rand(3), expected_draw)
    res["set_num_threads_restored"] = (
        torch.set_num_threads is set_num_threads and torch.get_num_threads() == 1
    )

    prompts = make_prompts(PROMPTS, seed=rank)
    before_sync = responses(rollout.generate(prompts, temperature=0.0, max_tokens=GREEDY_TOKENS))
    hf = full_hf_model(trainer, trainer_dir)
    hf_before = hf_greedy(hf, prompts, GREEDY_TOKENS)
    res["greedy_differs_before_sync"] = before_sync != hf_before

    res["sync1"] = sync_weights(trainer, rollout, bucket_bytes=16 << 10)  # q, k, v land in different buckets
    greedy = rollout.generate(prompts, temperature=0.0, max_tokens=GREEDY_TOKENS)
    res["greedy_matches_hf"] = [a == b for a, b in zip(responses(greedy), hf_before)]
    res["greedy_checks"] = response_checks(greedy, GREEDY_TOKENS)

    start = time.perf_counter()
    samples = rollout.generate(prompts, n=SAMPLES, temperature=1.0, max_tokens=GREEDY_TOKENS)
    res["generate_s"] = time.perf_counter() - start
    res["sample_checks"] = response_checks(samples, GREEDY_TOKENS)
    res["rows_follow_prompts"] = torch.equal(
        samples[Keys.PROMPT_IDS], prompts[Keys.PROMPT_IDS].repeat_interleave(SAMPLES, 0)
    )
    res["gap_T1"] = sampling_gap(trainer, samples, 1.0)
    res["gap_T0.7"] = sampling_gap(
        trainer, rollout.generate(prompts, n=SAMPLES, temperature=0.7, max_tokens=GREEDY_TOKENS), 0.7
    )

    before = {n: p.full_tensor().clone() for n, p in trainer.model.named_parameters()}
    res["train"] = trainer.train_step(samples, sampled_nll, micro_batch_size=8)
    res["all_params_changed"] = all(
        not torch.equal(before[n], p.full_tensor()) for n, p in trainer.model.named_parameters()
    )
    res["sync2"] = sync_weights(trainer, rollout, bucket_bytes=16 << 10)
    after = responses(rollout.generate(prompts, temperature=0.0, max_tokens=GREEDY_TOKENS))
    hf_after = hf_greedy(full_hf_model(trainer, trainer_dir), prompts, GREEDY_TOKENS)
    res["greedy_after_train_matches_hf"] = [a == b for a, b in zip(after, hf_after)]
    res["greedy_changed_by_train"] = after != responses(greedy)
    res["gap_T1_after_train"] = sampling_gap(
        trainer, rollout.generate(prompts, n=SAMPLES, max_tokens=GREEDY_TOKENS), 1.0
    )
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    trainer_dir, rollout_dir = tmp_path_factory.mktemp("trainer"), tmp_path_factory.mktemp("rollout")
    make_tiny_model(trainer_dir, TIED, seed=0)
    make_tiny_model(rollout_dir, TIED, seed=1)
    stopped = tune_eos(trainer_dir)
    start = time.perf_counter()
    out = run_ranks(_hybrid_checks, WORLD, str(trainer_dir), str(rollout_dir))
    for r in out:
        r["eos_fraction"], r["run_s"] = stopped, time.perf_counter() - start
    print("\nhybrid engine measurements:", *out, sep="\n")
    return out


def test_vllm_start_leaves_caller_rng_and_threads_alone(results: list[dict]) -> None:
    for r in results:
        assert r["rng_untouched"] and r["set_num_threads_restored"]


def test_greedy_after_sync_equals_hf_greedy(results: list[dict]) -> None:
    for r in results:
        assert r["greedy_differs_before_sync"]  # vLLM started from other weights
        assert all(r["greedy_matches_hf"]), r["greedy_matches_hf"]
        assert r["sync1"]["bytes"] > 0 and r["sync1"]["seconds"] > 0
    reasons = {reason for r in results for reason in r["greedy_checks"]["finish_reasons"]}
    assert reasons == {"length", "stop"}  # both kinds of ending were compared


def test_response_fields(results: list[dict]) -> None:
    for r in results:
        for checks in (r["greedy_checks"], r["sample_checks"]):
            assert checks["stop_rows_end_with_eos"] and checks["length_rows_full_and_truncated"]
            assert checks["eos_only_at_end"] and checks["pads_after_end"]
            assert checks["rollout_logprobs_zero_after_end"]
        assert r["sample_checks"]["shape"] == (PROMPTS * SAMPLES, GREEDY_TOKENS)
        assert r["rows_follow_prompts"]


def test_sampler_logprobs_match_trainer(results: list[dict]) -> None:
    for r in results:
        assert r["gap_T1"][1] <= 1e-3, r["gap_T1"]
        assert r["gap_T1_after_train"][1] <= 1e-3, r["gap_T1_after_train"]


def test_temperature_scaled_logprobs_match(results: list[dict]) -> None:
    for r in results:
        assert r["gap_T0.7"][1] <= 1e-3, r["gap_T0.7"]


def test_train_step_then_sync_reaches_vllm(results: list[dict]) -> None:
    for r in results:
        assert r["train"]["skipped"] == 0.0 and r["all_params_changed"]
        assert all(r["greedy_after_train_matches_hf"]), r["greedy_after_train_matches_hf"]
        assert r["greedy_changed_by_train"]
