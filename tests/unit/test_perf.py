"""Throughput arithmetic of the benchmarks: MFU, steady-state medians, stage shares, memory records."""

from __future__ import annotations

import pytest
import torch

from flowrl.engines.memory import StagePeaks, max_over_ranks
from flowrl.models.shapes import parameter_count
from bench.perf import count_folder_parameters, matmul_peak_flops, stage_shares, steady_state, step_mfu


def test_step_mfu_counts_12_flops_per_parameter_token() -> None:
    # 1.5e9 params * 12 * 10_000 tok/s = 1.8e14 FLOP/s; over 7.2e14 -> 0.25
    assert step_mfu(1_500_000_000, 10_000.0, 7.2e14) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="peak_flops"):
        step_mfu(1, 1.0, 0.0)


def test_steady_state_drops_warmup_and_takes_medians() -> None:
    rows = [{"t": 100.0, "x": 1.0}, {"t": 3.0, "x": 2.0}, {"t": 5.0, "x": 9.0}, {"t": 4.0, "x": 4.0}]
    assert steady_state(rows, warmup=1) == {"t": 4.0, "x": 4.0}
    assert steady_state(rows, warmup=2) == {"t": 4.5, "x": 6.5}
    with pytest.raises(ValueError, match="leave none"):
        steady_state(rows, warmup=4)


def test_steady_state_keeps_only_keys_every_step_has() -> None:
    rows = [{"a": 1.0, "b": 2.0}, {"a": 3.0}]
    assert steady_state(rows, warmup=0) == {"a": 2.0}


def test_stage_shares() -> None:
    assert stage_shares({"generate": 12.0, "update": 4.0}) == {"generate": 0.75, "update": 0.25}
    with pytest.raises(ValueError, match="positive"):
        stage_shares({"generate": 0.0})


def test_matmul_peak_flops_on_cpu_is_positive() -> None:
    assert matmul_peak_flops("cpu", size=64, dtype=torch.float32, iters=2, warmup=1) > 0


def test_qwen25_parameter_counts() -> None:
    # Qwen2.5 model cards: 0.49B and 1.54B parameters (tied embeddings counted once)
    assert parameter_count("qwen2.5-0.5b") == 494_032_768
    assert parameter_count("qwen2.5-1.5b") == 1_543_714_304
    with pytest.raises(ValueError, match="unknown model shape"):
        parameter_count("qwen2.5-3b")


def test_stage_peaks_without_cuda_record_nothing() -> None:
    peaks = StagePeaks()
    if peaks.enabled:
        pytest.skip("CUDA is initialized here")
    with peaks("update"):
        pass
    peaks.note_used("generate")
    assert peaks.pop() == {}


def test_stage_peaks_keep_the_maximum_and_clear_on_pop() -> None:
    peaks = StagePeaks()
    peaks._keep_max("memory/update_peak_gib", 3.0)
    peaks._keep_max("memory/update_peak_gib", 2.0)
    assert peaks.pop() == {"memory/update_peak_gib": 3.0}
    assert peaks.pop() == {}


def test_max_over_ranks() -> None:
    per_rank = [{"memory/a": 1.0, "memory/b": 5.0}, {"memory/a": 2.0}]
    assert max_over_ranks(per_rank) == {"memory/a": 2.0, "memory/b": 5.0}


def test_count_folder_parameters_matches_the_loaded_model(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from flowrl.models.tiny import make_tiny_model

    make_tiny_model(tmp_path, seed=0)
    loaded = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path).parameters())
    assert count_folder_parameters(tmp_path) == loaded > 0
