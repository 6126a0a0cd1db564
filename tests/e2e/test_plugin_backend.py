"""A rollout backend registered by a plugin module that lives outside the repository trains
end to end on CPU: `flowrl train ... trainer.plugins=[my_engines] rollout.backend=hf_logged`
through real Ray workers (2 ranks, FSDP2), with Hugging Face generate instead of vLLM."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from flowrl.models.tiny import make_tiny_model
from flowrl.tasks.arithmetic import write_splits
from flowrl.trainer.tracking import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FLOWRL = Path(sys.executable).with_name("flowrl")

PLUGIN = '''
"""A rollout backend that wraps the built-in Hugging Face one and logs each call."""
import json
import os

from flowrl.engines.base import register_rollout_engine
from flowrl.engines.hf_rollout import from_run_config as hf_engine


class LoggedRollout:
    def __init__(self, inner, log_path):
        self.inner, self.log_path = inner, log_path
        self.dtype, self.tokenizer = inner.dtype, inner.tokenizer

    def _log(self, event):
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "event": event}) + "\\n")

    def generate(self, prompts, **kwargs):
        self._log("generate")
        return self.inner.generate(prompts, **kwargs)

    def load_weights(self, named_tensors):
        self._log("load_weights")
        self.inner.load_weights(named_tensors)

    def sleep(self, level=1):
        self.inner.sleep(level)

    def wake_up(self, tags=None):
        self.inner.wake_up(tags)


@register_rollout_engine("hf_logged")
def build(cfg, rank):
    from omegaconf import OmegaConf

    rollout = LoggedRollout(hf_engine(cfg, rank), os.path.join(cfg.trainer.run_dir, "rollout_calls.jsonl"))
    typed = {"config": OmegaConf.get_type(cfg).__name__, "loss": OmegaConf.get_type(cfg.actor.policy_loss).__name__,
             "readonly": OmegaConf.is_readonly(cfg)}
    rollout._log(typed)  # what the worker received: the typed, read-only config as loaded
    return rollout
'''


def test_a_plugin_rollout_backend_trains_end_to_end(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "my_engines.py").write_text(PLUGIN)
    # a graded reward (the random model never answers right), so every step has a gradient
    (project / "my_rewards.py").write_text("def longer(prompt, response, ground_truth, extra):\n    return len(response) / 8\n")
    make_tiny_model(tmp_path / "model", seed=0)
    splits = write_splits(tmp_path / "data", n_train=64, n_test=16, level=1, seed=0)
    run = tmp_path / "run"
    args = [
        str(REPO / "recipes" / "grpo_arithmetic_tiny.yaml"),
        "trainer.plugins=[my_engines]", "rollout.backend=hf_logged", "reward.function=my_rewards:longer",
        f"actor.model.path={tmp_path / 'model'}", f"data.train_files=[{splits['train']}]",
        f"data.val_files=[{splits['test']}]", f"trainer.run_dir={run}", "trainer.total_steps=2",
        "trainer.loggers=[jsonl]", "data.val_max_samples=16",
    ]  # fmt: skip
    proc = subprocess.run([str(FLOWRL), "train", *args], cwd=project, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    steps = [r for r in read_metrics(str(run)) if "actor/ppo_kl" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["actor/first_ppo_kl"] == 0.0 and r["reward/max"] > r["reward/min"] for r in steps)  # step-0 consistency holds with this backend
    assert all(r["rollout/logprob_diff_max"] < 1e-4 for r in steps)  # its sampler agrees with FSDP (fp32)
    calls = [json.loads(line) for line in (run / "rollout_calls.jsonl").read_text().splitlines()]
    typed = [c["event"] for c in calls if isinstance(c["event"], dict)]
    assert typed == [{"config": "Config", "loss": "PolicyLossConfig", "readonly": True}] * 2
    calls = [c for c in calls if not isinstance(c["event"], dict)]
    per_worker = Counter((c["pid"], c["event"]) for c in calls)
    pids = {c["pid"] for c in calls}
    assert len(pids) == 2  # both ranks built the plugin's engine
    # a sync at start-up and after each of the 2 steps; a rollout per step plus the evaluations
    assert all(per_worker[(pid, "load_weights")] == 3 and per_worker[(pid, "generate")] >= 4 for pid in pids)

    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "model" / "model.safetensors"))
    after = load_file(str(run / "policy" / "model.safetensors"))
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert before.keys() == after.keys() and not unchanged  # every parameter trained
