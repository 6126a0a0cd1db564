"""The reward-model path of FSDPEngine on 2 gloo ranks against plain Hugging Face models.

One spawned 2-rank run does every check and returns measurements: sequence scores of
rollout rows and of preference pairs equal an unsharded model's score at each row's last
token (computed row by row, unpadded); the pairwise gradient is the global mean's whatever
the micro-batch split; ``save_hf`` writes a folder that ``AutoModelForSequenceClassification``
loads with no missing or unexpected weights and that scores exactly as the engine did.
"""

from __future__ import annotations

import pytest
import torch

from flowrl.batch import Batch
from flowrl.data.sft import PairItem, collate_pairs
from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig, load_hf_model
from flowrl.engines.optim import OptimizerConfig
from flowrl.keys import Keys
from flowrl.models.tiny import make_tiny_model
from flowrl.workers.reward_model import pair_loss
from tests.integration.multirank import run_ranks
from tests.integration.test_fsdp_engine import full_grads, max_rel_err, rollout_batch

pytestmark = pytest.mark.slow  # ~30 s: two spawned ranks

WORLD, ROWS, PAD = 2, 8, 0


def random_pairs(rows: int, seed: int, vocab: int) -> Batch:
    g = torch.Generator().manual_seed(seed)

    def seq() -> list[int]:
        return torch.randint(3, vocab, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist()

    return collate_pairs([PairItem(seq(), seq()) for _ in range(rows)], PAD)


def last_token_score(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Score of one unpadded sequence [n] at its last token, by a token-classification model."""
    return model(input_ids=ids[None]).logits[0, -1, 0]


def reference_scores(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Rollout rows one by one: prompt (real tokens) + response up to its mask's end.  -> [B]"""
    out = []
    for i in range(len(batch)):
        prompt = batch[Keys.PROMPT_IDS][i][batch[Keys.PROMPT_MASK][i].bool()]
        response = batch[Keys.RESPONSE_IDS][i][batch[Keys.RESPONSE_MASK][i].bool()]
        out.append(last_token_score(model, torch.cat([prompt, response])))
    return torch.stack(out)


def reference_pair_scores(model: torch.nn.Module, pairs: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    def side(ids_key: str, mask_key: str) -> torch.Tensor:
        return torch.stack(
            [last_token_score(model, pairs[ids_key][i][pairs[mask_key][i].bool()]) for i in range(len(pairs))]
        )

    return side(Keys.CHOSEN_IDS, Keys.CHOSEN_MASK), side(Keys.REJECTED_IDS, Keys.REJECTED_MASK)


def _rm_checks(rank: int, model_path: str, save_dir: str) -> dict:
    from transformers import AutoModelForSequenceClassification

    config = FSDPEngineConfig(
        model_path=model_path, value_head=True, head_bias=False, seed=5, optim=OptimizerConfig(lr=1e-2, grad_clip=0)
    )
    engine = FSDPEngine(config)
    ref = load_hf_model(config)  # unsharded, the same initial weights (the head is seeded)
    vocab = engine.model.config.vocab_size
    rollout, pairs = rollout_batch(ROWS, seed=3, vocab=vocab), random_pairs(ROWS, seed=4, vocab=vocab)
    local_rollout, local_pairs = rollout.chunk(WORLD)[rank], pairs.chunk(WORLD)[rank]
    res: dict = {"has_bias": engine.model.score.bias is not None}

    chosen_ref, rejected_ref = reference_pair_scores(ref, pairs)  # [8], [8]
    torch.nn.functional.softplus(rejected_ref - chosen_ref).mean().backward()  # -log sigmoid(margin)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    with torch.no_grad():
        mine = slice(rank * 4, rank * 4 + 4)
        res["rollout_score_err"] = float(
            (engine.compute_sequence_scores(local_rollout, 3) - reference_scores(ref, rollout)[mine]).abs().max()
        )
        chosen, rejected = engine.compute_pair_scores(local_pairs, 3)
        res["pair_score_err"] = float(
            torch.cat([chosen - chosen_ref[mine], rejected - rejected_ref[mine]]).abs().max()
        )
    grads = {}
    for mbs in (4, 1):
        metrics = engine.accumulate_gradients(local_pairs, pair_loss, micro_batch_size=mbs)
        grads[mbs] = full_grads(engine)
        res[f"grad_rel_err_mbs{mbs}"] = max_rel_err(grads[mbs], ref_grads)
        res[f"loss_mbs{mbs}"] = metrics["loss"]
        engine.optimizer.zero_grad(set_to_none=True)
    res["ref_loss"] = float(torch.nn.functional.softplus(rejected_ref - chosen_ref).mean())

    res["step"] = engine.train_step(local_pairs, pair_loss, micro_batch_size=2)
    trained = engine.compute_sequence_scores(local_rollout, 4)
    engine.save_hf(save_dir)
    hf, info = AutoModelForSequenceClassification.from_pretrained(
        save_dir, dtype=torch.float32, output_loading_info=True
    )
    res["loading_info"] = {k: sorted(v) for k, v in info.items() if k != "error_msgs"}
    res["architectures"] = hf.config.architectures
    with torch.no_grad():
        hf_scores = []
        for i in range(len(local_rollout)):
            row = local_rollout[i : i + 1]
            ids = torch.cat([row[Keys.PROMPT_IDS][0][row[Keys.PROMPT_MASK][0].bool()],
                             row[Keys.RESPONSE_IDS][0][row[Keys.RESPONSE_MASK][0].bool()]])
            hf_scores.append(hf(input_ids=ids[None]).logits[0, 0])  # HF pools at the last token
        res["hf_vs_engine_after_step"] = float((torch.stack(hf_scores) - trained).abs().max())
    reloaded = FSDPEngine(FSDPEngineConfig(model_path=save_dir, value_head=True, head_bias=False, seed=99))
    res["reloaded_vs_engine"] = float((reloaded.compute_sequence_scores(local_rollout, 4) - trained).abs().max())
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    model = tmp_path_factory.mktemp("tiny")
    make_tiny_model(model, seed=0)
    return run_ranks(_rm_checks, WORLD, str(model), str(tmp_path_factory.mktemp("rm")))


def test_scores_are_the_head_at_the_last_token(results):
    for r in results:
        assert not r["has_bias"]
        assert r["rollout_score_err"] < 1e-5
        assert r["pair_score_err"] < 1e-5


def test_pair_gradient_is_the_global_mean_whatever_the_split(results):
    for r in results:
        assert r["grad_rel_err_mbs4"] < 1e-5 and r["grad_rel_err_mbs1"] < 1e-5
        assert r["loss_mbs4"] == pytest.approx(r["ref_loss"], rel=1e-5)
        assert r["loss_mbs1"] == pytest.approx(r["ref_loss"], rel=1e-5)
        step = r["step"]
        assert step["grad_norm"] > 0 and step["skipped"] == 0.0 and 0.0 <= step["accuracy"] <= 1.0


def test_saved_folder_is_a_sequence_classifier_that_scores_the_same(results):
    for r in results:
        assert r["architectures"] == ["Qwen2ForSequenceClassification"]
        assert r["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
        assert r["hf_vs_engine_after_step"] < 1e-5
        assert r["reloaded_vs_engine"] < 1e-5
