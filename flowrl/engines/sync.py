"""Stream the trainer's weights into the colocated rollout engine, in place.

Protocol (one call per training step, on every rank at once):
1. wake the rollout engine's weights (GPU; a no-op on CPU);
2. pull buckets from the training engine's ``state_dict_stream`` (FSDP2: each DTensor
   all-gathered and cast to the rollout dtype) and feed their tensors, lazily, to ONE in-place reload,
   so at most one bucket of full tensors exists at a time;
3. wake the KV cache (GPU), so the engine is ready to generate.

With LoRA adapters on the trainer (``actor.lora``) and a rollout engine that serves adapters
(vLLM started with ``max_lora_rank``), only the adapters move: the engine keeps the base
model it loaded and samples with each new adapter (``sync_adapter``; ``actor.lora.sync=adapter``).
Otherwise the stream carries the base model's names with each adapter merged in
(``flowrl.engines.lora.merge_adapters``), which needs no LoRA support (docs/lora.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from flowrl.engines.base import RolloutEngine, TrainEngine

DEFAULT_BUCKET_BYTES = 512 * 2**20


def sync_weights(
    trainer: TrainEngine,
    rollout: RolloutEngine,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    wake_kv_cache: bool = True,
) -> dict[str, float]:
    """Copy the trainer's current weights into the rollout engine; returns seconds, bytes, gb_per_s.

    Pass ``wake_kv_cache=False`` to free trainer memory first (``trainer.offload()``) and
    then call ``rollout.wake_up(tags=["kv_cache"])`` yourself.
    """
    if serves_adapters(trainer, rollout):
        return sync_adapter(trainer, rollout, wake_kv_cache)
    dtype = rollout.dtype
    moved = [0]

    def flat_stream() -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in trainer.state_dict_stream(dtype, bucket_bytes):
            for name, tensor in bucket:
                moved[0] += tensor.numel() * tensor.element_size()
                yield name, tensor

    start = time.perf_counter()
    rollout.wake_up(tags=["weights"])
    rollout.load_weights(flat_stream())
    if wake_kv_cache:
        rollout.wake_up(tags=["kv_cache"])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": float(moved[0]), "gb_per_s": moved[0] / 1e9 / max(seconds, 1e-9)}


def serves_adapters(trainer: TrainEngine, rollout: RolloutEngine) -> bool:
    """Whether the trainer has LoRA adapters and the rollout engine takes them alone (an engine
    that can offers ``serves_adapters`` and ``load_adapter``; one without them gets merged weights)."""
    return bool(getattr(trainer, "lora_scales", None)) and bool(getattr(rollout, "serves_adapters", False))


def sync_adapter(trainer: Any, rollout: Any, wake_kv_cache: bool = True) -> dict[str, float]:
    """Send only the LoRA adapters (A and B, fp32) to a rollout engine that serves them on its base model."""
    lora = trainer.config.lora
    moved = [0]

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in trainer.adapter_stream():
            moved[0] += tensor.numel() * tensor.element_size()
            yield name, tensor

    start = time.perf_counter()
    rollout.wake_up(tags=["weights"])
    rollout.load_adapter(counted(), lora.rank, lora.alpha, trainer.lora_targets)
    if wake_kv_cache:
        rollout.wake_up(tags=["kv_cache"])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": float(moved[0]), "gb_per_s": moved[0] / 1e9 / max(seconds, 1e-9)}
