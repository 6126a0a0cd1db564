"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import os

import pytest

from flowrl.drivers.sft import train_sft
from flowrl.models.tiny import make_tiny_model
from flowrl.quickstart import MODEL, QuickstartConfig, sft_config
from flowrl.tasks.arithmetic import write_splits


@pytest.fixture(scope="session")
def warm(tmp_path_factory):
    """A tiny model after SFT on the quickstart's arithmetic data (half the demonstrations restate
    the equation, which the scorer counts wrong): GRPO's reward then teaches the bare answer.
    Returns (QuickstartConfig, model folder, data splits); one SFT run serves every module."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    root = tmp_path_factory.mktemp("warm")
    cfg = QuickstartConfig(out_dir=str(root), sft_steps=150, quiet=True)
    data = write_splits(
        root / "data", cfg.n_train, cfg.n_test, cfg.level, 0, style="symbols", restate_fraction=0.5
    )
    make_tiny_model(root / "base", MODEL, seed=0)
    train_sft(sft_config(cfg, str(root / "base"), data))
    return cfg, str(root / "sft" / "model"), data
