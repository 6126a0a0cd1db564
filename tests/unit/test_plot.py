"""`flowrl plot`: which curves are drawn, the before-training point, the PNG, and the errors."""

from __future__ import annotations

import json
import math
import struct

import pytest

from flowrl.cli import main
from flowrl.plot import PlotError, draw_panel, moving_average, plot_run, series, y_limits


def _write(run_dir, rows) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


RL_ROWS = [
    {"step": 0, "val/accuracy_before": 0.125},
    {"step": 1, "reward/mean": 0.25, "actor/entropy": 1.5, "timing/step": 3.0},
    {"step": 2, "reward/mean": 0.5, "actor/entropy": 1.25, "timing/step": 2.0},
    {"step": 2, "val/accuracy": 0.375},
]


def test_series_puts_the_before_value_first():
    assert series(RL_ROWS, "val/accuracy") == ([0.0, 2.0], [0.125, 0.375])
    assert series(RL_ROWS, "reward/mean") == ([1.0, 2.0], [0.25, 0.5])
    assert series(RL_ROWS, "train/loss") == ([], [])


def test_moving_average_hand_computed():
    first, *rest = moving_average([1.0, 3.0, 5.0, 7.0], 2)
    assert math.isnan(first) and rest == [2.0, 4.0, 6.0]  # no half-window mean at the start
    *start, last = moving_average([2.0, float("nan"), 4.0, 6.0], 3)
    assert all(math.isnan(v) for v in start[:2]) and start[2] == 3.0 and last == 5.0


def test_a_flat_curve_is_drawn_flat_without_offset_notation():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [0.7 + 1e-9 * (i % 3) for i in range(30)]  # constant up to rounding noise
    fig, ax = plt.subplots()
    draw_panel(ax, "reward/mean", list(range(30)), values)
    fig.canvas.draw()
    low, high = ax.get_ylim()
    assert low < 0.7 - 0.03 and high > 0.7 + 0.03  # the noise does not fill the panel
    assert ax.yaxis.get_major_formatter().get_offset() == ""  # no "+7e-1" above the axis
    assert y_limits([1.0, 2.0]) is None  # a real trend keeps matplotlib's limits
    plt.close(fig)


def test_rl_run_png_with_absent_keys_skipped(tmp_path):
    _write(tmp_path / "run", RL_ROWS)
    out, skipped = plot_run(str(tmp_path / "run"))
    assert out == str(tmp_path / "run" / "metrics.png")
    drawn = {"reward/mean", "val/accuracy", "actor/entropy", "timing/step"}
    assert set(skipped) == {"val/exact_match", "actor/pg_loss", "train/loss", "val/loss", "critic/vf_loss",
                            "response_length/mean", "agent/turns_mean", "agent/tool_calls_mean",
                            "agent/tool_errors_mean"}  # fmt: skip
    assert not drawn & set(skipped)
    width, height = _png_size(out)
    assert width > height  # 4 panels: 3 columns, 2 rows


def test_sft_run_and_chosen_keys(tmp_path):
    _write(tmp_path / "sft", [{"step": 0, "val/loss_before": 3.0}, {"step": 1, "train/loss": 2.5}])
    out, skipped = plot_run(str(tmp_path / "sft"), str(tmp_path / "one.png"), ["train/loss", "reward/mean"])
    assert skipped == ["reward/mean"]
    width, height = _png_size(out)
    assert width < 2 * height  # one panel


def test_missing_dir_file_and_keys_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(PlotError, match="no such run directory"):
        plot_run(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlotError, match="metrics.jsonl: no such file"):
        plot_run(str(tmp_path / "empty"))
    _write(tmp_path / "other", [{"step": 1, "foo": 1.0}])
    with pytest.raises(PlotError, match="none of .* is logged; it has foo"):
        plot_run(str(tmp_path / "other"))
    assert main(["plot", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == f"flowrl plot: {tmp_path / 'nope'}: no such run directory\n"
