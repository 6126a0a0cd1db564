"""`flowrl quickstart`, shortened: SFT then GRPO with real Ray, FSDP2 on 2 ranks and vLLM on CPU.

The full-length run (300 SFT + 30 GRPO steps) and its accuracy gain are measured in
docs/quickstart.md; here the pipeline runs with few steps, and the policy it writes must
load in transformers and in vLLM (``flowrl export``, then ``flowrl eval``) and answer the
held-out prompts exactly as the trained policy did in the run's final evaluation, with the
same accuracy.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowrl.cli import main
from flowrl.trainer.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # ~2 min: two stages, each starting Ray workers and vLLM

RL_STEPS = 2
N_TEST = 12


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    argv = ["quickstart", "--out-dir", str(out), "--seed", "3", "--quiet"]
    argv += ["--sft-steps", "40", "--rl-steps", str(RL_STEPS), "--n-train", "400", "--n-test", str(N_TEST)]
    assert main(argv) == 0
    return out


def test_summary_and_metrics(out):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["seed"] == 3 and summary["config"]["rl_steps"] == RL_STEPS
    for key in ("held_out_accuracy_before_rl", "held_out_accuracy_after_rl", "sft/val_exact_match"):
        assert 0.0 <= summary[key] <= 1.0, key
    rows = read_metrics(str(out / "grpo"))
    assert [r["step"] for r in rows if "reward/mean" in r] == list(range(1, RL_STEPS + 1))
    assert rows[0]["val/accuracy_before"] == summary["held_out_accuracy_before_rl"]
    assert rows[-1]["val/accuracy"] == summary["held_out_accuracy_after_rl"]
    assert len(read_metrics(str(out / "sft"))) == 40 + 2  # before, 40 steps, after


def test_bad_argument_is_one_line(capsys):
    assert main(["quickstart", "--rl-steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "flowrl quickstart: rl_steps=0 must be >= 1"


def _samples(out):
    rows = [json.loads(line) for line in (out / "grpo" / "val_samples.jsonl").read_text().splitlines()]
    assert len(rows) == N_TEST
    return rows


@pytest.fixture(scope="module")
def exported(out):
    """``flowrl export`` of the run's policy folder: copied and checked."""
    folder = out / "exported"
    assert main(["export", str(out / "grpo" / "policy"), "--out", str(folder)]) == 0
    return folder


def test_exported_policy_answers_like_the_run_in_transformers(out, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(exported)
    for s in _samples(out):
        ids = tok(s["prompt"], return_tensors="pt", add_special_tokens=False).input_ids  # [1, p]
        gen = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True) == s["response"], s


def test_flowrl_eval_of_the_export_gives_the_runs_answers_and_accuracy(out, exported):
    """``flowrl eval`` (vLLM in its own process) on the exported folder and the held-out rows,
    with the run's lengths and reward settings (``--like-run``)."""
    samples, records = _samples(out), out / "eval.jsonl"
    cmd = [
        sys.executable, "-m", "flowrl.cli", "eval", str(exported), str(out / "data" / "test.parquet"),
        "--like-run", str(out / "grpo"), "--out", str(records),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads(line)["response"] for line in records.read_text().splitlines()] == [
        s["response"] for s in samples
    ]
    accuracy = read_metrics(str(out / "grpo"))[-1]["val/accuracy"]
    correct = sum(s["score"] >= 1.0 for s in samples)
    assert f"accuracy={accuracy:.4f} ({correct}/{N_TEST})" in proc.stdout, proc.stdout
