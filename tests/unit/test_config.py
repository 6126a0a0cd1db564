import pytest

from flowrl.config import ConfigError, load_config


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("actor:\n  model:\n    path: /models/tiny\ndata:\n  train_files: [train.jsonl]\nrollout:\n  n: 2\n")
    return path


def test_defaults_recipe_and_overrides_layer(recipe):
    cfg = load_config(recipe, ["trainer.total_steps=3", "rollout.n=4"])
    ppo = load_config(recipe, ["algorithm.advantage.estimator=gae", "critic.enable=true", "critic.model.path=/m"])
    assert ppo.critic.enable
    assert cfg.actor.model.path == "/models/tiny"  # from the recipe
    assert cfg.trainer.total_steps == 3 and cfg.rollout.n == 4  # from the overrides
    assert cfg.actor.policy_loss.clip_low == 0.2  # from the dataclass default
    with pytest.raises(Exception):
        cfg.trainer.total_steps = 5  # read-only after load


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.bogus=1"], "trainer.bogus: Key 'bogus' not in 'TrainerConfig'"),
        (["trainer.total_steps=abc"], "trainer.total_steps"),
        (["actor.mini_batch_size=3"], "not divisible by actor.mini_batch_size=3"),
        (["trainer.num_workers=3"], "not divisible by trainer.num_workers=3"),
        (["actor.micro_batch_size=3"], "not divisible by actor.micro_batch_size=3"),
        (["actor.loss_agg_mode=mean"], "actor.loss_agg_mode='mean' is not one of"),
        (["critic.enable=true"], "critic.model.path is not set"),
        (["data.train_files=[]"], "data.train_files is empty"),
        (["actor.policy_loss.dual_clip_c=0.5"], "actor.policy_loss.dual_clip_c=0.5 must be > 1"),
        (["rollout.temperature=0"], "rollout.temperature=0"),
        (["algorithm.advantage.estimator=gae"], "'gae' needs 'values', which only a critic provides"),
        (["algorithm.advantage.estimator=remax"], "needs 'baseline_scores'"),
        (["algorithm.advantage.estimator=nope"], "estimator='nope' is not registered"),
        (["rollout.n=1"], "set rollout.n > 1"),
        (
            ["rollout.n=1", "algorithm.advantage.estimator=reinforce_pp", "algorithm.dynamic_sampling.enable=true"],
            "algorithm.dynamic_sampling.enable=true drops groups whose scores are all equal: set rollout.n > 1",
        ),
        (["algorithm.dynamic_sampling.max_rounds=0"], "algorithm.dynamic_sampling.max_rounds=0 must be >= 1"),
        (
            ["algorithm.overlong.enable=true", "algorithm.overlong.buffer=300"],
            "algorithm.overlong.buffer=300 must be in [1, rollout.max_response_length=256]",
        ),
        (["algorithm.overlong.penalty_factor=-1"], "algorithm.overlong.penalty_factor=-1.0 must be >= 0"),
        (["actor.lora.rank=-1"], "actor.lora.rank=-1 must be >= 0"),
        (["actor.lora.rank=4", "actor.lora.alpha=0"], "actor.lora.alpha=0.0 must be > 0"),
        (["actor.lora.dropout=1.0"], "actor.lora.dropout=1.0 must be in"),
        (["actor.lora.target_modules=attention"], "actor.lora.target_modules='attention': give a list"),
        (["actor.lora.target_modules=[]"], "actor.lora.target_modules=[]: give a non-empty list"),
        (["actor.lora.rank=4", "actor.backend=mine"], "LoRA is applied by the fsdp training engine"),
        (["actor.offload=true", "actor.backend=mine"], "actor.offload: the fsdp training engine offloads its state"),
        (
            ["actor.offload=true", "placement.rollout_workers=1"],
            "actor.offload frees the device for a colocated vLLM engine; placement.rollout_workers=1",
        ),
    ],
)
def test_bad_values_name_the_key(recipe, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as e:
        load_config(recipe, overrides)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("actor: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: cannot read it"):
        load_config(bad)
