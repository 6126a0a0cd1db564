import time

import pytest
import torch

from flowrl.trainer.tracking import Timer, Tracker, mean_metrics, read_metrics


def test_jsonl_rows_roundtrip_and_skip_torn_line(tmp_path):
    t = Tracker(str(tmp_path), ["jsonl"])
    t.log(0, {"reward/mean": torch.tensor([1.0, 3.0]), "lr": 1e-3})
    t.log(1, {"reward/mean": 0.5})
    t.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "rew')  # a kill in the middle of a write
    rows = read_metrics(str(tmp_path))
    assert rows == [{"step": 0, "reward/mean": 2.0, "lr": 1e-3}, {"step": 1, "reward/mean": 0.5}]


def test_mean_metrics_per_key():
    assert mean_metrics([{"a": 1.0, "b": 2.0}, {"a": 3.0}]) == {"a": 2.0, "b": 2.0}


def test_timer_accumulates():
    timer = Timer()
    with timer("gen"):
        time.sleep(0.01)
    with timer("gen"):
        time.sleep(0.01)
    m = timer.metrics()
    assert m["timing/gen"] >= 0.02 and m["timing/step"] == m["timing/gen"]


def test_unknown_sink_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown sink"):
        Tracker(str(tmp_path), ["jsonl", "mlflow"])


# ---- the progress sink --------------------------------------------------------------------
import io  # noqa: E402

from flowrl.trainer.tracking import Progress, clock_time, plain_meter  # noqa: E402


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _progress(total: int | None = 10, tty: bool = False) -> tuple[Progress, FakeClock, io.StringIO]:
    clock, stream = FakeClock(100.0), io.StringIO()
    return Progress(total, stream=stream, tty=tty, clock=clock), clock, stream


def test_eta_counts_from_the_step0_row_not_from_start_up():
    p, clock, _ = _progress(total=10)
    clock.now = 150.0  # 50 s of start-up and evaluation before training
    p.update({"step": 0, "val/accuracy_before": 0.25})
    assert p.eta(0, clock.now) is None  # no training step yet: unknown
    for step in (1, 2, 3):
        clock.now += 4.0
        p.update({"step": step, "reward/mean": 0.5})
    assert p.seconds_per_step(3, clock.now) == 4.0  # 12 s over 3 steps
    assert p.eta(3, clock.now) == 28.0  # 7 steps left x 4 s
    assert p.eta(10, clock.now + 28.0) == 0.0


def test_eta_without_a_step0_row_counts_from_creation():
    p, clock, _ = _progress(total=5)
    clock.now = 110.0
    p.update({"step": 1, "train/loss": 2.0})
    assert p.eta(1, clock.now) == 40.0  # 10 s per step, 4 left


def test_rendered_line_has_step_total_bar_times_and_main_metrics():
    p, clock, stream = _progress(total=10)
    clock.now = 150.0
    p.update({"step": 0, "val/accuracy_before": 0.25})
    clock.now = 162.0
    p.update({"step": 3, "reward/mean": 0.5, "actor/entropy": 1.25, "timing/step": 4.0})
    last = stream.getvalue().splitlines()[-1]
    assert "3/10" in last and "30%" in last and "#" in last
    assert "01:02<00:28" in last  # elapsed since creation, ETA from the 4 s/step rate
    assert "reward/mean=0.5" in last and "val/accuracy=0.25" in last and "actor/entropy=1.25" in last
    assert "timing/step" not in last  # not one of the main metrics


def test_plain_meter_without_tqdm_gives_the_same_numbers():
    line = plain_meter(3, 10, 62.0, 4.0, "reward/mean=0.5")
    assert line == "step 3/10 [######--------------]  30% 01:02<00:28 | reward/mean=0.5"
    assert plain_meter(0, 10, 5.0, None) == "step 0/10 [--------------------]   0% 00:05<?"
    assert clock_time(3725.0) == "1:02:05"


def test_repeated_step_updates_metrics_without_moving_back():
    p, clock, stream = _progress(total=4)
    for step in (1, 2, 3, 4):
        clock.now += 1.0
        p.update({"step": step, "reward/mean": float(step)})
    p.update({"step": 4, "val/accuracy": 0.75})  # the evaluation after training, logged at the last step
    last = stream.getvalue().splitlines()[-1]
    assert "4/4" in last and "100%" in last and "val/accuracy=0.75" in last


def test_tty_redraws_in_place_and_prints_console_lines_above(capsys):
    p, clock, stream = _progress(total=2, tty=True)
    clock.now += 1.0
    p.update({"step": 1, "reward/mean": 0.5}, line="step 1 | reward/mean=0.5")
    clock.now += 1.0
    p.update({"step": 2, "reward/mean": 0.75}, line="step 2 | reward/mean=0.75")
    p.close()
    out = stream.getvalue()
    assert out.count("\r\x1b[K") == 1  # the first bar is cleared before the second line
    assert "\n" not in out[:-1] and out.endswith("\n")  # one bar line, ended at close
    assert "2/2" in out.split("\r")[-1]
    assert capsys.readouterr().out == "step 1 | reward/mean=0.5\nstep 2 | reward/mean=0.75\n"


def test_tracker_with_total_steps_prints_one_line_per_step_off_a_tty(tmp_path, capsys):
    t = Tracker(str(tmp_path), ["console", "jsonl"], total_steps=3)
    t.log(1, {"reward/mean": 0.5})
    t.close()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "1/3" in out[0] and out[0].endswith("| reward/mean=0.5")


def test_quiet_prints_nothing_and_still_writes_jsonl(tmp_path, capsys):
    t = Tracker(str(tmp_path), ["console", "jsonl"], total_steps=3, quiet=True)
    t.log(1, {"reward/mean": 0.5})
    t.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert read_metrics(str(tmp_path)) == [{"step": 1, "reward/mean": 0.5}]
