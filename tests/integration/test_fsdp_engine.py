"""FSDPEngine on 2 gloo ranks against a plain (unsharded) Hugging Face model.

One spawned 2-rank run performs every check and returns the measurements; the tests
below assert on them. The reference computes each row on its own, unpadded, so it
shares no padding or micro-batching code with the engine.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from flowrl.batch import Batch
from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig, Normalizer
from flowrl.engines.optim import OptimizerConfig
from flowrl.engines.packing import budget_sizes, row_tokens
from flowrl.keys import Keys
from flowrl.models.tiny import make_tiny_model
from tests.integration.multirank import run_ranks

pytestmark = pytest.mark.slow  # ~40 s: two spawned ranks

WORLD = 2
ROWS = 8  # global batch; 4 per rank
PAD = 0


def rollout_batch(rows: int, seed: int, vocab: int, max_prompt: int = 7, max_response: int = 6) -> Batch:
    """Random prompts (left-padded) and responses (right-padded) of random lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.full((rows, max_prompt), PAD)
    response_ids = torch.full((rows, max_response), PAD)
    prompt_mask = torch.zeros(rows, max_prompt, dtype=torch.long)
    response_mask = torch.zeros(rows, max_response)
    for i in range(rows):
        p = int(torch.randint(1, max_prompt + 1, (1,), generator=g))
        r = int(torch.randint(1, max_response + 1, (1,), generator=g))
        prompt_ids[i, max_prompt - p :] = torch.randint(3, vocab, (p,), generator=g)
        prompt_mask[i, max_prompt - p :] = 1
        response_ids[i, :r] = torch.randint(3, vocab, (r,), generator=g)
        response_mask[i, :r] = 1.0
    return Batch(
        {
            Keys.PROMPT_IDS: prompt_ids,
            Keys.PROMPT_MASK: prompt_mask,
            Keys.RESPONSE_IDS: response_ids,
            Keys.RESPONSE_MASK: response_mask,
        }
    )


def reference_logprobs(model: torch.nn.Module, batch: Batch, temperature: float = 1.0) -> list[torch.Tensor]:
    """Row by row, unpadded: log-probs of each response token under softmax(logits / T)."""
    out = []
    for i in range(len(batch)):
        prompt = batch[Keys.PROMPT_IDS][i][batch[Keys.PROMPT_MASK][i].bool()]
        response = batch[Keys.RESPONSE_IDS][i][batch[Keys.RESPONSE_MASK][i].bool()]
        ids = torch.cat([prompt, response])[None]  # [1, p + r]
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature  # [r, V]
        out.append(torch.log_softmax(logits, -1).gather(-1, response[:, None])[:, 0])  # [r]
    return out


def token_mean_nll(micro: Batch, out: dict[str, torch.Tensor], norm: Normalizer):
    mask = micro[Keys.RESPONSE_MASK]  # [b, R]
    loss = -(out[Keys.LOGPROBS] * mask).sum() / norm.global_tokens
    return loss, {"tokens": float(mask.sum())}


def full_grads(engine: FSDPEngine) -> dict[str, torch.Tensor]:
    return {n: p.grad.full_tensor().clone() for n, p in engine.model.named_parameters()}


def full_params(engine: FSDPEngine) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().clone() for n, p in engine.model.named_parameters()}


def max_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in a)


def _policy_checks(rank: int, model_path: str, ckpt_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    schedule = OptimizerConfig(lr=1e-2, grad_clip=0.0, lr_schedule="cosine", warmup_steps=3, total_steps=6)
    config = FSDPEngineConfig(model_path=model_path, optim=schedule)
    engine = FSDPEngine(config)
    vocab = engine.model.config.vocab_size
    global_batch = rollout_batch(ROWS, seed=1, vocab=vocab)
    local = global_batch.chunk(WORLD)[rank]
    res: dict = {"dp_size": engine.dp_size}

    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ref_lps = reference_logprobs(ref, global_batch)
    total_tokens = float(global_batch[Keys.RESPONSE_MASK].sum())
    (-torch.cat(ref_lps).sum() / total_tokens).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    grads = {}
    for mbs in (4, 1):
        metrics = engine.accumulate_gradients(local, token_mean_nll, micro_batch_size=mbs)
        grads[mbs] = full_grads(engine)
        res[f"grad_rel_err_mbs{mbs}"] = max_rel_err(grads[mbs], ref_grads)
        res[f"loss_mbs{mbs}"] = metrics["loss"]
        engine.optimizer.zero_grad(set_to_none=True)
    res["grad_rel_err_mbs1_vs_mbs4"] = max_rel_err(grads[1], grads[4])
    # padded rows, and packed rows in micro-batches of at most 13 real tokens: the ranks' rows
    # differ in length, so they need different numbers of micro-batches and are evened out
    variants = {"padded": replace(config, packing=False), "budget": replace(config, max_tokens_per_micro_batch=13)}
    for name, variant in variants.items():
        engine.config = variant
        metrics = engine.accumulate_gradients(local, token_mean_nll, micro_batch_size=4)
        res[f"grad_rel_err_{name}_vs_packed"] = max_rel_err(full_grads(engine), grads[4])
        res[f"loss_{name}"] = metrics["loss"]
        engine.optimizer.zero_grad(set_to_none=True)
    res["budget_micro_batches"] = len(engine._micro_batches(local, 4))
    res["budget_local_counts"] = len(budget_sizes(row_tokens(local).tolist(), 13))
    engine.config = config
    res["ref_loss"] = float(-torch.cat(ref_lps).detach().sum() / total_tokens)

    with torch.no_grad():
        mine = ref_lps[rank * 4 : rank * 4 + 4]
        for T in (1.0, 0.7):
            lp, ent = engine.compute_logprobs(local, temperature=T, micro_batch_size=3, with_entropy=True)
            want = reference_logprobs(ref, local, T) if T != 1.0 else mine
            res[f"logprob_err_T{T}"] = max(
                float((lp[i, : len(w)] - w).abs().max()) for i, w in enumerate(want)
            )
        mask = local[Keys.RESPONSE_MASK]
        res["masked_zero"] = bool((lp[mask == 0] == 0).all() and (ent[mask == 0] == 0).all())
        res["entropy_positive"] = bool((ent[mask > 0] > 0).all())
        lp1, _ = engine.compute_logprobs(local, 1.0, micro_batch_size=1)
        lp4, _ = engine.compute_logprobs(local, 1.0, micro_batch_size=4)
        res["mbs1_vs_mbs4_logprob_max_diff"] = float((lp1 - lp4).abs().max())
        engine.config = replace(config, packing=False)
        res["padded_vs_packed_logprob_max_diff"] = float((engine.compute_logprobs(local, 1.0, 4)[0] - lp4).abs().max())
        engine.config = replace(config, max_tokens_per_micro_batch=13)
        res["budget_vs_packed_logprob_max_diff"] = float((engine.compute_logprobs(local, 1.0, 4)[0] - lp4).abs().max())
        engine.config = config
        res.update(_gather_once_checks(engine, config, local))
        res.update(_stream_checks(engine))
        engine.config = replace(config, trim_padding=True)
        res["trim_vs_untrimmed_max_diff"] = float(
            (engine.compute_logprobs(local, 1.0, 4)[0] - lp4).abs().max()
        )
        engine.config = config

    res.update(_step_checks(engine, local, ckpt_dir))
    return res


@contextlib.contextmanager
def counted_all_gathers():
    """Counts the all-gather collectives this process issues (FSDP2's included)."""
    count = [0]
    names = [n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n)]
    originals = {n: getattr(dist, n) for n in names}

    def counting(original):
        def call(*args, **kwargs):
            count[0] += 1
            return original(*args, **kwargs)

        return call

    for n in names:
        setattr(dist, n, counting(originals[n]))
    try:
        yield count
    finally:
        for n in names:
            setattr(dist, n, originals[n])


def _gather_once_checks(engine: FSDPEngine, config: FSDPEngineConfig, local: Batch) -> dict:
    """A no-grad pass gathers each layer once, gives the same log-probs, then reshards."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    lps, gathers = {}, {}
    for once in (False, True):
        engine.config = replace(config, gather_once_for_inference=once)
        with counted_all_gathers() as count:
            lps[once], _ = engine.compute_logprobs(local, 1.0, micro_batch_size=1)  # 4 micro-batches
        gathers[once] = count[0]
    engine.config = config
    modules = [m for m in engine.model.modules() if isinstance(m, FSDPModule)]  # the layers and the root
    return {
        "gather_once_logprob_diff": float((lps[True] - lps[False]).abs().max()),
        "all_gathers_per_micro_batch": gathers[False],
        "all_gathers_once": gathers[True],
        "fsdp_modules": len(modules),
        "resharded_after_pass": all(isinstance(p, DTensor) for p in engine.model.parameters()),
    }


def _stream_checks(engine: FSDPEngine) -> dict:
    """The bf16 weight stream (shards cast, then gathered) equals the full fp32 model cast."""
    full = {n: t.full_tensor() for n, t in engine.named_tensors()}
    streamed = {n: t for bucket in engine.state_dict_stream(torch.bfloat16, 1 << 12) for n, t in bucket}
    return {
        "stream_names_match": list(streamed) == list(full),
        "manifest_matches_stream": engine.full_manifest() == [(n, tuple(t.shape)) for n, t in streamed.items()],
        "stream_bitwise_cast": all(
            streamed[n].dtype == torch.bfloat16 and torch.equal(streamed[n], full[n].to(torch.bfloat16))
            for n in full
        ),
    }


def _step_checks(engine: FSDPEngine, local: Batch, ckpt_dir: str) -> dict:
    """Parameters move; a NaN gradient skips the step; save/load resumes exactly."""
    res: dict = {}
    before = full_params(engine)
    res["step1"] = engine.train_step(local, token_mean_nll, micro_batch_size=2)
    after = full_params(engine)
    res["all_params_changed"] = all(not torch.equal(before[k], after[k]) for k in before)

    def nan_loss(micro: Batch, out: dict[str, torch.Tensor], norm: Normalizer):
        loss, metrics = token_mean_nll(micro, out, norm)
        return loss * float("nan"), metrics

    res["nan_step"] = engine.train_step(local, nan_loss, micro_batch_size=2)
    res["nan_step_params_unchanged"] = all(torch.equal(after[k], v) for k, v in full_params(engine).items())

    engine.save(ckpt_dir)
    res["after_save"] = engine.train_step(local, token_mean_nll, micro_batch_size=2)
    params_after_save = full_params(engine)
    res["steps_before_load"] = engine.global_step
    engine.load(ckpt_dir)
    res["steps_after_load"] = engine.global_step
    res["after_load"] = engine.train_step(local, token_mean_nll, micro_batch_size=2)
    res["resume_param_diff"] = max(
        float((params_after_save[k] - v).abs().max()) for k, v in full_params(engine).items()
    )
    res.update(_offload_checks(engine, local, ckpt_dir, res["after_save"], params_after_save))
    return res


def _offload_checks(engine: FSDPEngine, local: Batch, ckpt_dir: str, want_metrics: dict, want_params: dict) -> dict:
    """Offload releases every shard and optimizer state tensor; onload restores them bitwise; the
    step after an offload/onload round trip equals the step without one."""
    engine.load(ckpt_dir)
    engine.accumulate_gradients(local, token_mean_nll, micro_batch_size=2)  # gradients exist: offload drops them
    tensors = list(engine._state_tensors())
    before = [t.clone() for t in tensors]
    moved = engine.offload()
    res = {
        "offload_bytes": moved,
        "offload_state_bytes": sum(t.numel() * t.element_size() for t in before),
        "offload_released": all(t.untyped_storage().nbytes() == 0 for t in tensors),
        "offload_grads_dropped": all(p.grad is None for p in engine.model.parameters()),
        "offload_tensor_count": len(tensors),
        "offload_optimizer_tensors": sum(
            len([v for v in s.values() if v.dim() > 0]) for s in engine.optimizer.state.values()
        ),
    }
    engine.onload()
    res["onload_bitwise"] = all(torch.equal(a, b) for a, b in zip(before, tensors))
    engine.onload()  # a second onload is a no-op
    metrics = engine.train_step(local, token_mean_nll, micro_batch_size=2)
    res["offload_step_equal"] = metrics == want_metrics
    res["offload_step_param_equal"] = all(torch.equal(want_params[k], v) for k, v in full_params(engine).items())
    return res


def _critic_checks(rank: int, model_path: str) -> dict:
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = FSDPEngineConfig(model_path=model_path, value_head=True, seed=7, optim=OptimizerConfig(lr=1e-2))
    engine = FSDPEngine(config)
    local = rollout_batch(ROWS, seed=2, vocab=engine.model.config.vocab_size).chunk(WORLD)[rank]
    with torch.random.fork_rng():
        torch.manual_seed(7)
        hf_config = AutoConfig.from_pretrained(model_path, num_labels=1, classifier_dropout=0.0)
        ref = AutoModelForTokenClassification.from_pretrained(
            model_path, config=hf_config, dtype=torch.float32
        )
    values = engine.compute_values(local, micro_batch_size=3)  # [4, R]
    errs = []
    with torch.no_grad():
        for i in range(len(local)):
            prompt = local[Keys.PROMPT_IDS][i][local[Keys.PROMPT_MASK][i].bool()]
            response = local[Keys.RESPONSE_IDS][i][local[Keys.RESPONSE_MASK][i].bool()]
            scores = ref(input_ids=torch.cat([prompt, response])[None]).logits[0, :, 0]  # [p + r]
            want = scores[len(prompt) - 1 : -1]  # value of the state before each response token
            errs.append(float((values[i, : len(want)] - want).abs().max()))

    def value_mse(micro: Batch, out: dict[str, torch.Tensor], norm: Normalizer):
        mask = micro[Keys.RESPONSE_MASK]
        return ((out[Keys.VALUES] - 1.0) ** 2 * mask).sum() / norm.global_tokens, {}

    head_before = engine.model.score.weight.full_tensor().clone()
    metrics = engine.train_step(local, value_mse, micro_batch_size=2)
    names = [n for n, _ in engine.named_tensors()]
    return {
        "value_err": max(errs),
        "values_shape": tuple(values.shape),
        "value_masked_zero": bool((values[local[Keys.RESPONSE_MASK] == 0] == 0).all()),
        "head_changed": not torch.equal(head_before, engine.model.score.weight.full_tensor()),
        "critic_loss": metrics["loss"],
        "exported_has_head": any(n.startswith("score.") for n in names),
        "exported_count": len(names),
    }


def _all_checks(rank: int, model_path: str, ckpt_dir: str) -> dict:
    res = _policy_checks(rank, model_path, ckpt_dir)
    dist.barrier()
    res.update(_critic_checks(rank, model_path))
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    model_dir = tmp_path_factory.mktemp("tiny")
    make_tiny_model(model_dir)
    ckpt = tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())
    return run_ranks(_all_checks, WORLD, str(model_dir), ckpt)


def test_gradient_equals_single_process_gradient(results: list[dict]) -> None:
    for r in results:
        assert r["dp_size"] == WORLD
        assert r["grad_rel_err_mbs4"] <= 1e-5, r["grad_rel_err_mbs4"]
        assert r["grad_rel_err_mbs1"] <= 1e-5, r["grad_rel_err_mbs1"]
        assert r["grad_rel_err_mbs1_vs_mbs4"] <= 2e-6, r["grad_rel_err_mbs1_vs_mbs4"]  # fp32 rounding
        assert r["grad_rel_err_padded_vs_packed"] <= 2e-6, r["grad_rel_err_padded_vs_packed"]
        assert r["grad_rel_err_budget_vs_packed"] <= 2e-6, r["grad_rel_err_budget_vs_packed"]
        assert math.isclose(r["loss_padded"], r["ref_loss"], rel_tol=1e-6)
        assert math.isclose(r["loss_budget"], r["ref_loss"], rel_tol=1e-6)
        assert math.isclose(r["loss_mbs4"], r["ref_loss"], rel_tol=1e-6)
        assert math.isclose(r["loss_mbs1"], r["ref_loss"], rel_tol=1e-6)
    # the ranks' rows needed different numbers of micro-batches under the budget; both ran the larger
    assert len({r["budget_local_counts"] for r in results}) > 1, results
    assert {r["budget_micro_batches"] for r in results} == {max(r["budget_local_counts"] for r in results)}


def test_logprobs_match_unpadded_reference(results: list[dict]) -> None:
    for r in results:
        assert r["logprob_err_T1.0"] <= 1e-5
        assert r["logprob_err_T0.7"] <= 1e-5
        assert r["masked_zero"] and r["entropy_positive"]
        assert r["mbs1_vs_mbs4_logprob_max_diff"] <= 1e-6  # packed rows: their neighbours change rounding only
        assert r["padded_vs_packed_logprob_max_diff"] <= 1e-6
        assert r["budget_vs_packed_logprob_max_diff"] <= 1e-6
        assert r["trim_vs_untrimmed_max_diff"] <= 1e-5


def test_bf16_weight_stream_is_the_cast_full_model(results: list[dict]) -> None:
    for r in results:
        assert r["stream_names_match"] and r["stream_bitwise_cast"] and r["manifest_matches_stream"]


def test_no_grad_pass_gathers_each_layer_once_and_reshards(results: list[dict]) -> None:
    for r in results:
        assert r["gather_once_logprob_diff"] == 0.0
        assert r["all_gathers_per_micro_batch"] == 4 * r["fsdp_modules"], r  # 4 micro-batches
        assert r["all_gathers_once"] == r["fsdp_modules"], r
        assert r["resharded_after_pass"]


def test_train_step_updates_skips_nan_and_resumes(results: list[dict]) -> None:
    for r in results:
        assert r["all_params_changed"]
        assert (
            r["step1"]["skipped"] == 0.0
            and r["step1"]["lr"] == pytest.approx(1e-2 / 3)
            and r["step1"]["grad_norm"] > 0
        )
        assert r["nan_step"]["skipped"] == 1.0 and math.isnan(r["nan_step"]["grad_norm"])
        assert r["nan_step_params_unchanged"]
        assert r["nan_step"]["lr"] == pytest.approx(2e-2 / 3)  # warmup 2 of 3; a skipped step stays there
        assert (r["steps_before_load"], r["steps_after_load"]) == (2, 1)
        assert r["after_save"]["lr"] == r["after_load"]["lr"] == pytest.approx(2e-2 / 3)  # schedule restored
        assert r["after_load"]["loss"] == r["after_save"]["loss"]
        assert r["after_load"]["grad_norm"] == r["after_save"]["grad_norm"]
        assert r["resume_param_diff"] == 0.0


def test_offload_releases_the_state_and_onload_restores_it_bitwise(results: list[dict]) -> None:
    for r in results:
        assert r["offload_released"] and r["offload_grads_dropped"], r
        # every parameter shard and both AdamW moments of each (the step counts stay)
        assert r["offload_optimizer_tensors"] > 0 and r["offload_tensor_count"] > r["offload_optimizer_tensors"]
        assert r["offload_bytes"] >= r["offload_state_bytes"] > 0  # whole storages (a shard may be a padded view)
        assert r["onload_bitwise"], r
        # the step after the round trip is the step without it: same metrics, same parameters bitwise
        # (so the optimizer still updates the storages the model computes with)
        assert r["offload_step_equal"] and r["offload_step_param_equal"], r


def test_critic_values_and_update(results: list[dict]) -> None:
    for r in results:
        assert r["values_shape"] == (4, 6)
        assert r["value_err"] <= 1e-5
        assert r["value_masked_zero"] and r["head_changed"] and r["critic_loss"] > 0
        assert not r["exported_has_head"] and r["exported_count"] == 26  # embed, 2 x 12 per layer, norm
