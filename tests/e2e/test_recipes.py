"""Each recipe's CPU variant runs 2 steps end to end: real Ray, FSDP2 (2 ranks), vLLM, rule rewards."""

import json
import os

import pytest

from flowrl.trainer.checkpoint import find_latest
from flowrl.drivers.registry import BUILTIN_DRIVERS as DRIVERS
from flowrl.config import load_config
from flowrl.models.tiny import make_tiny_model
from flowrl.tasks.arithmetic import write_splits
from flowrl.trainer.tracking import read_metrics

pytestmark = pytest.mark.slow

RECIPES = ["grpo", "ppo", "remax", "rloo", "reinforce_pp"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    make_tiny_model(root / "model", seed=0)
    return root / "model", write_splits(root / "data", n_train=64, n_test=16, level=1, seed=0)


def two_steps_on(assets, run_dir) -> list[str]:
    """Overrides for a 2-step run of a tiny recipe on the assets' model and data."""
    model, splits = assets
    return [
        f"actor.model.path={model}",
        f"critic.model.path={model}",
        f"data.train_files=[{splits['train']}]",
        f"data.val_files=[{splits['test']}]",
        f"trainer.run_dir={run_dir}",
        "trainer.total_steps=2",
        "trainer.loggers=[jsonl]",
        "data.val_max_samples=16",
    ]


@pytest.mark.parametrize("algo", RECIPES)
def test_recipe_two_steps(algo, assets, tmp_path, monkeypatch):
    import importlib

    # one recipe picks its layout with the planner (trainer.plan=auto, a fresh profile of this machine)
    planned = ["trainer.plan=auto"] if algo == "rloo" else []
    monkeypatch.setenv("FLOWRL_PLANNER_CACHE", str(tmp_path / "planner_cache"))
    cfg = load_config(f"recipes/{algo}_arithmetic_tiny.yaml", two_steps_on(assets, tmp_path / "run") + planned)
    assert cfg.trainer.algorithm == algo
    result = importlib.import_module(DRIVERS[algo]).main(cfg)
    assert 0.0 <= result["val/accuracy"] <= 1.0 and "val/accuracy_before" in result
    rows = read_metrics(str(tmp_path / "run"))
    steps = [r for r in rows if "actor/ppo_kl" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # step-0 consistency: every step's first mini-batch starts exactly at the rollout policy
    assert all(r["actor/first_ppo_kl"] == 0.0 and r["actor/first_clipfrac"] == 0.0 for r in steps)
    # the sampler's and the trainer's log-probs agree (fp32, CPU)
    assert all(r["rollout/logprob_diff_max"] < 1e-3 for r in steps)
    for key in (
        "reward/mean",
        "response_length/mean",
        "response_length/clip_ratio",
        "actor/grad_norm",
        "actor/lr",
        "actor/pg_loss",
        "actor/entropy",
        "timing/generate",
        "perf/weight_sync_s",
        "perf/tokens_per_s",
        "advantages/mean",
    ):
        assert key in steps[0], key
    # the last step is checkpointed by default (trainer.save_every=0), with the critic's state for PPO
    saved = find_latest(tmp_path / "run" / "checkpoints")
    assert saved.step == 2 and os.path.isfile(os.path.join(saved.path, "actor", ".metadata"))
    assert os.path.isdir(os.path.join(saved.path, "critic")) == (algo == "ppo")
    if algo == "ppo":
        assert "critic/grad_norm" in steps[0] and "values/mean" in steps[0]
        assert "kl_reward/kl" in steps[0] and "kl_ref/k1" in steps[0]
    if algo == "remax":
        assert "remax/baseline_mean" in steps[0]
    if planned:  # the plan is recorded, and each step logs its prediction next to the measured stages
        plan = json.loads((tmp_path / "run" / "plan.json").read_text())
        assert plan["alternatives"] and plan["calibration_s"] > 0
        predicted = plan["chosen"]["predicted_s"]
        for r in steps:
            assert r["plan/predicted_step_s"] == predicted["step"] > 0
            assert all(f"timing/{stage}" in r for stage in predicted if stage != "step")


def test_grpo_with_a_tensor_parallel_rollout(assets, tmp_path):
    """The 2 Ray workers form ONE vLLM replica of T=2: each rollout is dispatched to both and collected once.

    Real Ray, FSDP2 and vLLM with tensor parallelism on CPU, unseeded requests
    (``rollout.seed_per_prompt=false``). The sampler's log-probs match the trainer's only
    if the sync reached both shards and the two ranks drew the same tokens.
    (`tests/integration/test_tensor_parallel_rollout.py` pushes the ranks' RNGs apart on
    purpose; here both workers start alike.)
    """
    import importlib
    import json

    cfg = load_config(
        "recipes/grpo_arithmetic_tiny.yaml",
        [
            *two_steps_on(assets, tmp_path / "run"),
            "rollout.tensor_parallel_size=2",
            "rollout.seed_per_prompt=false",
            "actor.log_entropy=false",  # and no entropy pass: the metric goes, the rest stays
        ],
    )
    assert cfg.trainer.num_workers == 2
    importlib.import_module(DRIVERS["grpo"]).main(cfg)
    steps = [r for r in read_metrics(str(tmp_path / "run")) if "actor/ppo_kl" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["rollout/logprob_diff_max"] < 1e-3 for r in steps)
    assert all(r["actor/first_ppo_kl"] == 0.0 for r in steps)
    assert all("actor/entropy" not in r and "actor/pg_loss" in r for r in steps)
    with open(tmp_path / "run" / "val_samples.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 16  # collected once per replica, not once per rank


MENU_RECIPES = ["gspo", "cispo", "dapo"]  # the algorithm menu: GRPO's driver with another loss / sampling


@pytest.mark.parametrize("name", MENU_RECIPES)
def test_menu_recipe_two_steps(name, assets, tmp_path):
    """recipes/{gspo,cispo,dapo}_arithmetic_tiny.yaml as written, 2 steps through real Ray workers and vLLM."""
    from flowrl.drivers.registry import load_driver

    cfg = load_config(f"recipes/{name}_arithmetic_tiny.yaml", two_steps_on(assets, tmp_path / "run"))
    result = load_driver(cfg.trainer.algorithm).main(cfg)
    assert 0.0 <= result["val/accuracy"] <= 1.0
    steps = [r for r in read_metrics(str(tmp_path / "run")) if "actor/ppo_kl" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["actor/first_ppo_kl"] == 0.0 and r["rollout/logprob_diff_max"] < 1e-3 for r in steps)
    assert all(r["actor/grad_norm"] == r["actor/grad_norm"] for r in steps)  # not NaN
    if name == "cispo":
        assert all("actor/is_weight" in r for r in steps)
    if name == "dapo":  # the random tiny model answers nothing right: every round may be all-equal
        assert all(1 <= r["dynamic_sampling/rounds"] <= 3 and "overlong/penalty_mean" in r for r in steps)
        assert all(r["dynamic_sampling/kept_groups"] >= 1 for r in steps)


def test_dynamic_sampling_refills_on_a_task_with_all_equal_groups(assets, tmp_path):
    """The DAPO recipe with a reward that scores every response to an even answer 1.0 (an
    all-equal group): each step needs more than one round of 8 prompts to hold 8 groups
    whose scores vary, and trains on exactly those."""
    overrides = [
        *two_steps_on(assets, tmp_path / "run"),
        "reward.function=tests.e2e.dapo_rewards:half_all_equal",
        "algorithm.overlong.enable=false",  # scores from the reward alone
        "algorithm.dynamic_sampling.max_rounds=6",
    ]
    cfg = load_config("recipes/dapo_arithmetic_tiny.yaml", overrides)
    import importlib

    importlib.import_module(DRIVERS["grpo"]).main(cfg)
    steps = [r for r in read_metrics(str(tmp_path / "run")) if "actor/ppo_kl" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["dynamic_sampling/rounds"] > 1, r["dynamic_sampling/rounds"]
        assert r["dynamic_sampling/dropped_groups"] > 0 and r["dynamic_sampling/short"] == 0.0
        assert r["dynamic_sampling/kept_groups"] == 8
        assert r["actor/first_ppo_kl"] == 0.0 and r["rollout/logprob_diff_max"] < 1e-3
    # every prompt of a round was taken from the sampler: the checkpoint's position says how many
    saved = find_latest(tmp_path / "run" / "checkpoints")
    import json

    with open(os.path.join(saved.path, "driver.json")) as f:
        sampler = json.load(f)["sampler"]
    rounds = sum(int(r["dynamic_sampling/rounds"]) for r in steps)
    assert sampler["epoch"] * sampler["n_rows"] + sampler["position"] == 8 * rounds


def test_ppo_on_multi_turn_rollouts(assets, tmp_path):
    """PPO (critic, GAE over the model's tokens only, KL in the reward) on multi-turn batches: the
    tools environment with the calculator, 2 steps through real Ray workers and vLLM. The random
    tiny model rarely calls the tool; the point is that the driver runs unchanged on the batches."""
    import importlib

    cfg = load_config(
        "recipes/ppo_arithmetic_tiny.yaml",
        [
            *two_steps_on(assets, tmp_path / "run"),
            "rollout.multi_turn.enable=true",
            "rollout.multi_turn.max_turns=2",
            "rollout.max_response_length=16",
        ],
    )
    importlib.import_module(DRIVERS["ppo"]).main(cfg)
    steps = [r for r in read_metrics(str(tmp_path / "run")) if "actor/ppo_kl" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["actor/first_ppo_kl"] == 0.0 and r["rollout/logprob_diff_max"] < 1e-3 for r in steps)
    assert all("agent/turns_mean" in r and "critic/grad_norm" in r and "values/mean" in r for r in steps)
    assert all(r["actor/grad_norm"] == r["actor/grad_norm"] for r in steps)  # not NaN
