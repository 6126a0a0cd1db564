"""On-policy distillation end to end on CPU: a tiny teacher trained by SFT, a fresh smaller student.

Real Ray workers, FSDP2 (2 ranks, gloo), vLLM (CPU) and the colocated teacher role: the student
samples, the teacher scores the samples, and the student's reverse KL to the teacher on its own
samples falls while the teacher's log-prob of those samples rises.
"""

from __future__ import annotations

import pytest

from flowrl.config import load_config
from flowrl.drivers.registry import load_driver
from flowrl.drivers.sft import train_sft
from flowrl.models.tiny import TinyModelConfig, make_tiny_model
from flowrl.tasks.arithmetic import write_splits
from flowrl.trainer.tracking import read_metrics

pytestmark = pytest.mark.slow

TEACHER = TinyModelConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
STEPS = 12


@pytest.fixture(scope="module")
def teacher_and_student(tmp_path_factory):
    """A teacher twice as wide as the student, fine-tuned on the arithmetic answers (digits, EOS)."""
    root = tmp_path_factory.mktemp("distill")
    splits = write_splits(root / "data", n_train=256, n_test=16, level=1, seed=0)
    make_tiny_model(root / "teacher_init", config=TEACHER, seed=1)
    sft = train_sft(
        model_path=str(root / "teacher_init"),
        train_files=[splits["sft_train"]],
        val_files=[splits["sft_test"]],
        out_dir=str(root / "sft"),
        steps=40,
        batch_size=16,
        micro_batch_size=8,
        lr=3e-3,
        num_workers=2,
        greedy_samples=0,
        loggers=["jsonl"],
        quiet=True,
    )
    assert sft["val/loss"] < sft["val/loss_before"] - 2.0  # the teacher learned the answers' format
    make_tiny_model(root / "student", seed=0)  # the default tiny model: half the teacher's width
    return root / "sft" / "model", root / "student", splits


def test_the_student_moves_towards_its_teacher(teacher_and_student, tmp_path):
    teacher, student, splits = teacher_and_student
    run = tmp_path / "run"
    cfg = load_config(
        "recipes/distill_arithmetic_tiny.yaml",
        [
            f"actor.model.path={student}",
            f"teacher.path={teacher}",
            f"data.train_files=[{splits['train']}]",
            f"data.val_files=[{splits['test']}]",
            f"trainer.run_dir={run}",
            f"trainer.total_steps={STEPS}",
            "trainer.loggers=[jsonl]",
            "trainer.save_every=-1",
            "trainer.save_policy=false",
            "data.val_max_samples=16",
        ],
    )
    result = load_driver(cfg.trainer.algorithm).main(cfg)
    assert 0.0 <= result["val/accuracy"] <= 1.0
    steps = [r for r in read_metrics(str(run)) if "distill/reverse_kl" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    # step-0 consistency and the sampler-vs-trainer agreement hold as for every driver
    assert all(r["actor/first_ppo_kl"] == 0.0 and r["rollout/logprob_diff_max"] < 1e-3 for r in steps)
    assert all("timing/teacher" in r and "distill/seq_reverse_kl" in r for r in steps)
    first = steps[:2]
    last = steps[-2:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    kl_first, kl_last = mean(first, "distill/reverse_kl"), mean(last, "distill/reverse_kl")
    lp_first, lp_last = mean(first, "distill/teacher_logprob"), mean(last, "distill/teacher_logprob")
    print(f"reverse KL {kl_first:.3f} -> {kl_last:.3f}, teacher log-prob {lp_first:.3f} -> {lp_last:.3f}")
    assert kl_last < 0.7 * kl_first, (kl_first, kl_last)
    assert lp_last > lp_first + 0.5, (lp_first, lp_last)


def test_a_teacher_on_its_own_worker_with_the_task_reward_mixed_in(teacher_and_student, tmp_path):
    """``placement.separate: [teacher]``: the teacher gets a worker of its own (not the actor's
    processes); w > 0 adds GRPO's advantage; two mini-batches per step (old log-probs from collect)."""
    teacher, student, splits = teacher_and_student
    run = tmp_path / "run"
    cfg = load_config(
        "recipes/distill_arithmetic_tiny.yaml",
        [
            f"actor.model.path={student}",
            f"teacher.path={teacher}",
            f"data.train_files=[{splits['train']}]",
            f"data.val_files=[{splits['test']}]",
            f"trainer.run_dir={run}",
            "trainer.total_steps=2",
            "trainer.loggers=[jsonl]",
            "trainer.save_every=-1",
            "trainer.save_policy=false",
            "data.val_max_samples=8",
            "placement.separate=[teacher]",
            "placement.cpus_per_worker=0.5",
            "actor.mini_batch_size=16",
            "actor.micro_batch_size=8",
            "algorithm.advantage.distill_reward_weight=0.5",
        ],
    )
    load_driver(cfg.trainer.algorithm).main(cfg)
    steps = [r for r in read_metrics(str(run)) if "distill/reverse_kl" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["actor/first_ppo_kl"] == 0.0 and r["rollout/logprob_diff_max"] < 1e-3 for r in steps)
    assert all(r["distill/reverse_kl"] > 1.0 for r in steps)  # a random student, far from its teacher
    assert (run / "logs" / "teacher_0.log").is_file()  # the teacher's own worker process
