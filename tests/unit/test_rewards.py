"""Rule rewards: GSM8K scoring, the registry, and a runner that survives bad reward functions."""

import os
import subprocess
import sys
import time

import pytest
import torch

from flowrl.batch import Batch
from flowrl.keys import Keys
from flowrl.rewards import RewardConfig, RewardResolver, RewardRunner, RewardStatus, compute_scores
from flowrl.rewards import gsm8k
from flowrl.rewards.registry import load_function
from flowrl.tasks import arithmetic
from misbehaving_rewards import resolve  # tests/unit is on sys.path (pytest rootdir-relative import)


# ---- GSM8K ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "response,truth,method,expected",
    [
        ("She has 3 + 4 = 7 apples.\n#### 72", "72", "strict", 1.0),
        ("#### 1,234", "1234", "strict", 1.0),
        ("#### $12.00", "12", "strict", 1.0),
        ("####12.0", "12", "strict", 1.0),
        ("#### -5", "-5", "strict", 1.0),
        ("#### 5", "-5", "strict", 0.0),
        ("The answer is 72.", "72", "strict", 0.0),  # no "#### N": no answer in strict mode
        ("The answer is 72.", "72", "flexible", 1.0),
        ("#### 71 ... I mean 72", "72", "flexible", 1.0),  # flexible: last number in the text
        ("#### 72 ... or 71", "72", "flexible", 0.0),
        ("#### 70\n#### 72", "72", "strict", 1.0),  # strict: the last "####"
        ("no numbers here", "72", "flexible", 0.0),
        ("#### 72", "Janet sells 16 - 3 - 4 = 9 eggs... #### 72", "strict", 1.0),  # full solution as truth
    ],
)
def test_gsm8k_score(response, truth, method, expected):
    assert gsm8k.compute_score("q", response, truth, {}, method=method)["score"] == expected


def test_gsm8k_format_and_correct_scores():
    wrong = gsm8k.compute_score("q", "#### 71", "72", {}, format_score=0.1, correct_score=2.0)
    right = gsm8k.compute_score("q", "#### 72", "72", {}, format_score=0.1, correct_score=2.0)
    none = gsm8k.compute_score("q", "seventy-two", "72", {}, format_score=0.1, correct_score=2.0)
    assert wrong == {"score": 0.1, "acc": 0.0, "has_answer": 1.0}
    assert right == {"score": 2.0, "acc": 1.0, "has_answer": 1.0}
    assert none == {"score": 0.0, "acc": 0.0, "has_answer": 0.0}
    with pytest.raises(ValueError, match="method='loose'"):
        gsm8k.compute_score("q", "#### 72", "72", {}, method="loose")


# ---- registry -------------------------------------------------------------------------------
def test_default_sources_and_unknown_source():
    resolve = RewardResolver()
    assert resolve("openai/gsm8k") is gsm8k.compute_score
    assert resolve("gsm8k") is gsm8k.compute_score
    assert resolve("flowrl/arithmetic") is arithmetic.compute_score
    with pytest.raises(ValueError, match=r"no reward function for data_source 'my/task'.*reward.by_source"):
        resolve("my/task")


def test_dotted_paths_and_bound_kwargs():
    cfg = RewardConfig(
        by_source={"my/task": "flowrl.tasks.arithmetic:compute_score"},
        kwargs={"my/task": {"format_score": 0.25}, "openai/gsm8k": {"method": "flexible"}},
    )
    resolve = RewardResolver(cfg)
    assert resolve("my/task")("q", "8", "7", {})["score"] == 0.25  # bare integer, wrong: format score
    assert resolve("openai/gsm8k")("q", "it is 7", "7", {})["score"] == 1.0  # flexible mode bound
    everything = RewardResolver(RewardConfig(function="flowrl.rewards.gsm8k:compute_score"))
    assert everything("flowrl/arithmetic") is gsm8k.compute_score  # `function` overrides defaults


@pytest.mark.parametrize(
    "path,message",
    [
        ("flowrl.rewards.gsm8k.compute_score", "write it as 'pkg.module:function'"),
        ("flowrl.no_such_module:f", "cannot import module 'flowrl.no_such_module'"),
        ("flowrl.rewards.gsm8k:nope", "has no 'nope'"),
        ("flowrl.rewards.gsm8k:METHODS", "is a tuple, not a callable"),
    ],
)
def test_bad_dotted_paths(path, message):
    with pytest.raises(ValueError, match=message):
        load_function(path)


# ---- runner ---------------------------------------------------------------------------------
def make_batch(sources):
    n = len(sources)
    return Batch(
        non_tensors={
            Keys.PROMPT_TEXT: ["p"] * n,
            Keys.RESPONSE_TEXT: ["7" if i % 2 else "8" for i in range(n)],
            Keys.GROUND_TRUTH: ["7"] * n,
            Keys.DATA_SOURCE: sources,
            Keys.EXTRA_INFO: [{}] * n,
        }
    )


SOURCES = ["ok", "raise", "ok", "nan", "inf", "wrong_type", "no_score", "spin", "sleep", "ok", "die", "ok"]
EXPECTED_STATUS = {
    "ok": RewardStatus.OK,
    "raise": RewardStatus.ERROR,
    "die": RewardStatus.ERROR,
    "nan": RewardStatus.INVALID,
    "inf": RewardStatus.INVALID,
    "wrong_type": RewardStatus.INVALID,
    "no_score": RewardStatus.INVALID,
    "spin": RewardStatus.TIMEOUT,
    "sleep": RewardStatus.TIMEOUT,
}


def test_runner_survives_bad_functions_in_worker_processes():
    start = time.monotonic()
    scored, metrics = compute_scores(make_batch(SOURCES), resolve, timeout_s=0.5, num_workers=2)
    elapsed = time.monotonic() - start
    assert elapsed < 8.0, f"scoring took {elapsed:.1f} s"  # two hung calls, each cut at 0.5 s
    # responses alternate "8" (wrong) / "7" (right): "ok" rows 0, 2, 9, 11 score 0, 0, 1, 1
    assert scored[Keys.SCORES].dtype == torch.float32
    assert scored[Keys.SCORES].tolist() == [0.0] * 9 + [1.0, 0.0, 1.0]
    assert scored[Keys.REWARD_STATUS].tolist() == [int(EXPECTED_STATUS[s]) for s in SOURCES]
    assert metrics["reward/errors"] == 2 and metrics["reward/timeouts"] == 2
    assert metrics["reward/invalid"] == 4
    assert metrics["reward/score_mean"] == pytest.approx(2 / 12)
    assert metrics["reward/length_mean"] == 1.0  # only successful calls' extras
    assert metrics["reward/score_mean/ok"] == 0.5
    assert "RuntimeError: reward bug" in scored[Keys.REWARD_EXTRA][1]["error"]
    assert "exit code 3" in scored[Keys.REWARD_EXTRA][10]["error"]


def test_runner_replaces_hung_workers_and_keeps_going():
    with RewardRunner(resolve, timeout_s=0.3, num_workers=1) as runner:
        first = runner.score(make_batch(["spin", "ok", "ok"]))
        second = runner.score(make_batch(["ok", "ok"]))  # the killed worker was replaced
    assert first[Keys.REWARD_STATUS].tolist() == [2, 0, 0]
    assert first[Keys.SCORES].tolist() == [0.0, 1.0, 0.0]
    assert second[Keys.SCORES].tolist() == [0.0, 1.0]


def test_inline_runner_times_out_a_spinning_function_with_an_alarm():
    start = time.monotonic()
    scored, metrics = compute_scores(make_batch(["ok", "spin", "raise", "ok"]), resolve, 0.3, num_workers=0)
    assert time.monotonic() - start < 3.0
    assert scored[Keys.REWARD_STATUS].tolist() == [0, 2, 1, 0]
    assert scored[Keys.SCORES].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert metrics["reward/timeouts"] == 1 and metrics["reward/errors"] == 1


def test_unpicklable_function_is_a_config_error_before_any_call():
    with RewardRunner(lambda ds: (lambda p, r, t, e: 1.0), num_workers=1) as runner:
        with pytest.raises(ValueError, match="data_source 'ok'.*cannot be sent to a reward worker"):
            runner.score(make_batch(["ok"]))


def test_user_function_by_dotted_path_runs_in_workers(tmp_path, monkeypatch):
    (tmp_path / "my_reward_mod.py").write_text(
        "def score(prompt, response, truth, extra, bonus=0.0):\n"
        "    return float(response.strip() == truth) + bonus\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = RewardConfig(function="my_reward_mod:score", kwargs={"*": {"bonus": 0.5}}, num_workers=1)
    with RewardRunner.from_config(cfg) as runner:
        scored = runner.score(make_batch(["anything", "anything"]))
    assert scored[Keys.SCORES].tolist() == [0.5, 1.5]


def test_function_not_importable_in_the_worker_is_an_error_not_a_crash(tmp_path):
    import importlib
    import sys

    (tmp_path / "vanishing_reward_mod.py").write_text("def score(p, r, t, e):\n    return 1.0\n")
    sys.path.insert(0, str(tmp_path))
    try:
        fn = importlib.import_module("vanishing_reward_mod").score
    finally:
        sys.path.remove(str(tmp_path))  # workers will not find the module
    with RewardRunner(lambda ds: fn, timeout_s=5.0, num_workers=1) as runner:
        scored = runner.score(make_batch(["x", "y"]))
    sys.modules.pop("vanishing_reward_mod", None)
    assert scored[Keys.REWARD_STATUS].tolist() == [1, 1]
    assert "could not be loaded: ModuleNotFoundError" in scored[Keys.REWARD_EXTRA][0]["error"]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" in f.read()  # exited, waiting to be reaped
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_exits_when_its_parent_is_killed(tmp_path):
    script = (
        "import sys\n"
        "from flowrl.rewards.pool import CallPool, _Worker\n"
        "from misbehaving_rewards import spinning_fn\n"
        "pool = CallPool(1)\n"
        "pool._workers.append(_Worker())\n"
        "print(pool._workers[0].process.pid, flush=True)\n"
        "pool.run([(spinning_fn, ('p', 'r', 't', {}))], timeout_s=600)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.path.dirname(__file__)]))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
    try:
        worker_pid = int(parent.stdout.readline())
        time.sleep(0.5)  # the worker is now spinning
        assert not _gone(worker_pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 5.0
    while not _gone(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(worker_pid), "the orphaned reward worker kept running"


@pytest.mark.parametrize("num_workers", [0, 1])
def test_verl_style_reward_functions_are_called_the_verl_way(num_workers):
    """compute_score(data_source, solution_str, ground_truth, extra_info=None), by name, in a worker too."""
    module = "tests.unit.verl_style_rewards"
    cfg = RewardConfig(
        by_source={"verl/a": f"{module}:compute_score", "verl/b": f"{module}:without_extra_info",
                   "verl/c": f"{module}:with_kwargs"},
        kwargs={"verl/b": {"bonus": 0.5}},
    )  # fmt: skip
    batch = make_batch(["verl/a", "verl/a", "verl/b", "verl/c"])
    batch[Keys.EXTRA_INFO] = [{"index": 0}, {}, {}, {}]
    scored, _ = compute_scores(batch, RewardResolver(cfg), timeout_s=5.0, num_workers=num_workers)
    # responses alternate "8", "7" against ground truth "7"
    assert scored[Keys.SCORES].tolist() == [0.0, 1.0, 0.5, 11.0]
    assert scored[Keys.REWARD_STATUS].tolist() == [RewardStatus.OK] * 4
    extra = scored[Keys.REWARD_EXTRA]
    assert extra[0]["source_len"] == len("verl/a") and extra[0]["has_extra"] == 1.0 and extra[1]["has_extra"] == 0.0
    assert RewardResolver(cfg)("verl/b")("prompt", "7", "7", {}) == 1.5  # flowrl's positional call still works


def test_trl_style_reward_functions_get_batches_of_one():
    module = "tests.unit.verl_style_rewards"
    cfg = RewardConfig(by_source={"trl/a": f"{module}:trl_accuracy", "trl/bad": f"{module}:trl_wrong_length"})
    batch = make_batch(["trl/a", "trl/a", "trl/bad"])
    batch[Keys.EXTRA_INFO] = [{"solution": "7"}] * 3  # what data.prompts.ground_truth_key=solution keeps there
    scored, _ = compute_scores(batch, RewardResolver(cfg), timeout_s=5.0, num_workers=0)
    assert scored[Keys.SCORES].tolist() == [0.25, 1.25, 0.0]
    assert scored[Keys.REWARD_STATUS].tolist() == [RewardStatus.OK, RewardStatus.OK, RewardStatus.ERROR]
    assert "one score per completion" in scored[Keys.REWARD_EXTRA][2]["error"]
