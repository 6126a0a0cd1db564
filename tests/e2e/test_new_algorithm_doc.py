"""docs/new_algorithm.md's example algorithm runs as written: 2 steps of the tiny GRPO recipe."""

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from flowrl.algos.registry import ESTIMATORS
from flowrl.config import load_config
from flowrl.models.tiny import make_tiny_model
from flowrl.tasks.arithmetic import write_splits
from flowrl.trainer.tracking import read_metrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "new_algorithm.md"


def doc_module() -> types.ModuleType:
    text = DOC.read_text()
    code = re.search(r"<!-- example: algorithm -->\n```python\n(.*?)```", text, re.S).group(1)
    module = types.ModuleType("doc_grpo_median")
    sys.modules[module.__name__] = module
    if "grpo_median" in ESTIMATORS.names():
        ESTIMATORS.remove("grpo_median")
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module


def test_median_hand_computed():
    m = doc_module()
    scores = torch.tensor([1.0, 0.0, 0.0, 5.0, 1.0, 1.0, 3.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    # group 0: median 0; group 1: median 1; group 2: median 3
    assert m.group_median(scores, groups).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 3.0]


@pytest.mark.slow
def test_doc_algorithm_trains_two_steps(tmp_path):
    m = doc_module()
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
    m.main(cfg)
    rows = [r for r in read_metrics(str(tmp_path / "run")) if "median_baseline/zero_adv_frac" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["actor/first_ppo_kl"] == 0.0 for r in rows)
