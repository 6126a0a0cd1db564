"""PPO against a learned reward model: train a tiny reward model on the arithmetic pairs, then run
``recipes/ppo_rm_arithmetic_tiny.yaml`` for 2 steps (real Ray, FSDP2 on 2 ranks, vLLM, the
reward model colocated with the actor)."""

import pytest

from flowrl.drivers import ppo
from flowrl.drivers.reward_model import train_reward_model
from flowrl.config import load_config
from flowrl.controller import init_ray
from flowrl.models.tiny import make_tiny_model
from flowrl.tasks.arithmetic import write_splits
from flowrl.trainer.tracking import read_metrics

pytestmark = pytest.mark.slow

ROLLOUT = 16  # data.train_batch_size * rollout.n of the recipe


def test_ppo_with_a_learned_reward_model(tmp_path):
    make_tiny_model(tmp_path / "model", seed=0)
    splits = write_splits(tmp_path / "data", n_train=64, n_test=16, level=1, seed=0)
    init_ray(num_cpus=2, env_vars={"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"})
    rm = train_reward_model(
        str(tmp_path / "model"), [splits["pairs_train"]], [splits["pairs_test"]], str(tmp_path / "rm"),
        steps=10, batch_size=16, lr=1e-3, num_workers=2, seed=0, micro_batch_size=8, loggers=("jsonl",),
    )
    assert "train/loss" in rm and 0.0 <= rm["val/accuracy"] <= 1.0

    cfg = load_config(
        "recipes/ppo_rm_arithmetic_tiny.yaml",
        [
            f"actor.model.path={tmp_path / 'model'}",
            f"critic.model.path={tmp_path / 'model'}",
            f"reward_model.path={tmp_path / 'rm'}",
            f"data.train_files=[{splits['train']}]",
            f"data.val_files=[{splits['test']}]",
            f"trainer.run_dir={tmp_path / 'run'}",
            "trainer.total_steps=2",
            "trainer.loggers=[jsonl]",
            "data.val_max_samples=16",
        ],
    )
    result = ppo.main(cfg)
    assert 0.0 <= result["val/accuracy"] <= 1.0  # validation still scores by the rule
    steps = [r for r in read_metrics(str(tmp_path / "run")) if "actor/ppo_kl" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["actor/first_ppo_kl"] == 0.0 and r["reward/errors"] == 0.0
        assert r["reward/score_mean"] == pytest.approx(r["reward/mean"], rel=1e-6)
        assert r["reward/score_mean/flowrl/arithmetic"] == pytest.approx(r["reward/mean"], rel=1e-6)
        # the rule scores 0 or 1, so its batch mean is a multiple of 1/16; a reward model's is not
        assert r["reward/min"] < r["reward/max"]
        assert abs(r["reward/mean"] * ROLLOUT - round(r["reward/mean"] * ROLLOUT)) > 1e-4
        assert "critic/grad_norm" in r and "kl_reward/kl" in r
