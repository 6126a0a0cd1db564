"""docs/new_algorithm.md's algorithm runs as written, from outside the repository: its module
is written into a temporary folder and its `flowrl train` command runs there (real Ray
workers, FSDP2, vLLM on CPU), so the driver, the estimator and the policy loss all come
from user code. Misspelt registry names fail at load time with one line."""

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from flowrl.algos.registry import ESTIMATORS, POLICY_LOSSES
from flowrl.models.tiny import make_tiny_model
from flowrl.tasks.arithmetic import write_splits
from flowrl.trainer.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "new_algorithm.md"
FLOWRL = Path(sys.executable).with_name("flowrl")  # the console script `pip install` made


def doc_block(name: str, lang: str) -> str:
    return re.search(rf"<!-- example: {name} -->\n```{lang}\n(.*?)```", DOC.read_text(), re.S).group(1)


def doc_command() -> list[str]:
    """The doc's `flowrl train` command as arguments (recipe made absolute, placeholders kept)."""
    words = doc_block("command", "bash").replace("\\\n", " ").split()
    assert words[:2] == ["flowrl", "train"]
    return [str(REPO / words[2]), *words[3:]]


def write_user_project(root: Path) -> None:
    (root / "my_algos").mkdir(parents=True)
    (root / "my_algos" / "__init__.py").write_text("")
    (root / "my_algos" / "median_grpo.py").write_text(doc_block("algorithm", "python"))


def flowrl_train(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(FLOWRL), "train", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_median_hand_computed():
    module = types.ModuleType("doc_median_grpo")
    for registry, name in ((ESTIMATORS, "grpo_median"), (POLICY_LOSSES, "pg_ratio_cap")):
        if name in registry:
            registry.remove(name)
    exec(compile(doc_block("algorithm", "python"), str(DOC), "exec"), module.__dict__)
    scores = torch.tensor([1.0, 0.0, 0.0, 5.0, 1.0, 1.0, 3.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    # group 0: median 0; group 1: median 1; group 2: median 3
    assert module.group_median(scores, groups).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 3.0]
    ratio_above = torch.tensor([[0.0, 0.5]]), torch.tensor([[0.0, 0.0]])  # r = 1 and e^0.5 > 1.2
    loss, metrics = module.pg_ratio_cap(*ratio_above, torch.ones(1, 2), torch.ones(1, 2), types.SimpleNamespace(clip_high=0.2))
    assert torch.allclose(loss, torch.tensor([[-1.0, -1.2]])) and float(metrics["capfrac"]) == 0.5


@pytest.mark.slow
def test_doc_algorithm_trains_from_a_folder_outside_the_repository(tmp_path):
    write_user_project(tmp_path / "project")
    make_tiny_model(tmp_path / "model", seed=0)
    splits = write_splits(tmp_path / "data", n_train=64, n_test=16, level=1, seed=0)
    args = [
        a.replace("MODEL_DIR", str(tmp_path / "model")).replace("DATA/train.parquet", splits["train"])
        .replace("DATA/test.parquet", splits["test"])
        for a in doc_command()
    ]  # fmt: skip
    run = tmp_path / "run"
    args += [f"trainer.run_dir={run}", "trainer.total_steps=2", "trainer.loggers=[jsonl]", "data.val_max_samples=16"]
    proc = flowrl_train(tmp_path / "project", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_metrics(str(run)) if "median_baseline/zero_adv_frac" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["actor/first_ppo_kl"] == 0.0 and "actor/capfrac" in r for r in rows)  # the user's loss ran
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["algorithm"]["advantage"]["estimator"] == "grpo_median"
    assert saved["actor"]["policy_loss"]["name"] == "pg_ratio_cap"
    assert saved["trainer"]["algorithm"] == "my_algos.median_grpo"


@pytest.mark.parametrize(
    ("override", "message", "listed"),
    [
        ("actor.policy_loss.name=pg_ratio_capp", "actor.policy_loss.name='pg_ratio_capp' is not registered; known: ",
         "pg_ratio_cap"),
        ("algorithm.advantage.estimator=grpo_medain", "algorithm.advantage.estimator='grpo_medain' is not registered",
         "grpo_median"),
        ("trainer.algorithm=my_algos.nope", "trainer.algorithm='my_algos.nope': cannot import it", ""),
        ("algorithm.use_kl_in_reward=true", "does not put a KL penalty in the reward", ""),
    ],
)  # fmt: skip
def test_misspelt_names_fail_at_load_time_with_one_line(tmp_path, override, message, listed):
    write_user_project(tmp_path / "project")
    (tmp_path / "model").mkdir()
    args = [a.replace("DATA/", f"{tmp_path}/").replace("MODEL_DIR", str(tmp_path / "model")) for a in doc_command()]
    proc = flowrl_train(tmp_path / "project", [*args, override])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert listed in lines[0]  # the names the user's module registered are among those listed
