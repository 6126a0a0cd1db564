"""The GRPO recipe's CPU variant runs end to end with real Ray, FSDP2, vLLM and rule rewards."""

import pytest

from flowrl.algos import grpo
from flowrl.config import load_config
from flowrl.models.tiny import make_tiny_model
from flowrl.tasks.arithmetic import write_splits
from flowrl.tracking import read_metrics

pytestmark = pytest.mark.slow


def test_grpo_two_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    make_tiny_model(tmp_path / "model", seed=0)
    splits = write_splits(tmp_path / "data", n_train=64, n_test=16, level=1, seed=0)
    cfg = load_config(
        "recipes/grpo_arithmetic_tiny.yaml",
        [
            f"actor.model.path={tmp_path / 'model'}",
            f"data.train_files=[{splits['train']}]",
            f"data.val_files=[{splits['test']}]",
            f"trainer.run_dir={tmp_path / 'run'}",
            "trainer.total_steps=2",
            "trainer.loggers=[jsonl]",
            "data.val_max_samples=16",
        ],
    )
    result = grpo.main(cfg)
    assert 0.0 <= result["val/accuracy"] <= 1.0 and "val/accuracy_before" in result
    rows = read_metrics(str(tmp_path / "run"))
    steps = [r for r in rows if "actor/ppo_kl" in r]
    assert [r["step"] for r in steps] == [1, 2]
    first = steps[0]
    # step-0 consistency: every step's first mini-batch starts exactly at the rollout policy
    assert all(r["actor/first_ppo_kl"] == 0.0 and r["actor/first_clipfrac"] == 0.0 for r in steps)
    assert first["rollout/logprob_diff_max"] < 1e-3
    for key in ("reward/mean", "response_length/mean", "actor/grad_norm", "timing/generate", "perf/weight_sync_s"):
        assert key in first, key
