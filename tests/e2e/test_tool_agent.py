"""A model learns to use a tool, end to end on CPU: SFT on demonstrations of mixed quality (most answer
a 2-digit product at once, which a tiny model gets wrong; the rest call the calculator), then GRPO with
multi-turn rollouts through real Ray workers (FSDP2, 2 ranks), real vLLM and the real tools
environment. Held-out accuracy (sampled at T=1, so it measures how often the model takes each path)
rises because the model learns to call the calculator."""

from __future__ import annotations

import os

import pytest

from flowrl.config import load_config
from flowrl.drivers.sft import SFTConfig, train_sft
from flowrl.models.tiny import make_tiny_model
from flowrl.plot import plot_run
from flowrl.quickstart import MODEL
from flowrl.tasks.tool_arithmetic import write_splits
from flowrl.trainer.tracking import read_metrics

pytestmark = pytest.mark.slow


def test_grpo_teaches_the_calculator(tmp_path) -> None:
    from flowrl.drivers import grpo

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    data = write_splits(tmp_path / "data", 4000, 64, digits=2, seed=0, direct_fraction=0.5)
    make_tiny_model(tmp_path / "base", MODEL, seed=0)
    train_sft(SFTConfig(
        model_path=str(tmp_path / "base"), train_files=[data["sft_train"]], val_files=[data["sft_test"]],
        out_dir=str(tmp_path / "sft"), steps=200, batch_size=64, micro_batch_size=32, lr=2e-3,
        lr_schedule="cosine", warmup_steps=20, num_workers=2, seed=0, greedy_samples=0, loggers=["jsonl"], quiet=True,
    ))  # fmt: skip
    run_dir = tmp_path / "grpo"
    cfg = load_config("recipes/grpo_tool_arithmetic_tiny.yaml", [
        f"actor.model.path={tmp_path / 'sft' / 'model'}", f"data.train_files=[{data['train']}]",
        f"data.val_files=[{data['test']}]", f"trainer.run_dir={run_dir}", "trainer.total_steps=8",
        "trainer.eval_every=0", "trainer.loggers=[jsonl]", "rollout.val_temperature=1.0",
    ])  # fmt: skip
    result = grpo.main(cfg)
    rows = [r for r in read_metrics(str(run_dir)) if "agent/tool_calls_mean" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    first, last = rows[0], rows[-1]
    # seen: tool calls 0.57 -> 0.93 per trajectory, reward 0.40 -> 0.68, held-out 0.44 -> 0.72 (sampled, T=1)
    assert last["agent/tool_calls_mean"] > first["agent/tool_calls_mean"] + 0.2, (first, last)
    assert last["reward/mean"] > first["reward/mean"] + 0.1, (first, last)
    assert result["val/accuracy"] > result["val/accuracy_before"] + 0.15, result
    # token-exact multi-turn batches: the sampler's and the trainer's log-probs agree (fp32, CPU)
    assert all(r["rollout/logprob_diff_max"] < 1e-3 for r in rows)
    assert all(r["agent/turns_max"] <= 3 and r["agent/observation_tokens_mean"] >= 0 for r in rows)
    _, skipped = plot_run(str(run_dir))
    assert not {"agent/turns_mean", "agent/tool_calls_mean", "agent/tool_errors_mean"} & set(skipped)
