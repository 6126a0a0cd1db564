"""`flowrl eval` gives a training run's val/accuracy_before for the same model and rows.

Half-right ground truths (three rows in four start the tiny model's Hugging Face greedy
answer) under a prefix reward: the run's greedy validation and the CLI must both score
12/16. Both go through the rule-reward path chosen by ``reward.function`` /
``--reward-function``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flowrl.cli import main
from flowrl.data.rows import read_rows, write_rows
from flowrl.models.tiny import make_tiny_model
from flowrl.tasks.arithmetic import write_splits
from flowrl.tracking import read_metrics
from tests.integration.test_eval_cli import REPO, hf_greedy_texts

pytestmark = pytest.mark.slow  # ~2-3 min on 2 cores: a one-step GRPO run, then the CLI

REWARD = "tests.integration.eval_rewards:prefix_score"


def test_eval_equals_val_accuracy_before(tmp_path):
    make_tiny_model(tmp_path / "model", seed=0)
    paths = write_splits(tmp_path / "data", n_train=64, n_test=16, level=1, seed=0, fmt="jsonl")
    rows = [row for _, row in read_rows(paths["test"])]
    texts = hf_greedy_texts(str(tmp_path / "model"), rows)  # 8 new tokens, as below
    for i, (row, text) in enumerate(zip(rows, texts)):
        row["reward_model"] = {"style": "rule", "ground_truth": text[:2] if i % 4 != 3 else "\x00no"}
    val = write_rows(str(tmp_path / "val.jsonl"), rows)
    overrides = [
        f"actor.model.path={tmp_path / 'model'}", f"data.train_files=[{paths['train']}]", f"data.val_files=[{val}]",
        "trainer.total_steps=1", "trainer.num_workers=1", f"trainer.run_dir={tmp_path / 'run'}",
        "rollout.max_response_length=8", f"reward.function={REWARD}", "trainer.quiet=true",
    ]  # fmt: skip
    assert main(["train", os.path.join(REPO, "recipes", "grpo_arithmetic_tiny.yaml"), *overrides]) == 0
    before = read_metrics(str(tmp_path / "run"))[0]["val/accuracy_before"]
    assert before == 12 / 16
    cmd = [sys.executable, "-m", "flowrl.cli", "eval", str(tmp_path / "model"), val, "--max-new-tokens", "8",
           "--reward-function", REWARD]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accuracy=0.7500 (12/16)" in proc.stdout
