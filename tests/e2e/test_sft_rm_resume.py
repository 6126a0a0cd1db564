"""`flowrl sft` and `flowrl rm` run in the RL loop: SIGKILLed while saving a checkpoint, they
resume with `resume=auto` and end with exactly the metrics of an uninterrupted run
(subprocesses; real Ray and FSDP2 on 2 ranks, CPU). SFT takes a recipe, RM its flags."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flowrl.models.tiny import make_tiny_model
from flowrl.tasks.arithmetic import write_splits
from flowrl.trainer.checkpoint import find_latest, list_checkpoints
from flowrl.trainer.tracking import read_metrics
from tests.e2e.procs import finish
from tests.e2e.test_fault_injection import stable, wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 5


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    make_tiny_model(root / "model", seed=0)
    return root / "model", write_splits(root / "data", n_train=32, n_test=8, level=1, seed=0)


def start(command: list[str], out_dir: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out_dir.mkdir(parents=True, exist_ok=True)
    log = open(out_dir.parent / f"{out_dir.name}.stderr.txt", "ab")
    args = [sys.executable, "-m", "flowrl.cli", *command]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)


def kill_while_saving_step_3_then_resume(command, out_dir: Path, resume: list[str], reference: tuple) -> None:
    """SIGKILL the run at ``out_dir`` while it writes step 3, then resume it; the uninterrupted
    ``reference`` run (command, folder) goes alongside the resume (the kill's timing stays its own)."""
    proc = start(command, out_dir)
    wait_for(proc, lambda: (out_dir / "checkpoints" / "step_00000003.tmp").exists(), poll=0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert find_latest(out_dir / "checkpoints").step == 2  # the half-written step 3 is never loaded
    uninterrupted, resumed = start(*reference), start(command + resume, out_dir)
    assert finish(resumed) == 0 and finish(uninterrupted) == 0
    assert "resumed from" in (out_dir.parent / f"{out_dir.name}.stderr.txt").read_text()


def test_sft_resumes_after_sigkill_with_the_uninterrupted_metrics(assets, tmp_path):
    model, splits = assets

    def recipe(out_dir: Path) -> list[str]:
        path = out_dir.parent / f"{out_dir.name}.yaml"
        path.write_text(yaml.safe_dump({
            "model_path": str(model), "train_files": [splits["sft_train"]], "val_files": [splits["sft_test"]],
            "out_dir": str(out_dir), "steps": STEPS, "batch_size": 8, "micro_batch_size": 4, "lr": 1e-3,
            "num_workers": 2, "greedy_samples": 2, "max_new_tokens": 4, "loggers": ["jsonl"],
        }))  # fmt: skip
        return ["sft", str(path), "save_every=1"]

    reference, run = tmp_path / "reference", tmp_path / "run"
    kill_while_saving_step_3_then_resume(recipe(run), run, ["resume=auto"], (recipe(reference), reference))
    ref_rows, rows = read_metrics(str(reference)), read_metrics(str(run))
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [0, 1, 2, 3, 4, 5, 5]
    assert stable(rows) == stable(ref_rows) and "train/loss" in rows[3]
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [4, 5]  # keep_last=2
    assert (run / "model" / "config.json").is_file()

    # `flowrl export` of a step folder needs no --base: the checkpoint recorded the model it started from
    step = run / "checkpoints" / "step_00000005"
    assert finish(start(["export", str(step)], tmp_path / "export")) == 0
    exported, final = load_file(str(step / "hf" / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


def test_rm_resumes_after_sigkill_with_the_uninterrupted_metrics(assets, tmp_path):
    model, splits = assets

    def flags(out_dir: Path) -> list[str]:
        return [
            "rm", "--model-path", str(model), "--train-files", splits["pairs_train"],
            "--val-files", splits["pairs_test"], "--out-dir", str(out_dir), "--steps", str(STEPS),
            "--batch-size", "8", "--lr", "1e-3", "--num-workers", "2", "--save-every", "1",
            "micro_batch_size=4", "loggers=[jsonl]",
        ]  # fmt: skip

    reference, run = tmp_path / "reference", tmp_path / "run"
    kill_while_saving_step_3_then_resume(flags(run), run, ["--resume", "auto"], (flags(reference), reference))
    ref_rows, rows = read_metrics(str(reference)), read_metrics(str(run))
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [0, 1, 2, 3, 4, 5, 5]
    assert stable(rows) == stable(ref_rows) and "train/loss" in rows[3]
    assert (run / "config.json").is_file()  # the trained reward model's folder
