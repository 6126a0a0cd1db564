"""Every recipe loads and validates with the overrides its header names."""

import importlib.util
import re
from pathlib import Path

import pytest

from flowrl.drivers.registry import BUILTIN_DRIVERS as DRIVERS
from flowrl.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_there_are_recipes_for_the_main_algorithms():
    names = {p.name.split("_")[0] for p in RECIPES}
    assert {"ppo", "grpo", "remax", "rloo", "reinforce"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(recipe):
    header = recipe.read_text().split("\ntrainer:")[0]
    assert "# Hardware:" in header and "# Run:" in header
    command = " ".join(ln.lstrip("# ").rstrip("\\ ") for ln in header.splitlines() if "flowrl train" in ln or ln.startswith("#         "))
    overrides = [w for w in re.findall(r"\S+=\S+", command)]
    assert overrides, f"{recipe.name}: the Run line names no overrides"
    if "\n  lora:" in recipe.read_text() and importlib.util.find_spec("peft") is None:
        pytest.skip("a LoRA recipe loads only where peft is installed (the lower-bounds environment has none)")
    cfg = load_config(recipe, overrides)
    assert cfg.trainer.algorithm in DRIVERS
