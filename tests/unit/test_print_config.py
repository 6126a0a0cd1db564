"""``flowrl train RECIPE ... --print-config``: the resolved config as YAML, validated, nothing started."""

from __future__ import annotations

import pytest
import ray
from omegaconf import OmegaConf

from flowrl.cli import main
from flowrl.config import load_config

RECIPE = "recipes/grpo_arithmetic_tiny.yaml"
OVERRIDES = ["actor.model.path=/models/tiny", "data.train_files=[train.parquet]", "trainer.total_steps=3"]


def test_print_config_prints_the_resolved_yaml_and_starts_nothing(tmp_path, capsys):
    status = main(["train", RECIPE, *OVERRIDES, "--print-config"])
    out, err = capsys.readouterr()
    assert status == 0 and err == ""
    printed = OmegaConf.create(out)
    assert printed.trainer.total_steps == 3  # an override
    assert printed.rollout.n == 4 and printed.trainer.num_workers == 2  # from the recipe
    assert printed.actor.policy_loss.clip_low == 0.2 and printed.trainer.worker_logs == "files"  # defaults
    assert not ray.is_initialized(), "--print-config must not start Ray"
    resolved = tmp_path / "resolved.yaml"  # the output is itself a recipe of the same run
    resolved.write_text(out)
    assert load_config(resolved) == load_config(RECIPE, OVERRIDES)


def test_print_config_validates_first(capsys):
    status = main(["train", RECIPE, *OVERRIDES, "trainer.worker_logs=loud", "--print-config"])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "trainer.worker_logs='loud' is not one of files, console" in err
    assert not ray.is_initialized()


def test_train_help_points_to_the_keys_and_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "docs/recipes.md" in text and "--print-config" in text
