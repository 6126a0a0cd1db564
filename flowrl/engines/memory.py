"""Peak GPU memory per stage of a step, for the processes that hold a GPU.

A hybrid worker's process holds the trainer, the reference and vLLM; each stage
(generate, old log-probs, reference, update, weight sync) peaks at a different point.
``STAGE_PEAKS`` is one recorder per process, shared by every role colocated in it:

    with STAGE_PEAKS("update"):
        engine.train_step(...)
    STAGE_PEAKS.pop()  # {"memory/update_peak_gib": 11.3, ...}, then cleared

Two figures per stage, in GiB:
- ``memory/<stage>_peak_gib``: PyTorch's peak allocated bytes during the stage (the
  trainer's parameters, gradients, optimizer state and activations). With vLLM in the
  same process this also counts the tensors of vLLM's memory pool while vLLM sleeps
  (their physical memory is released, the tensors stay allocated), so it overstates the
  physical peak by up to vLLM's share (``rollout.gpu_memory_utilization``); compare stages
  with it, and read the physical figure from ``_used_gib``;
- ``memory/<stage>_used_gib``: the device's memory in use (every allocator, vLLM's
  weights and KV cache included) at the points where the stage calls ``note_used``,
  or at its end.

``note`` adds the memory handover's figure (``memory/offloaded_gib``: the trainer state that
left the device while vLLM generated, ``actor.offload``). Repeated stages within one ``pop``
keep their maximum. On a process without CUDA
every call is a no-op and ``pop`` returns ``{}``, so the CPU path pays nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

GIB = float(2**30)


class StagePeaks:
    """Per-stage maxima of allocated and device-used GPU memory in one process."""

    def __init__(self) -> None:
        self._peaks: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return torch.cuda.is_available() and torch.cuda.is_initialized()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            self._keep_max(f"memory/{stage}_peak_gib", torch.cuda.max_memory_allocated() / GIB)
            self.note_used(stage)

    def note_used(self, stage: str) -> None:
        """Record the device's memory in use now (all allocators) under ``stage``."""
        if not self.enabled:
            return
        free, total = torch.cuda.mem_get_info()
        self._keep_max(f"memory/{stage}_used_gib", (total - free) / GIB)

    def note(self, name: str, gib: float) -> None:
        """Record a figure of the step's memory handover under ``memory/<name>`` (on CPU too: the
        bytes a trainer offloads are the same wherever it runs)."""
        self._keep_max(f"memory/{name}", gib)

    def _keep_max(self, key: str, value: float) -> None:
        self._peaks[key] = max(value, self._peaks.get(key, 0.0))

    def pop(self) -> dict[str, float]:
        """What was recorded since the last ``pop``, then cleared."""
        peaks, self._peaks = self._peaks, {}
        return peaks


def max_over_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise maximum of each rank's ``StagePeaks.pop()`` (the rank closest to running out)."""
    out: dict[str, float] = {}
    for peaks in per_rank:
        for key, value in peaks.items():
            out[key] = max(value, out.get(key, value))
    return out


STAGE_PEAKS = StagePeaks()
