"""docs/recipes.md is generated from the config dataclasses and must match them."""

from __future__ import annotations

import os
from dataclasses import dataclass

from omegaconf import OmegaConf

from flowrl.config import Config
from flowrl.config_docs import COMMAND, REPO, field_docs, recipe_summary, render

DOC = os.path.join(REPO, "docs", "recipes.md")


def test_recipes_doc_is_up_to_date():
    with open(DOC) as f:
        on_disk = f.read()
    assert on_disk == render(), f"docs/recipes.md is out of date with flowrl/config.py: run `{COMMAND}`"


def _leaf_keys(node, prefix: str = "") -> set[str]:
    keys = set()
    for key in node:
        value = node[key]
        name = f"{prefix}{key}"
        keys |= _leaf_keys(value, name + ".") if OmegaConf.is_dict(value) and len(value) else {name}
    return keys


def test_every_config_key_has_a_row():
    cfg = OmegaConf.structured(Config)
    for group in ("reference", "reward_model", "teacher"):  # null by default: give them their keys
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{group}.path=x"]))
    text = render()
    missing = [k for k in sorted(_leaf_keys(cfg)) if f"| `{k}` |" not in text]
    assert not missing and len(_leaf_keys(cfg)) > 60


@dataclass
class _Example:
    a: int = 1  # after the field
    # above the field,
    # on two lines
    b: str = "x"
    c: float = 0.5


def test_field_docs_reads_comments_after_and_above_fields():
    assert field_docs(_Example) == {"a": "after the field", "b": "above the field, on two lines", "c": ""}


def test_recipe_summary_is_the_first_sentence_of_the_header(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("# GRPO on a task. More words\n# on a second line.\n# Hardware: a GPU.\ntrainer:\n  seed: 1\n")
    assert recipe_summary(str(path)) == "GRPO on a task."
    path.write_text("# PPO with a critic,\n# on CPU\n# Run: flowrl train r.yaml\n")
    assert recipe_summary(str(path)) == "PPO with a critic, on CPU"


def test_the_menu_lists_every_registered_choice_with_a_reference():
    from flowrl.algos import AGG_MODES, ESTIMATORS, MISMATCH_MODES, POLICY_LOSSES
    from flowrl.config_docs import MENU

    choices = {choice for choice, _, _ in MENU}
    def builtin(fn) -> bool:  # other tests register their own names in this process
        return fn.__module__.startswith("flowrl.")

    wanted = {f"algorithm.advantage.estimator={n}" for n in ESTIMATORS.names() if builtin(ESTIMATORS.get(n).fn)}
    wanted |= {f"actor.policy_loss.name={n}" for n in POLICY_LOSSES.names() if builtin(POLICY_LOSSES.get(n))}
    wanted |= {f"actor.policy_loss.mismatch={m}" for m in MISMATCH_MODES}
    wanted |= {f"actor.loss_agg_mode={m}" for m in AGG_MODES}
    wanted |= {f"actor.kl_loss_type={k}" for k in ("k1", "k2", "k3", "abs")}
    wanted |= {"algorithm.dynamic_sampling.enable=true", "algorithm.overlong.enable=true"}
    wanted |= {"algorithm.use_kl_in_reward=true", "actor.use_kl_loss=true"}
    assert not wanted - choices, sorted(wanted - choices)
    assert all(what and ref and "|" not in what + ref for _, what, ref in MENU)
