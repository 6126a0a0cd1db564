"""Bad input, case by case: ``flowrl train`` ends with ONE line naming the thing and the fix
(exit status 2) before any worker starts; per-sample problems are skipped and counted.

Every run-level case goes through the real command (``flowrl.cli.main``) with a real tiny
model folder; none of them may start Ray.
"""

import json
import os
import shutil

import pytest
import ray

from flowrl.cli import main
from flowrl.config import load_config
from flowrl.models.tiny import TinyModelConfig, make_tiny_model
from flowrl.trainer.preflight import load_inputs
from flowrl.rewards import RewardRunner, reward_metrics
from flowrl.trainer.loop import data_metrics
from tests.unit import misbehaving_rewards as bad_rewards

RECIPE = "recipes/grpo_arithmetic_tiny.yaml"


def row(i, **change):
    base = {
        "prompt": [{"role": "user", "content": f"What is {i} + 1? Answer with just the number."}],
        "data_source": "flowrl/arithmetic",
        "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
        "extra_info": {"index": i},
    }
    return {**base, **change}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    make_tiny_model(root / "model", seed=0)
    good = write_jsonl(root / "good.jsonl", [row(i) for i in range(16)])
    return root, root / "model", good


def train(files, tmp_path, *overrides, recipe=RECIPE):
    _, model, good = files
    base = [f"actor.model.path={model}", f"data.train_files=[{good}]", f"trainer.run_dir={tmp_path / 'run'}"]
    return main(["train", str(recipe), *base, *overrides])


def one_line_error(capsys, status):
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert "\n" not in err and err.startswith("flowrl train: "), err
    assert not ray.is_initialized(), "a bad input must be refused before Ray starts"
    return err


def bad_rows(files, tmp_path, rows, raw=None):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, rows) if raw is None else path.write_bytes(raw)
    return f"data.train_files=[{path}]"


CONFIG_CASES = {
    "unknown_key": (["trainer.total_stepz=3"], "trainer.total_stepz"),
    "wrong_type": (["trainer.total_steps=ten"], "trainer.total_steps"),
    "batch_not_divisible": (["data.train_batch_size=3"], "not divisible by actor.mini_batch_size=16"),
    "mini_batch_vs_workers": (["actor.mini_batch_size=8", "trainer.num_workers=3"], "not divisible by trainer.num_workers=3"),
    "unknown_choice": (["actor.loss_agg_mode=mean"], "actor.loss_agg_mode='mean' is not one of"),
    "unknown_algorithm": (["trainer.algorithm=dpo"], "trainer.algorithm='dpo': known drivers are"),
    "keep_last_zero": (["trainer.keep_last=0"], "trainer.keep_last=0 must be >= 1"),
    "hang_timeout_negative": (["trainer.hang_timeout_s=-1"], "trainer.hang_timeout_s=-1.0 must be >= 0"),
    "worker_logs_unknown": (["trainer.worker_logs=loud"], "trainer.worker_logs='loud' is not one of"),
    "cpus_per_worker_zero": (["placement.cpus_per_worker=0"], "placement.cpus_per_worker=0.0 must be > 0"),
}


CONFIG_CASES.update({  # sizes, rates and loggers refused at load time (before: ZeroDivisionError or a late crash)
    "mini_batch_zero": (["actor.mini_batch_size=0"], "actor.mini_batch_size=0 must be >= 1"),
    "micro_batch_zero": (["actor.micro_batch_size=0"], "actor.micro_batch_size=0 must be >= 1"),
    "train_batch_zero": (["data.train_batch_size=0"], "data.train_batch_size=0 must be >= 1"),
    "negative_lr": (["actor.optim.lr=-1e-5"], "actor.optim.lr=-1e-05 must be > 0"),
    "zero_response_length": (["rollout.max_response_length=0"], "rollout.max_response_length=0 must be >= 1"),
    "unknown_logger": (["trainer.loggers=[console,nope]"], "trainer.loggers lists 'nope'; known: console"),
    "logger_not_installed": (["trainer.loggers=[wandb]"], "the wandb package is not installed: pip install"),
    "top_p_above_one": (["rollout.top_p=1.5"], "rollout.top_p=1.5 must be in (0, 1]"),
})


CONFIG_CASES.update({  # multi-turn rollouts (rollout.multi_turn)
    "env_unknown": (["rollout.multi_turn.enable=true", "rollout.multi_turn.env=chess"],
                    "rollout.multi_turn.env='chess' is not registered; known: tools"),
    "env_path_missing": (["rollout.multi_turn.enable=true", "rollout.multi_turn.env=no_such_pkg.envs:Game"],
                         "cannot import module 'no_such_pkg.envs'"),
    "env_bad_kwarg": (["rollout.multi_turn.enable=true", "rollout.multi_turn.env_kwargs.colour=red"],
                      "rollout.multi_turn.env_kwargs do not fit environment 'tools'"),
    "env_unknown_tool": (["rollout.multi_turn.enable=true", "rollout.multi_turn.env_kwargs.tools=[abacus]"],
                         "tools=['abacus']: choose one or more of"),
    "multi_turn_hf_backend": (["rollout.multi_turn.enable=true", "rollout.backend=hf"],
                              "rollout.multi_turn.enable=true needs rollout.backend=vllm"),
    "multi_turn_zero_turns": (["rollout.multi_turn.enable=true", "rollout.multi_turn.max_turns=0"],
                              "rollout.multi_turn.max_turns=0 must be >= 1"),
    "lora_sync_unknown": (["actor.lora.rank=4", "actor.lora.sync=stream"],
                          "actor.lora.sync='stream' is not one of adapter, merged"),
    "multi_turn_zero_timeout": (["rollout.multi_turn.enable=true", "rollout.multi_turn.step_timeout_s=0"],
                                "rollout.multi_turn.step_timeout_s=0.0 must be > 0"),
})


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_mistakes(case, files, tmp_path, capsys):
    overrides, expected = CONFIG_CASES[case]
    assert expected in one_line_error(capsys, train(files, tmp_path, *overrides))



def test_an_error_names_its_override_alone(files, tmp_path, capsys):
    err = one_line_error(capsys, train(files, tmp_path, "trainer.total_stepz=3"))
    assert "override trainer.total_stepz=3: " in err and "actor.model.path" not in err  # no override list


def test_a_recipe_error_gives_the_yaml_line(files, tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("trainer:\n  total_steps: 3\n  bogus: 1\n")
    err = one_line_error(capsys, train(files, tmp_path, recipe=recipe))
    assert f"recipe {recipe} line 3: trainer.bogus" in err


def test_malformed_yaml(files, tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("trainer:\n  total_steps: [1, 2\n")
    err = one_line_error(capsys, train(files, tmp_path, recipe=recipe))
    assert f"recipe {recipe} line 2: cannot read it" in err  # the line where the open list starts


def test_missing_recipe(files, tmp_path, capsys):
    err = one_line_error(capsys, train(files, tmp_path, recipe=tmp_path / "nope.yaml"))
    assert "nope.yaml: no such file" in err


DATA_CASES = {
    "missing_file": (None, "dataset file not found:"),
    "missing_prompt": ([{k: v for k, v in row(0).items() if k != "prompt"}], "row 0 (line 1): missing 'prompt'"),
    "missing_ground_truth": (
        [row(0, reward_model={"style": "rule"})], "row 0 (line 1): missing 'reward_model.ground_truth'"
    ),
    "empty_prompt": ([row(0, prompt=[])], "row 0 (line 1): empty message list in 'prompt'"),
    "prompt_not_messages": ([row(0, prompt={"user": "What is 1 + 1?"})], "expected chat messages (a list) or text, got dict"),
    "invalid_json": (b'{"prompt": [}\n', "row 0 (line 1): not valid JSON"),
    "non_utf8": (
        (b'{"prompt": [{"role": "user", "content": "caf\xe9"}], "data_source": "flowrl/arithmetic", '
         b'"reward_model": {"ground_truth": "1"}}\n'),
        "text is not valid UTF-8 in 'prompt[0].content'",
    ),
    "unknown_data_source": ([row(i, data_source="my/task") for i in range(16)], "data_source 'my/task': no reward function"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_data_mistakes(case, files, tmp_path, capsys):
    content, expected = DATA_CASES[case]
    if content is None:
        override = f"data.train_files=[{tmp_path / 'absent.parquet'}]"
    elif isinstance(content, bytes):
        override = bad_rows(files, tmp_path, None, raw=content)
    else:
        override = bad_rows(files, tmp_path, content)
    assert expected in one_line_error(capsys, train(files, tmp_path, override))


def test_overlong_prompt_with_overlong_error_names_the_row(files, tmp_path, capsys):
    long = row(3, prompt=[{"role": "user", "content": "What is 1 + 1? " * 20}])
    override = bad_rows(files, tmp_path, [row(0), long])
    err = one_line_error(capsys, train(files, tmp_path, override, "data.prompts.overlong=error"))
    assert "row 1 (line 2): prompt has" in err and "more than data.max_prompt_length=64" in err


def test_every_prompt_filtered_leaves_too_few(files, tmp_path, capsys):
    err = one_line_error(capsys, train(files, tmp_path, "data.prompts.max_prompt_length=4"))
    assert "0 usable prompts (16 of 16 filtered" in err and "fewer than data.train_batch_size=8" in err


def test_model_folder_missing(files, tmp_path, capsys):
    err = one_line_error(capsys, train(files, tmp_path, f"actor.model.path={tmp_path / 'nomodel'}"))
    assert "actor.model.path=" in err and "nomodel: no such folder" in err


def test_model_folder_without_config(files, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = one_line_error(capsys, train(files, tmp_path, f"actor.model.path={tmp_path / 'empty'}"))
    assert "empty: no config.json, so not a Hugging Face model folder" in err


def test_critic_folder_missing(files, tmp_path, capsys):
    err = one_line_error(
        capsys,
        train(files, tmp_path, "critic.enable=true", f"critic.model.path={tmp_path / 'nocritic'}",
              "algorithm.advantage.estimator=gae"),
    )
    assert "critic.model.path=" in err and "nocritic: no such folder" in err


def test_model_folder_without_tokenizer(files, tmp_path, capsys):
    model = tmp_path / "no_tok"
    shutil.copytree(files[1], model)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (model / name).unlink(missing_ok=True)
    err = one_line_error(capsys, train(files, tmp_path, f"actor.model.path={model}"))
    assert "no_tok: no tokenizer files" in err


def test_mismatched_tokenizer(files, tmp_path, capsys):
    from transformers import AutoTokenizer

    model = tmp_path / "mismatch"
    shutil.copytree(files[1], model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens([f"<extra{i}>" for i in range(500)])  # a tokenizer of another, larger vocabulary
    tok.save_pretrained(model)
    err = one_line_error(capsys, train(files, tmp_path, f"actor.model.path={model}"))
    assert "the tokenizer has" in err and "the tokenizer belongs to another model" in err


def test_tensor_parallel_size_that_does_not_divide_the_heads(files, tmp_path, capsys):
    model = tmp_path / "three_heads"  # like SmolLM2-135M's 9 heads with T=2
    make_tiny_model(model, TinyModelConfig(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=32))
    capsys.readouterr()  # the model's save progress bar
    err = one_line_error(capsys, train(files, tmp_path, f"actor.model.path={model}", "rollout.tensor_parallel_size=2"))
    assert "rollout.tensor_parallel_size=2" in err and "has 3 attention heads" in err


def test_tensor_parallel_size_that_does_not_fit_the_key_value_heads(files, tmp_path, capsys):
    model = tmp_path / "three_kv_heads"
    make_tiny_model(model, TinyModelConfig(hidden_size=192, num_attention_heads=6, num_key_value_heads=3, head_dim=32))
    capsys.readouterr()
    err = one_line_error(capsys, train(files, tmp_path, f"actor.model.path={model}", "rollout.tensor_parallel_size=2"))
    assert "has 3 key/value heads" in err


def test_more_gpus_than_exist(files, tmp_path, capsys):
    err = one_line_error(capsys, train(files, tmp_path, "trainer.use_gpu=true", "trainer.num_workers=2"))
    assert "trainer.num_workers=2 with trainer.use_gpu=true needs 2 GPUs; this machine has 0" in err


def test_more_cpu_workers_than_cores(files, tmp_path, capsys):
    err = one_line_error(
        capsys, train(files, tmp_path, "trainer.num_workers=512", "actor.mini_batch_size=512",
                      "actor.micro_batch_size=1", "data.train_batch_size=128")
    )
    assert "trainer.num_workers=512 needs 512 CPUs" in err


def test_resume_folder_missing(files, tmp_path, capsys):
    err = one_line_error(capsys, train(files, tmp_path, f"trainer.resume={tmp_path / 'nock'}"))
    assert "nock: no such folder; name a checkpoint folder or use 'auto'" in err


def test_resume_folder_incomplete(files, tmp_path, capsys):
    (tmp_path / "half").mkdir()
    err = one_line_error(capsys, train(files, tmp_path, f"trainer.resume={tmp_path / 'half'}"))
    assert "half: not a complete checkpoint" in err


def test_resume_auto_from_a_run_with_other_workers(files, tmp_path, capsys):
    ck = tmp_path / "run" / "checkpoints" / "step_00000002"
    ck.mkdir(parents=True)
    meta = {"algorithm": "grpo", "num_workers": 1, "critic": False}
    (ck / "driver.json").write_text(json.dumps({"format": 1, "step": 2, "meta": meta}))
    err = one_line_error(capsys, train(files, tmp_path, "trainer.resume=auto"))
    assert "written with trainer.num_workers=1, this run has trainer.num_workers=2" in err


def test_resume_into_a_run_with_other_data_is_refused_and_overwrites_nothing(files, tmp_path, capsys):
    run = tmp_path / "run"
    ck = run / "checkpoints" / "step_00000002"
    ck.mkdir(parents=True)
    meta = {"algorithm": "grpo", "num_workers": 2, "critic": False, "seed": 0, "train_files": ["/elsewhere.jsonl"]}
    (ck / "driver.json").write_text(json.dumps({"format": 1, "step": 2, "meta": meta}))
    (run / "config.yaml").write_text("the first run's config\n")
    (run / "processes.json").write_text("{}\n")
    err = one_line_error(capsys, train(files, tmp_path, "trainer.resume=auto"))
    assert "written with data.train_files=['/elsewhere.jsonl']" in err and "resume with data.train_files=" in err
    assert (run / "config.yaml").read_text() == "the first run's config\n"  # nothing overwritten
    assert (run / "processes.json").read_text() == "{}\n"


def test_model_folder_without_weights(files, tmp_path, capsys):
    _, model, _ = files
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(model):
        if not name.endswith(".safetensors"):
            shutil.copy(model / name, bare / name)
    err = one_line_error(capsys, train(files, tmp_path, f"actor.model.path={bare}"))
    assert f"actor.model.path={bare}: no weights" in err and "save_pretrained" in err


def test_unwritable_run_dir(files, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = one_line_error(capsys, train(files, tmp_path, f"trainer.run_dir={blocker / 'run'}"))
    assert f"trainer.run_dir={blocker / 'run'}: {blocker} is not a folder" in err

# ---- per-sample problems: skipped or fixed, and counted ---------------------------------------
def _cfg(files, tmp_path, *overrides):
    _, model, good = files
    return load_config(
        RECIPE,
        [f"actor.model.path={model}", f"data.train_files=[{good}]", f"trainer.run_dir={tmp_path}", *overrides],
    )


@pytest.mark.parametrize("policy, kept, filtered, truncated", [("filter", 8, 8, 0), ("truncate_left", 16, 0, 8)])
def test_overlong_prompts_are_filtered_or_truncated_and_counted(files, tmp_path, policy, kept, filtered, truncated):
    long = [row(i, prompt=[{"role": "user", "content": "What is 1 + 1? " * 20}]) for i in range(8)]
    path = write_jsonl(tmp_path / "mixed.jsonl", [row(i) for i in range(8)] + long)
    cfg = _cfg(files, tmp_path, f"data.train_files=[{path}]", f"data.prompts.overlong={policy}")
    _, loader, _ = load_inputs(cfg)
    assert len(loader.dataset) == kept
    assert max(len(item.prompt_ids) for item in loader.dataset.items) <= 64
    from types import SimpleNamespace

    metrics = data_metrics(SimpleNamespace(train_data=loader))  # logged with step 0
    assert metrics == {"data/train_rows": 16.0, "data/train_filtered": float(filtered),
                       "data/train_truncated": float(truncated), "data/train_kept": float(kept)}


REWARD_CASES = [("raise", "reward/errors"), ("nan", "reward/invalid"), ("wrong_type", "reward/invalid"),
                ("sleep", "reward/timeouts")]


@pytest.mark.parametrize("source, counter", REWARD_CASES)
def test_misbehaving_reward_function_scores_zero_and_is_counted(source, counter):
    from flowrl.batch import Batch
    from flowrl.keys import Keys

    batch = Batch(
        {},
        {Keys.DATA_SOURCE: ["ok", source], Keys.PROMPT_TEXT: ["q", "q"], Keys.RESPONSE_TEXT: ["2", "2"],
         Keys.GROUND_TRUTH: ["2", "2"]},
        batch_size=2,
    )
    with RewardRunner(bad_rewards.resolve, timeout_s=1.0, num_workers=0) as runner:
        scored = runner.score(batch)
    assert scored[Keys.SCORES].tolist() == [1.0, 0.0]
    metrics = reward_metrics(scored)
    assert metrics[counter] == 1.0
    assert sum(metrics[k] for k in ("reward/errors", "reward/invalid", "reward/timeouts")) == 1.0
