"""The training loop's wiring of checkpoints, resume, the NaN/Inf guard and Ctrl-C.

``loop.run`` runs here over a fake runtime (no Ray): its worker group stands for the
real one (whose save/load are tested on real runs in tests/e2e/test_fault_injection.py).
"""

import os
import signal
from types import SimpleNamespace

import pytest

from flowrl.trainer import loop
from flowrl.trainer.checkpoint import find_latest, list_checkpoints
from flowrl.config import load_config
from flowrl.data.sampler import PromptSampler
from flowrl.trainer.faults import RewardsFailing, RunInterrupted, TrainingDiverged, run_training
from flowrl.trainer.tracking import Tracker, read_metrics
from tests.unit.test_checkpoint import FakeGroup


class FakeRuntime(SimpleNamespace):
    def begin_step(self, step):
        self.step = step

    def record_run(self):
        self.recorded = True

    def step_timed(self, seconds):
        self.slowest = max(getattr(self, "slowest", 0.0), seconds)

    def shutdown(self):
        self.tracker.close()
        self.closed = True


def fake_runtime(cfg):
    sampler = PromptSampler(16, 8, seed=cfg.trainer.seed)
    loader = SimpleNamespace(sampler=sampler, dataset=SimpleNamespace(stats={"n_rows": 16, "n_filtered": 0}))
    loader.state_dict, loader.load_state_dict = sampler.state_dict, sampler.load_state_dict
    tracker = Tracker(cfg.trainer.run_dir, ["jsonl"])
    return FakeRuntime(cfg=cfg, actor=FakeGroup(), critic=None, train_data=loader, val_data=None, tracker=tracker,
                       step=0, closed=False)


@pytest.fixture
def built(monkeypatch):
    made = []

    def build(cfg):
        made.append(fake_runtime(cfg))
        return made[-1]

    monkeypatch.setattr(loop, "build_runtime", build)
    return made


def config(tmp_path, *overrides):
    return load_config(None, [f"trainer.run_dir={tmp_path}", "actor.model.path=m", "data.train_files=[x.jsonl]",
                              "rollout.n=2", "trainer.total_steps=5", "trainer.save_policy=false", *overrides])


def step_fn(skipped_at=(), interrupt_at=None, signal_at=None):
    """A train step: the sampler position and a parameter change, like a real one."""

    def train_step(rt):
        rt.train_data.sampler.next_indices()
        rt.actor.weights += 1.0
        if rt.step == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the step
        if rt.step == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return {"actor/skipped": float(rt.step in skipped_at), "actor/pg_loss": 0.5, "w": rt.actor.weights}

    return train_step


def test_checkpoints_every_n_and_resume_continues_without_duplicate_steps(tmp_path, built):
    loop.run(config(tmp_path, "trainer.save_every=2", "trainer.keep_last=5"), step_fn())
    full = read_metrics(str(tmp_path))
    assert [c.step for c in list_checkpoints(tmp_path / "checkpoints")] == [2, 4, 5]
    assert built[0].closed

    os.remove(find_latest(tmp_path / "checkpoints").path + "/driver.json")  # step 5's save never finished
    loop.run(config(tmp_path, "trainer.save_every=2", "trainer.resume=auto"), step_fn())
    rows = read_metrics(str(tmp_path))
    assert built[1].actor.loaded.endswith("step_00000004/actor")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 5]  # step 5 once, then the final evaluation row
    assert rows == full  # the fake step is deterministic, so every row is the same


def test_a_run_whose_every_reward_call_fails_stops_with_a_clear_message(tmp_path, built):
    broken_from = 2  # step 1 scores; from step 2 on every reward call fails

    def train_step(rt):
        return step_fn()(rt) | {"reward/failed_frac": 1.0 if rt.step >= broken_from else 0.25}

    cfg = config(tmp_path, "trainer.max_reward_failure_steps=3", "trainer.total_steps=9")
    with pytest.raises(RewardsFailing, match=r"steps 2-4: every reward call failed, 3 steps in a row"):
        loop.run(cfg, train_step)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2, 3, 4] and built[0].closed
    status = run_training(lambda c: loop.run(c, train_step), config(tmp_path / "again", "trainer.total_steps=9"), ValueError)
    assert status == 1  # flowrl train exits non-zero (it used to train on all-zero rewards and exit 0)


def test_nan_steps_are_counted_and_stop_the_run_after_max_in_a_row(tmp_path, built):
    cfg = config(tmp_path, "trainer.save_every=1", "trainer.max_bad_steps=2", "trainer.total_steps=9")
    with pytest.raises(TrainingDiverged, match=r"steps 3-4: 2 steps in a row .* last good checkpoint: .*step_00000003"):
        loop.run(cfg, step_fn(skipped_at={1, 3, 4}))
    rows = read_metrics(str(tmp_path))
    assert [(r["step"], r["train/bad_step"], r["train/bad_steps_in_a_row"]) for r in rows[1:]] == [
        (1, 1.0, 1.0), (2, 0.0, 0.0), (3, 1.0, 1.0), (4, 1.0, 2.0)
    ]
    assert find_latest(tmp_path / "checkpoints").step == 3  # no checkpoint of the step that tripped the guard
    assert built[0].closed


def test_ctrl_c_finishes_the_step_saves_and_stops(tmp_path, built):
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup/background shells
    with pytest.raises(RunInterrupted, match=r"after step 2; checkpoint .*step_00000002"):
        loop.run(config(tmp_path), step_fn(interrupt_at=2))
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2]
    assert find_latest(tmp_path / "checkpoints").step == 2 and built[0].closed
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is gone again

    result = loop.run(config(tmp_path, "trainer.resume=auto"), step_fn())
    assert result == {} and built[1].actor.weights == 5.0  # 2 restored + 3 more steps
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2, 3, 4, 5, 5]


def test_ctrl_c_without_save_on_interrupt(tmp_path, built):
    with pytest.raises(RunInterrupted, match="after step 1; no checkpoint"):
        loop.run(config(tmp_path, "trainer.save_on_interrupt=false"), step_fn(interrupt_at=1))
    assert find_latest(tmp_path / "checkpoints") is None


def test_sigusr1_saves_a_checkpoint_on_demand_and_training_goes_on(tmp_path, built):
    loop.run(config(tmp_path, "trainer.keep_last=5"), step_fn(signal_at=2))  # save_every=0: only the last
    assert [c.step for c in list_checkpoints(tmp_path / "checkpoints")] == [2, 5]
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2, 3, 4, 5, 5]


def test_the_last_step_is_evaluated_once_when_eval_every_divides_the_run(tmp_path):
    cfg = config(tmp_path, "trainer.eval_every=2", "trainer.total_steps=4")
    rt = fake_runtime(cfg)
    calls = []

    def evaluate(final):
        calls.append(final)
        return {"val/accuracy": float(len(calls))}

    loop.run_program(rt, step_fn(), evaluate, finish=lambda: None)
    rows = [(r["step"], r["val/accuracy"]) for r in read_metrics(str(tmp_path)) if "val/accuracy" in r]
    assert calls == [False, False, True]  # before training, at step 2, and the final one (not also at step 4)
    assert rows == [(2, 2.0), (4, 3.0)] and [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2, 3, 4, 4]
