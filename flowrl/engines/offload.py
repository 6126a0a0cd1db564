"""Memory handover: a training engine's state leaves the device while the rollout engine generates.

``HostCopy`` keeps the bytes of a set of tensors in host memory and releases their device
storage in place (``untyped_storage().resize_(0)``), then restores it the same way:

    copy = HostCopy()
    copy.offload(tensors)   # parameters' shards, optimizer state: the device memory is free
    ...                     # vLLM wakes its KV cache into that memory, generates, sleeps
    copy.onload()           # the same storages, the same bytes: bitwise what they were

Working on storages rather than moving modules keeps every Python object as it was: the
``nn.Parameter`` objects (which the optimizer's state is keyed by), FSDP2's sharded
DTensors and the views into its padded shard buffers. Each storage is copied once however
many tensors view it, byte for byte, so the restore is exact in any dtype. On GPU the host
buffers are pinned and reused across steps (pinning is slow; the shapes never change); on
CPU the same code runs with plain buffers, which is what the CPU tests exercise.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

GIB = float(2**30)


class HostCopy:
    """Host-memory copies of tensors' storages, with the device storages released between
    ``offload`` and ``onload``."""

    def __init__(self) -> None:
        self._storages: list[torch.UntypedStorage] = []
        self._host: list[torch.Tensor] = []  # uint8 [nbytes] per storage; kept for the next offload
        self.offloaded = False

    @property
    def nbytes(self) -> int:
        """Bytes held on the host for the offloaded storages."""
        return sum(h.numel() for h in self._host) if self.offloaded else 0

    @torch.no_grad()
    def offload(self, tensors: Iterable[torch.Tensor]) -> int:
        """Copy each distinct storage behind ``tensors`` to host memory and release it; returns bytes."""
        if self.offloaded:
            raise RuntimeError("HostCopy.offload: already offloaded; call onload first")
        storages, seen = [], set()
        for t in tensors:
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            storages.append(storage)
        if len(storages) != len(self._host) or any(s.nbytes() != h.numel() for s, h in zip(storages, self._host)):
            pin = torch.cuda.is_available() and any(s.device.type == "cuda" for s in storages)
            self._host = [torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=pin) for s in storages]
        for storage, host in zip(storages, self._host):
            host.copy_(_as_bytes(storage), non_blocking=True)
        _synchronize(storages)
        for storage in storages:
            storage.resize_(0)
        self._storages, self.offloaded = storages, True
        if any(s.device.type == "cuda" for s in storages):
            torch.cuda.empty_cache()  # hand the released blocks back to the driver (vLLM allocates there)
        return self.nbytes

    @torch.no_grad()
    def onload(self) -> None:
        """Reallocate each released storage and copy its bytes back."""
        if not self.offloaded:
            return
        for storage, host in zip(self._storages, self._host):
            storage.resize_(host.numel())
            _as_bytes(storage).copy_(host, non_blocking=True)
        _synchronize(self._storages)
        self._storages, self.offloaded = [], False


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole storage (shares its memory)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _synchronize(storages: list[torch.UntypedStorage]) -> None:
    if any(s.device.type == "cuda" for s in storages):
        torch.cuda.synchronize()
