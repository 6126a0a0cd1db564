"""LoRA on the policy: PEFT adapters under FSDP2 (2 gloo ranks) and the merged weight sync into vLLM.

Two spawned 2-rank runs return their measurements; the tests assert on them.

- Engine only: which parameters train (gradients, optimizer state, changes), that the
  model starts as the base model and is exactly the base model with its adapter
  disabled, that the merged weight stream (and ``save_hf``'s folder) is a plain model of
  the base architecture computing the trainer's log-probs, and a frozen base in bf16.
- With vLLM, started from *another* model folder so that only the sync can make it agree:
  after each LoRA step and merged sync, the sampler's log-probs equal the trainer's.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from flowrl.batch import Batch
from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig
from flowrl.engines.lora import LoraConfig, adapter_disabled, is_adapter_weight
from flowrl.engines.optim import OptimizerConfig
from flowrl.engines.sync import sync_weights
from flowrl.engines.vllm_rollout import VLLMRollout, VLLMRolloutConfig
from flowrl.keys import Keys
from flowrl.models.tiny import TinyModelConfig, make_tiny_model
from tests.integration.generation import hf_greedy, make_prompts, responses
from tests.integration.multirank import run_ranks
from tests.integration.test_fsdp_engine import full_params, reference_logprobs, rollout_batch, token_mean_nll
from tests.integration.test_hybrid_engine import sampled_nll, sampling_gap

pytestmark = pytest.mark.slow

WORLD = 2
ROWS = 8  # global batch of the engine checks; 4 per rank
LORA = LoraConfig(rank=4, alpha=8.0, target_modules="all-linear")
LINEAR_LAYERS = 2 * 7  # the tiny Qwen2: q, k, v, o, gate, up, down in each of 2 decoder layers
PROMPTS, SAMPLES, TOKENS = 8, 4, 16  # per rank, per prompt, per response


def lora_engine(model_dir: str, lr: float = 1e-2, **kwargs) -> FSDPEngine:
    optim = OptimizerConfig(lr=lr, grad_clip=0.0)
    return FSDPEngine(FSDPEngineConfig(model_path=model_dir, lora=LORA, optim=optim, **kwargs))


def merged_hf_model(engine: FSDPEngine, model_dir: str) -> torch.nn.Module:
    """A plain Hugging Face model of the base architecture holding the merged stream (collective)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = {n: t for bucket in engine.state_dict_stream(torch.float32, 1 << 30) for n, t in bucket}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)  # tied: one copy
    return model.eval()


def max_gap(logprobs: torch.Tensor, batch: Batch, reference: list[torch.Tensor]) -> float:
    """max |engine log-prob - reference log-prob| over the response tokens of each row."""
    lengths = batch[Keys.RESPONSE_MASK].sum(-1).long()
    gaps = [float((logprobs[i, : int(n)] - ref.detach()).abs().max()) for i, (n, ref) in enumerate(zip(lengths, reference))]
    return max(gaps)


def _what_trains(engine: FSDPEngine, local: Batch) -> dict:
    """Names of the parameters that are trainable, get a gradient, get optimizer state, change in 2 steps."""
    res: dict = {"trainable": sorted(n for n, p in engine.model.named_parameters() if p.requires_grad)}
    res["all_params"] = sorted(n for n, _ in engine.model.named_parameters())
    before = full_params(engine)
    engine.accumulate_gradients(local, token_mean_nll, micro_batch_size=2)
    res["with_grad"] = sorted(n for n, p in engine.model.named_parameters() if p.grad is not None)
    res["step1"] = engine.optimizer_step()
    names = {id(p): n for n, p in engine.model.named_parameters()}
    res["with_optimizer_state"] = sorted(names[id(p)] for p in engine.optimizer.state)
    res["step2"] = engine.train_step(local, token_mean_nll, micro_batch_size=2)  # B is no longer zero
    after = full_params(engine)
    res["changed"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
    return res


def _resume_checks(engine: FSDPEngine, local: Batch, ckpt_dir: str, model_dir: str) -> dict:
    """Save, step, load, step again: the same loss, grad norm and parameters (adapters and Adam
    state), in this engine and in a new one; the checkpoint holds the adapters, not the frozen base."""
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.state_dict import get_state_dict

    engine.save(ckpt_dir)
    model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer)  # as checkpoints held it before: the base too
    dcp.save({"model": model_sd, "optim": optim_sd, "engine": engine._engine_state()}, checkpoint_id=ckpt_dir + "_full")
    first = engine.train_step(local, token_mean_nll, micro_batch_size=2), full_params(engine)
    engine.load(ckpt_dir)
    again = engine.train_step(local, token_mean_nll, micro_batch_size=2), full_params(engine)
    fresh = lora_engine(model_dir)
    fresh.load(ckpt_dir)
    anew = fresh.train_step(local, token_mean_nll, micro_batch_size=2), full_params(fresh)
    older = lora_engine(model_dir)
    older.load(ckpt_dir + "_full")
    from_full = older.train_step(local, token_mean_nll, micro_batch_size=2), full_params(older)
    saved = dcp.FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata
    model_keys = [k.removeprefix("model.") for k in saved if k.startswith("model.")]
    return {
        "resumed_metrics_equal": first[0] == again[0] == anew[0] == from_full[0],
        "resumed_params_equal": all(torch.equal(first[1][n], r[1][n]) for r in (again, anew, from_full) for n in first[1]),
        "checkpoint_model_keys": sorted(model_keys),
        "trainable_keys": sorted(n for n, p in engine.model.named_parameters() if p.requires_grad),
    }


def _engine_checks(rank: int, model_dir: str, hf_dir: str, ckpt_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    local = rollout_batch(ROWS, seed=0, vocab=256)[rank * 4 : (rank + 1) * 4]
    base = FSDPEngine(FSDPEngineConfig(model_path=model_dir))
    base_lp, _ = base.compute_logprobs(local, 1.0, micro_batch_size=2)
    engine = lora_engine(model_dir)
    res = {"start_is_base": torch.equal(engine.compute_logprobs(local, 1.0, 2)[0], base_lp)}  # B = 0
    res |= _what_trains(engine, local)
    res |= _resume_checks(engine, local, ckpt_dir, model_dir)
    lp, _ = engine.compute_logprobs(local, 1.0, micro_batch_size=2)
    with adapter_disabled(engine.model):
        off, _ = engine.compute_logprobs(local, 1.0, micro_batch_size=2)
    res["trained_differs_from_base"] = float((lp - base_lp).abs().max())
    res["disabled_is_base"] = torch.equal(off, base_lp)
    res["trainable_after_disable"] = sorted(n for n, p in engine.model.named_parameters() if p.requires_grad)
    # the merged stream: the base model's names, and the trainer's log-probs in a plain HF model
    # what the split placement's weight transfer cuts buckets from: the merged stream's names and shapes
    res["manifest_is_merged_stream"] = engine.full_manifest() == [
        (n, tuple(t.shape)) for n, t in engine.full_tensors(torch.float32)
    ]
    res["manifest_has_base_names"] = not any("lora_" in n or "base_layer" in n for n, _ in engine.full_manifest())
    res["merged_gap"] = max_gap(lp, local, reference_logprobs(merged_hf_model(engine, model_dir), local))
    engine.save_hf(hf_dir)
    saved = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    res["saved_gap"] = max_gap(lp, local, reference_logprobs(saved, local))
    with torch.no_grad():
        res["saved_names_are_base"] = sorted(saved.state_dict()) == sorted(
            AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
        )
    dist.barrier()
    # as on GPU: bf16 compute, and the first forward is the adapter-disabled reference pass (a GRPO step
    # with a KL loss that takes its old log-probs from the update's own forward)
    bf16 = lora_engine(model_dir, frozen_dtype="bfloat16", param_dtype="bfloat16")
    with bf16.adapters_off():
        bf16.compute_logprobs(local, 1.0, micro_batch_size=2)
    dtypes = {p.requires_grad: set() for p in bf16.model.parameters()}
    for p in bf16.model.parameters():
        dtypes[p.requires_grad].add(str(p.dtype))
    res["bf16_dtypes"] = {k: sorted(v) for k, v in dtypes.items()}
    res["bf16_steps"] = [bf16.train_step(local, token_mean_nll, micro_batch_size=2) for _ in range(2)]
    # the memory handover with a bf16 base and fp32 adapters: every storage leaves and comes back bitwise
    lp_before, _ = bf16.compute_logprobs(local, 1.0, micro_batch_size=2)
    moved = bf16.offload()
    res["bf16_offload_released"] = moved > 0 and all(t.untyped_storage().nbytes() == 0 for t in bf16._state_tensors())
    bf16.onload()
    res["bf16_onload_same_logprobs"] = torch.equal(bf16.compute_logprobs(local, 1.0, micro_batch_size=2)[0], lp_before)
    return res


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    model_dir = tmp_path_factory.mktemp("tiny")
    make_tiny_model(model_dir)
    hf_dir = tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())
    ckpt_dir = tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())
    out = run_ranks(_engine_checks, WORLD, str(model_dir), hf_dir, ckpt_dir)
    print("\nLoRA engine measurements:", *[{k: v for k, v in r.items() if "gap" in k} for r in out], sep="\n")
    return out


def test_only_adapters_train(engine_results: list[dict]) -> None:
    for r in engine_results:
        assert len(r["trainable"]) == 2 * LINEAR_LAYERS and all(map(is_adapter_weight, r["trainable"]))
        assert len(r["all_params"]) > len(r["trainable"])  # the frozen base is there too
        assert r["with_grad"] == r["trainable"]
        assert r["with_optimizer_state"] == r["trainable"]
        assert r["changed"] == r["trainable"]  # every adapter moved, no base weight did
        assert r["step1"]["skipped"] == 0.0 and r["step2"]["grad_norm"] > 0


def test_checkpoint_resumes_bitwise(engine_results: list[dict]) -> None:
    for r in engine_results:
        assert r["resumed_metrics_equal"] and r["resumed_params_equal"]
        # adapter-only checkpoints: exactly the trainable (adapter) weights, no frozen base weight
        assert r["checkpoint_model_keys"] == r["trainable_keys"] and r["trainable_keys"], r["checkpoint_model_keys"]


def test_starts_as_the_base_model_and_disabled_adapter_is_the_base_model(engine_results: list[dict]) -> None:
    for r in engine_results:
        assert r["start_is_base"]  # B starts at zero: the adapters add exactly nothing
        assert r["trained_differs_from_base"] > 1e-3
        assert r["disabled_is_base"]  # bitwise: no second copy of the weights needed for the reference
        assert r["trainable_after_disable"] == r["trainable"]


def test_merged_weights_compute_the_trainers_logprobs(engine_results: list[dict]) -> None:
    assert all(r["manifest_is_merged_stream"] and r["manifest_has_base_names"] for r in engine_results)
    for r in engine_results:
        assert r["merged_gap"] <= 1e-5, r["merged_gap"]
        assert r["saved_names_are_base"]
        assert r["saved_gap"] <= 1e-5, r["saved_gap"]


def test_frozen_base_in_the_rollout_dtype(engine_results: list[dict]) -> None:
    for r in engine_results:
        assert r["bf16_dtypes"] == {False: ["torch.bfloat16"], True: ["torch.float32"]}
        assert all(s["skipped"] == 0.0 and s["grad_norm"] > 0 for s in r["bf16_steps"])
        assert r["bf16_offload_released"] and r["bf16_onload_same_logprobs"]


def _sync_checks(rank: int, trainer_dir: str, rollout_dir: str) -> dict:
    trainer = lora_engine(trainer_dir, lr=5e-2)
    rollout = VLLMRollout(VLLMRolloutConfig(model_path=rollout_dir, max_model_len=128, seed=rank))
    prompts = make_prompts(PROMPTS, seed=rank)
    res = {"sync0": sync_weights(trainer, rollout, bucket_bytes=16 << 10)}  # q, k, v in different buckets
    samples = rollout.generate(prompts, n=SAMPLES, temperature=1.0, max_tokens=TOKENS)
    res["gap0"] = sampling_gap(trainer, samples, 1.0)
    for step in (1, 2):
        res[f"train{step}"] = trainer.train_step(samples, sampled_nll, micro_batch_size=8)
        res[f"sync{step}"] = sync_weights(trainer, rollout, bucket_bytes=16 << 10)
        samples = rollout.generate(prompts, n=SAMPLES, temperature=1.0, max_tokens=TOKENS)
        res[f"gap{step}"] = sampling_gap(trainer, samples, 1.0)
    res["gap_T0.7"] = sampling_gap(
        trainer, rollout.generate(prompts, n=SAMPLES, temperature=0.7, max_tokens=TOKENS), 0.7
    )
    with adapter_disabled(trainer.model):  # how far the adapter moved the policy from the base
        res["base_gap"] = sampling_gap(trainer, samples, 1.0)
    greedy = responses(rollout.generate(prompts, temperature=0.0, max_tokens=TOKENS))
    res["greedy_matches_hf"] = greedy == hf_greedy(merged_hf_model(trainer, trainer_dir), prompts, TOKENS)
    return res


@pytest.fixture(scope="module")
def sync_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    tied = TinyModelConfig(tie_word_embeddings=True)
    trainer_dir, rollout_dir = tmp_path_factory.mktemp("lora_trainer"), tmp_path_factory.mktemp("lora_rollout")
    make_tiny_model(trainer_dir, tied, seed=0)
    make_tiny_model(rollout_dir, tied, seed=1)
    out = run_ranks(_sync_checks, WORLD, str(trainer_dir), str(rollout_dir))
    print("\nLoRA merged sync measurements:", *out, sep="\n")
    return out


def test_merged_sync_gives_the_trainers_logprobs_in_vllm(sync_results: list[dict]) -> None:
    for r in sync_results:
        for key in ("gap0", "gap1", "gap2", "gap_T0.7"):
            assert r[key][1] <= 1e-4, (key, r[key])  # fp32: measured ~1e-6
        assert r["base_gap"][1] > 1e-2, r["base_gap"]  # the adapter changed the policy, and vLLM has it
        assert r["train1"]["skipped"] == 0.0 and r["train2"]["skipped"] == 0.0
        assert r["sync2"]["bytes"] == r["sync0"]["bytes"] > 0  # the full merged model, every time
        assert r["greedy_matches_hf"]


def _adapter_sync_checks(rank: int, model_dir: str) -> dict:
    """vLLM serves the base model it loaded once; each sync sends only A and B (a LoRARequest)."""
    trainer = lora_engine(model_dir, lr=5e-2)
    rollout = VLLMRollout(VLLMRolloutConfig(model_path=model_dir, max_model_len=128, seed=rank, max_lora_rank=4))
    prompts = make_prompts(PROMPTS, seed=rank)
    res = {"sync0": sync_weights(trainer, rollout)}
    samples = rollout.generate(prompts, n=SAMPLES, temperature=1.0, max_tokens=TOKENS)
    res["gap0"] = sampling_gap(trainer, samples, 1.0)
    for step in (1, 2):
        res[f"train{step}"] = trainer.train_step(samples, sampled_nll, micro_batch_size=8)
        res[f"sync{step}"] = sync_weights(trainer, rollout)
        samples = rollout.generate(prompts, n=SAMPLES, temperature=1.0, max_tokens=TOKENS)
        res[f"gap{step}"] = sampling_gap(trainer, samples, 1.0)
    with adapter_disabled(trainer.model):
        res["base_gap"] = sampling_gap(trainer, samples, 1.0)
    greedy = responses(rollout.generate(prompts, temperature=0.0, max_tokens=TOKENS))
    res["greedy_matches_hf"] = greedy == hf_greedy(merged_hf_model(trainer, model_dir), prompts, TOKENS)
    res["adapter_bytes"] = 4 * sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n)
    return res


def test_adapter_only_sync_gives_the_trainers_logprobs_in_vllm(tmp_path) -> None:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    make_tiny_model(tmp_path / "m", TinyModelConfig(tie_word_embeddings=True), seed=0)
    out = run_ranks(_adapter_sync_checks, WORLD, str(tmp_path / "m"))
    print("\nLoRA adapter-only sync measurements:", *out, sep="\n")
    for r in out:
        for key in ("gap0", "gap1", "gap2"):
            assert r[key][1] <= 1e-4, (key, r[key])
        assert r["base_gap"][1] > 1e-2, r["base_gap"]  # the adapter changed the policy, and vLLM serves it
        # only the adapters moved: their fp32 bytes, all of them (a DTensor's numel is the whole tensor's)
        assert r["sync0"]["bytes"] == r["sync2"]["bytes"] == r["adapter_bytes"] > 0
        assert r["greedy_matches_hf"]
