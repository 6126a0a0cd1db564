import time

import pytest
import torch

from flowrl.tracking import Timer, Tracker, mean_metrics, read_metrics


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
