"""bench/bench_grpo.py builds a valid run config and fixed-length prompts (CPU, no model)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pyarrow.parquet as pq

from flowrl.config import load_config
from flowrl.models.tiny import make_tokenizer

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_grpo.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_grpo", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompts_have_the_exact_templated_length(tmp_path: Path) -> None:
    path = _bench().write_prompts(tmp_path / "p.parquet", rows=3, prompt_len=40, seed=0)
    rows = pq.read_table(path).to_pylist()
    tokenizer = make_tokenizer()
    assert len(rows) == 3
    for row in rows:
        text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        assert len(tokenizer(text, add_special_tokens=False).input_ids) == 40


def test_overrides_make_one_update_per_rollout_with_ignore_eos(tmp_path: Path) -> None:
    args = argparse.Namespace(
        device="cuda",
        prompts=64,
        n=8,
        steps=4,
        gpus=1,
        response_len=512,
        prompt_len=256,
        micro_batch=16,
        gradient_checkpointing=True,
        cuda_graphs=True,
        gpu_memory_utilization=0.5,
    )
    cfg = load_config(
        None, _bench().overrides(args, tmp_path / "m", str(tmp_path / "p.parquet"), tmp_path / "r")
    )
    assert cfg.actor.mini_batch_size == 512 and cfg.data.train_batch_size * cfg.rollout.n == 512
    assert cfg.rollout.ignore_eos and not cfg.rollout.enforce_eager and cfg.actor.use_kl_loss
    assert cfg.actor.model.dtype == "bfloat16" and cfg.trainer.use_gpu
