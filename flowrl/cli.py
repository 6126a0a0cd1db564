"""The ``flowrl`` command: ``flowrl train RECIPE.yaml [key=value ...]``."""

from __future__ import annotations

import argparse
import importlib
import sys

from flowrl.config import ConfigError, load_config

DRIVERS = {
    "ppo": "flowrl.algos.ppo",
    "grpo": "flowrl.algos.grpo",
    "remax": "flowrl.algos.remax",
    "rloo": "flowrl.algos.rloo",
    "reinforce_pp": "flowrl.algos.reinforce_pp",
}


def train(recipe: str, overrides: list[str]) -> int:
    cfg = load_config(recipe, overrides)
    name = cfg.trainer.algorithm
    if name not in DRIVERS:
        raise ConfigError(f"trainer.algorithm={name!r}: known drivers are {', '.join(sorted(DRIVERS))}")
    result = importlib.import_module(DRIVERS[name]).main(cfg)
    print(" | ".join(f"{k}={v:.4g}" for k, v in result.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowrl", description="Reinforcement learning for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run a recipe: flowrl train RECIPE.yaml [key=value ...]")
    p.add_argument("recipe", help="a recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.total_steps=3")
    args = parser.parse_args(argv)
    try:
        return train(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"flowrl: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
