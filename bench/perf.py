"""Throughput arithmetic of an RL step: steady-state summaries, model FLOPs utilization.

Step MFU (model FLOPs utilization) counts, per token of the step (prompt + response),
the matrix FLOPs of a GRPO step with a reference model, with N parameters:

    2N (generation) + 2N (old log-probs) + 2N (reference) + 6N (update: forward + backward)
    = 12 N FLOPs per token,   MFU = 12 * N * tokens_per_s / peak_flops

(Kaplan et al., 2020, arXiv:2001.08361, Sec. 2.1, for 2N forward / 6N training).
Attention's own FLOPs and activation recomputation under gradient checkpointing are not
counted, so MFU understates the work done; the peak is the GPU's bf16 matmul rate
measured on the same machine (``matmul_peak_flops``), not the datasheet's.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from flowrl.planner.cost import FORWARD_FLOPS_PER_PARAM, TRAIN_FLOPS_PER_PARAM

# generation 2 + old log-probs 2 + reference 2 + update 6 (the planner's per-parameter counts)
FLOPS_PER_PARAM_TOKEN = 3 * FORWARD_FLOPS_PER_PARAM + TRAIN_FLOPS_PER_PARAM


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, a tied weight counted once."""
    return sum(p.numel() for p in model.parameters())


def count_folder_parameters(model_dir: str | os.PathLike) -> int:
    """Parameters of a Hugging Face model folder's architecture (a tied weight once), built on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return count_parameters(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)))


def step_mfu(
    n_params: int, tokens_per_s: float, peak_flops: float, flops_per_param_token: int = FLOPS_PER_PARAM_TOKEN
) -> float:
    """12 * N * tokens/s over the peak: the step's model FLOPs utilization (0..1).

    A step without a reference model does 10 N FLOPs per token: pass ``flops_per_param_token=10``.
    """
    if peak_flops <= 0:
        raise ValueError(
            f"step_mfu: peak_flops={peak_flops} must be positive (measure it with matmul_peak_flops)"
        )
    return flops_per_param_token * n_params * tokens_per_s / peak_flops


def steady_state(rows: Sequence[dict[str, float]], warmup: int) -> dict[str, float]:
    """Median of each key over ``rows[warmup:]`` (per-step metrics after the warm-up steps)."""
    kept = list(rows[warmup:])
    if not kept:
        raise ValueError(f"steady_state: {len(rows)} step(s) with warmup={warmup} leave none to summarize")
    keys = [k for k in kept[0] if all(k in r for r in kept)]
    return {k: float(statistics.median(float(r[k]) for r in kept)) for k in keys}


def workload(args: object) -> dict:
    """The workload keys every engine's summary shares (bench_grpo.py's, TRL's and verl's flags)."""
    keys = ("prompts", "n", "prompt_len", "response_len", "lengths")
    return {key: getattr(args, key) for key in keys}


def emit(result: dict, out: str = "") -> None:
    """A benchmark's summary: one JSON line on stdout, and indented in ``out`` when given."""
    print(json.dumps(result), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


def stage_shares(seconds: dict[str, float]) -> dict[str, float]:
    """Each stage's share of the stage sum (``{"generate": 12.0, "update": 4.0}`` -> 0.75, 0.25)."""
    total = sum(seconds.values())
    if total <= 0:
        raise ValueError(f"stage_shares: stage seconds {seconds} sum to {total}, expected a positive total")
    return {k: v / total for k, v in seconds.items()}


@torch.no_grad()
def matmul_peak_flops(
    device: str = "cuda",
    size: int = 8192,
    dtype: torch.dtype = torch.bfloat16,
    iters: int = 10,
    warmup: int = 3,
) -> float:
    """FLOP/s of ``size``-cubed matrix products on ``device``: the mean of ``iters`` timed runs."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)  # [n, n]
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)  # [n, n]
    for _ in range(warmup):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    seconds = (time.perf_counter() - start) / iters
    return 2.0 * size**3 / seconds


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
