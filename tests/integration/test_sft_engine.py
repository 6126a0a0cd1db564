"""The engine on SFT batches, 2 gloo ranks against a plain (unsharded) Hugging Face model.

The reference scores each row alone, unpadded, and takes the token mean of the NLL over
the whole global batch, so it shares no padding, micro-batching or normalization code
with the engine. One spawned run does every check; the tests assert on what it returned.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from flowrl.batch import Batch
from flowrl.data.sft import SFTItem, collate_sft
from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig
from flowrl.engines.optim import OptimizerConfig
from flowrl.keys import Keys
from flowrl.models.tiny import TinyModelConfig, make_tiny_model
from flowrl.workers.sft import sft_token_mean_loss
from tests.integration.multirank import run_ranks

pytestmark = pytest.mark.slow  # ~30 s: two spawned ranks

WORLD = 2
ROWS = 8  # global batch; 4 per rank
PAD, EOS = 0, 1


def sft_batch(rows: int, seed: int, vocab: int) -> Batch:
    """Random prompts and responses (ending with EOS) of random lengths, right-padded."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(rows):
        p, r = (int(torch.randint(1, 7, (1,), generator=g)) for _ in range(2))
        prompt = torch.randint(3, vocab, (p,), generator=g).tolist()
        response = torch.randint(3, vocab, (r,), generator=g).tolist() + [EOS]
        items.append(SFTItem(prompt, response))
    return collate_sft(items, PAD)


def reference_nll(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(global token-mean NLL, per-row log-probs of the target tokens), row by row unpadded."""
    rows = []
    for i in range(len(batch)):
        n = int(batch[Keys.ATTENTION_MASK][i].sum())
        ids = batch[Keys.INPUT_IDS][i, :n][None]  # [1, n]
        targets = batch[Keys.LOSS_MASK][i, 1:n].bool()  # [n - 1]
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # [n - 1, V]
        rows.append(lp.gather(-1, ids[0, 1:, None])[:, 0][targets])  # [r]
    all_lp = torch.cat(rows)
    return -all_lp.sum() / len(all_lp), rows


def full_grads(engine: FSDPEngine) -> dict[str, torch.Tensor]:
    return {n: p.grad.full_tensor().clone() for n, p in engine.model.named_parameters()}


def max_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in a)


def _checks(rank: int, model_path: str, hf_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    engine = FSDPEngine(FSDPEngineConfig(model_path=model_path, optim=OptimizerConfig(lr=1e-2)))
    batch = sft_batch(ROWS, seed=4, vocab=engine.model.config.vocab_size)
    local = batch.chunk(WORLD)[rank]
    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ref_loss, ref_rows = reference_nll(ref, batch)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    res: dict = {"ref_loss": float(ref_loss)}
    grads = {}
    for mbs in (4, 1):
        res[f"loss_mbs{mbs}"] = engine.accumulate_gradients(local, sft_token_mean_loss, mbs)["loss"]
        grads[mbs] = full_grads(engine)
        res[f"grad_rel_err_mbs{mbs}"] = max_rel_err(grads[mbs], ref_grads)
        engine.optimizer.zero_grad(set_to_none=True)
    res["grad_rel_err_mbs1_vs_mbs4"] = max_rel_err(grads[1], grads[4])

    lp, _ = engine.compute_logprobs(local, 1.0, micro_batch_size=3)  # [4, L]
    mask = local[Keys.LOSS_MASK]
    mine = ref_rows[rank * 4 : rank * 4 + 4]
    res["logprob_err"] = max(float((lp[i][mask[i].bool()] - w).abs().max()) for i, w in enumerate(mine))
    res["padding_zero"] = bool((lp[local[Keys.ATTENTION_MASK] == 0] == 0).all() and (lp[:, 0] == 0).all())
    config = engine.config
    engine.config = replace(config, trim_padding=True)
    res["trim_diff"] = float((engine.compute_logprobs(local, 1.0, 3)[0] - lp).abs().max())
    engine.config = config

    engine.train_step(local, sft_token_mean_loss, micro_batch_size=2)
    engine.save_hf(hf_dir)
    res["params"] = {n: p.full_tensor().clone() for n, p in engine.model.named_parameters()}
    prompts = Batch(
        {
            Keys.PROMPT_IDS: torch.tensor([[PAD, 5, 6], [7, 8, 9]]),
            Keys.PROMPT_MASK: torch.tensor([[0, 1, 1], [1, 1, 1]]),
        }
    )
    prompts = prompts[rank : rank + 1] if rank == 1 else prompts  # ranks hold different prompt counts
    res["greedy"] = engine.generate_greedy(prompts, max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD)
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], str]:
    root = tmp_path_factory.mktemp("sft_engine")
    make_tiny_model(root / "model", TinyModelConfig(tie_word_embeddings=True), seed=2)
    return run_ranks(_checks, WORLD, str(root / "model"), str(root / "hf")), str(root / "hf")


def test_sft_gradient_equals_single_process_token_mean(results) -> None:
    for r in results[0]:
        assert math.isclose(r["loss_mbs4"], r["ref_loss"], rel_tol=1e-6)
        assert math.isclose(r["loss_mbs1"], r["ref_loss"], rel_tol=1e-6)
        assert r["grad_rel_err_mbs4"] <= 1e-5 and r["grad_rel_err_mbs1"] <= 1e-5
        assert r["grad_rel_err_mbs1_vs_mbs4"] <= 2e-6  # packed rows: float rounding of other row groupings


def test_sequence_logprobs_match_unpadded_rows(results) -> None:
    for r in results[0]:
        assert r["logprob_err"] <= 1e-5
        assert r["padding_zero"]
        assert r["trim_diff"] <= 1e-5


def test_save_hf_writes_the_trained_weights(results) -> None:
    from transformers import AutoModelForCausalLM

    ranks, hf_dir = results
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    params = dict(model.named_parameters())
    assert params.keys() == ranks[0]["params"].keys()
    assert all(torch.equal(params[k], v) for k, v in ranks[0]["params"].items())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after the round trip
    assert model.config.use_cache


def test_generate_greedy_matches_transformers(results) -> None:
    """Left-padded prompts on two ranks (2 and 1 prompts) against unpadded HF greedy decoding."""
    from transformers import AutoModelForCausalLM

    ranks, hf_dir = results
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    cases = [
        ([5, 6], ranks[0]["greedy"], 0),
        ([7, 8, 9], ranks[0]["greedy"], 1),
        ([7, 8, 9], ranks[1]["greedy"], 0),
    ]
    for prompt, (ids, mask), row in cases:
        want = model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )[0, len(prompt) :]
        n = int(mask[row].sum())
        assert ids[row, :n].tolist() == want[:n].tolist() and n == len(want)
        assert (ids[row, n:] == PAD).all()
