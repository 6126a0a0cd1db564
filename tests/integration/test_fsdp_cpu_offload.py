"""FSDPEngine's memory options on 2 gloo ranks.

``cpu_offload`` (FSDP2's CPUOffloadPolicy): the policy reaches every sharded module, and training,
log-probs, the weight stream and a checkpoint round trip equal the engine without it (on CPU the
host is the device, so bitwise). ``frozen_dtype`` without LoRA (a model that never trains, e.g.
the reference): parameters stored in the compute dtype give the log-probs of fp32 storage bitwise.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig
from flowrl.engines.optim import OptimizerConfig
from flowrl.models.tiny import make_tiny_model
from tests.integration.multirank import run_ranks
from tests.integration.test_fsdp_engine import WORLD, full_params, rollout_batch, token_mean_nll

pytestmark = pytest.mark.slow  # two spawned ranks, two engines each


def _run(rank: int, model_path: str, ckpt_root: str) -> dict:
    out: dict = {}
    for offload in (False, True):
        config = FSDPEngineConfig(model_path=model_path, cpu_offload=offload, optim=OptimizerConfig(lr=1e-2))
        engine = FSDPEngine(config)
        policies = {type(m._get_fsdp_state()._fsdp_param_group.offload_policy).__name__
                    for m in engine.model.modules() if isinstance(m, FSDPModule)}  # fmt: skip
        local = rollout_batch(8, seed=3, vocab=engine.model.config.vocab_size).chunk(WORLD)[rank]
        steps = [engine.train_step(local, token_mean_nll, micro_batch_size=2) for _ in range(2)]
        engine.accumulate_gradients(local, token_mean_nll, micro_batch_size=2)
        moved = engine.offload()  # with cpu_offload: nothing to move, the gradients go
        grads_dropped = all(p.grad is None for p in engine.model.parameters())
        engine.onload()
        ckpt = str(Path(ckpt_root) / f"offload{int(offload)}")
        engine.save(ckpt)
        steps.append(engine.train_step(local, token_mean_nll, micro_batch_size=2))
        after = full_params(engine)
        engine.load(ckpt)
        resumed = engine.train_step(local, token_mean_nll, micro_batch_size=2)
        logprobs, _ = engine.compute_logprobs(local, 1.0, 2)
        stream = {name: t.clone() for bucket in engine.state_dict_stream(torch.bfloat16, 1 << 20) for name, t in bucket}
        out[offload] = {
            "policies": policies, "steps": steps, "params": after, "moved": moved, "grads_dropped": grads_dropped,
            "resumed_equal": resumed == steps[-1] and all(torch.equal(after[k], v) for k, v in full_params(engine).items()),
            "logprobs": logprobs, "stream": stream,
            "on_host": all(p.to_local().device.type == "cpu" for p in engine.model.parameters()),
        }  # fmt: skip
        del engine
    plain, offloaded = out[False], out[True]
    return {
        "policies": (plain["policies"], offloaded["policies"]),
        "steps_equal": plain["steps"] == offloaded["steps"],
        "params_equal": all(torch.equal(plain["params"][k], v) for k, v in offloaded["params"].items()),
        "logprobs_equal": torch.equal(plain["logprobs"], offloaded["logprobs"]),
        "stream_equal": plain["stream"].keys() == offloaded["stream"].keys()
        and all(torch.equal(plain["stream"][k], v) for k, v in offloaded["stream"].items()),
        "moved": (plain["moved"], offloaded["moved"]),
        "grads_dropped": offloaded["grads_dropped"],
        "resumed_equal": (plain["resumed_equal"], offloaded["resumed_equal"]),
        "on_host": offloaded["on_host"],
        "losses": [s["loss"] for s in offloaded["steps"]],
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    model_dir = tmp_path_factory.mktemp("tiny")
    make_tiny_model(model_dir)
    return run_ranks(_run, WORLD, str(model_dir), tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))


def test_cpu_offload_policy_reaches_every_sharded_module(results: list[dict]) -> None:
    for r in results:
        assert r["policies"] == ({"OffloadPolicy"}, {CPUOffloadPolicy.__name__}), r["policies"]
        assert r["on_host"]


def test_cpu_offload_trains_exactly_like_the_engine_without_it(results: list[dict]) -> None:
    for r in results:
        assert r["steps_equal"] and r["params_equal"] and r["logprobs_equal"] and r["stream_equal"], r
        assert len(set(r["losses"])) == len(r["losses"])  # the steps did change the model
        assert r["resumed_equal"] == (True, True)


def test_handover_offload_moves_nothing_when_the_state_already_lives_in_host_memory(results: list[dict]) -> None:
    for r in results:
        plain, offloaded = r["moved"]
        assert plain > 0 and offloaded == 0 and r["grads_dropped"]


def _frozen(rank: int, model_path: str) -> dict:
    out = {}
    for frozen in (None, "bfloat16"):
        engine = FSDPEngine(FSDPEngineConfig(model_path=model_path, param_dtype="bfloat16", frozen_dtype=frozen))
        local = rollout_batch(8, seed=5, vocab=engine.model.config.vocab_size).chunk(WORLD)[rank]
        logprobs, entropy = engine.compute_logprobs(local, 0.7, 2, with_entropy=True)
        dtypes = {p.dtype for p in engine.model.parameters()}
        buffers = {b.dtype for b in engine.model.buffers() if b.is_floating_point()}
        out[frozen] = (logprobs, entropy, dtypes, buffers)
        del engine
    (lp32, ent32, d32, _), (lp16, ent16, d16, b16) = out[None], out["bfloat16"]
    return {"equal": torch.equal(lp32, lp16) and torch.equal(ent32, ent16), "dtypes": (d32, d16, b16)}


def test_a_frozen_model_stored_in_its_compute_dtype_scores_exactly_as_fp32_storage(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    model_dir = tmp_path_factory.mktemp("tiny_frozen")
    make_tiny_model(model_dir)
    for r in run_ranks(_frozen, WORLD, str(model_dir)):
        assert r["dtypes"] == ({torch.float32}, {torch.bfloat16}, {torch.float32}), r["dtypes"]  # buffers (RoPE) stay
        assert r["equal"]
