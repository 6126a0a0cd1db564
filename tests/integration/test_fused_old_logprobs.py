"""Old log-probs from the update's own forward equal a separate pass, and so does the update.

Two FSDP2 ranks (gloo) run the actor worker's ``update`` twice from the same weights: once
after ``compute_logprobs`` (the separate no-grad pass), once on a batch without old
log-probs (one mini-batch, one epoch), which takes them from its forward. TIS is on, so
the rollout-vs-trainer correction runs from that forward too. No vLLM, no Ray: the worker
is built around an engine.
"""

from __future__ import annotations

import pytest
import torch

from flowrl.config import load_config
from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig
from flowrl.keys import Keys
from flowrl.models.tiny import make_tiny_model
from flowrl.workers.actor_rollout import ActorRollout, old_logprobs_from_update
from tests.integration.multirank import run_ranks
from tests.integration.test_fsdp_engine import full_params, rollout_batch

pytestmark = pytest.mark.slow  # ~20 s: two spawned ranks

WORLD = 2


def _worker(cfg, model_path: str) -> ActorRollout:
    worker = ActorRollout.__new__(ActorRollout)  # no vLLM: only the training methods are used
    worker.cfg = cfg
    worker.loss_cfg = cfg.actor.policy_loss
    worker.trainer = FSDPEngine(FSDPEngineConfig(model_path=model_path, packing=True))
    return worker


def _run(rank: int, model_path: str) -> dict:
    cfg = load_config(
        None,
        [
            f"actor.model.path={model_path}",
            "data.train_files=[unused.jsonl]",
            "data.train_batch_size=4",
            "rollout.n=2",
            "actor.mini_batch_size=8",
            "actor.micro_batch_size=2",
            "actor.optim.lr=0.05",
            "actor.entropy_coef=0.01",
            "actor.policy_loss.mismatch=tis",
            "actor.policy_loss.tis_cap=2.0",
        ],
    )
    batch = rollout_batch(8, seed=4, vocab=200).chunk(WORLD)[rank]
    g = torch.Generator().manual_seed(rank)
    batch[Keys.ADVANTAGES] = torch.randn(batch[Keys.RESPONSE_MASK].shape, generator=g)  # [b, R]
    res: dict = {"fused": old_logprobs_from_update(cfg, 8)}

    separate = _worker(cfg, model_path)
    old = separate.compute_logprobs(batch)  # OLD_LOGPROBS, ENTROPY
    noise = 0.05 * torch.randn(old[Keys.OLD_LOGPROBS].shape, generator=g)
    batch[Keys.ROLLOUT_LOGPROBS] = (old[Keys.OLD_LOGPROBS] + noise) * batch[Keys.RESPONSE_MASK]
    sep_history = separate.update(batch | old)
    sep_params = full_params(separate.trainer)

    fused = _worker(cfg, model_path)
    fused_history = fused.update(batch)
    taken = fused.take_old_logprobs(batch)
    res["old_equal"] = torch.equal(taken[Keys.OLD_LOGPROBS], old[Keys.OLD_LOGPROBS])
    res["entropy_equal"] = torch.equal(taken[Keys.ENTROPY], old[Keys.ENTROPY])
    res["metrics"] = (sep_history, fused_history)
    res["params_equal"] = all(torch.equal(v, full_params(fused.trainer)[k]) for k, v in sep_params.items())
    with pytest.raises(ValueError, match="one optimizer step"):
        fused.update(batch.repeat(2))  # two mini-batches need the separate pass
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    model_dir = tmp_path_factory.mktemp("tiny")
    make_tiny_model(model_dir)
    return run_ranks(_run, WORLD, str(model_dir))


def test_update_takes_the_old_logprobs_of_a_separate_pass(results: list[dict]) -> None:
    for r in results:
        assert r["fused"]
        assert r["old_equal"] and r["entropy_equal"]


def test_fused_update_is_the_separate_update(results: list[dict]) -> None:
    for r in results:
        separate, fused = r["metrics"]
        assert separate == fused  # losses, ppo_kl, clipfrac, TIS figures, grad norm: bitwise
        assert "actor/tis_truncated_frac" in separate[0] or any("tis" in k for k in separate[0]), separate[0]
        assert r["params_equal"]
