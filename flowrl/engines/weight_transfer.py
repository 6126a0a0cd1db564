"""Weights from the trainer to rollout engines on other devices, over the collective backend.

With the split placement (``placement.rollout_workers``) the rollout engines are not in the
trainer's processes, so the in-place sync of the hybrid worker (``flowrl.engines.sync``) does
not apply. Instead the trainer's rank 0 and every rollout worker form one small process group
of their own (gloo on CPU, NCCL on GPU), apart from the trainer's FSDP world and from vLLM's,
rendezvousing on a ``TCPStore`` that rank 0 hosts:

    group rank 0       the trainer's rank 0: the sender
    group ranks 1..R   the rollout workers: receivers

A sync is a broadcast of the weights in buckets: every trainer rank drains the training
engine's full-tensor stream (FSDP2 all-gathers each parameter), rank 0 packs the tensors of
each bucket into one flat buffer and broadcasts it; each receiver unpacks the buffer into
(name, tensor) pairs for the rollout engine's in-place loader. Both sides cut the buckets from
the same ``manifest`` (names, shapes, in stream order) and dtype, so no metadata moves with
the weights. Peak extra memory on either side is one bucket.

A broadcast that does not complete within ``timeout_s`` raises on the side that waits (a
trainer that died mid-sync, a rollout worker that is gone), so nothing hangs.
"""

from __future__ import annotations

import datetime
import math
import socket
import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist

Manifest = list[tuple[str, tuple[int, ...]]]  # (Hugging Face name, full shape) in stream order


class SyncAddress(NamedTuple):
    host: str
    port: int
    world_size: int  # 1 sender + the rollout workers


def plan_buckets(manifest: Manifest, element_size: int, bucket_bytes: int) -> list[list[int]]:
    """Indices of ``manifest`` grouped into consecutive buckets of about ``bucket_bytes``
    (a bucket closes once it reaches the size; a tensor larger than that is a bucket alone)."""
    buckets: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(manifest):
        if size >= bucket_bytes and buckets[-1]:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += math.prod(shape) * element_size
    return [b for b in buckets if b]


def _group(store: dist.Store, rank: int, world: int, timeout_s: float, device: torch.device) -> dist.ProcessGroup:
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, world, dist.ProcessGroupNCCL.Options())  # type: ignore[attr-defined]
    return dist.ProcessGroupGloo(store, rank, world, timeout)


class _Endpoint:
    def __init__(self, manifest: Manifest, dtype: torch.dtype, bucket_bytes: int, device: torch.device) -> None:
        self.manifest, self.dtype, self.device = manifest, dtype, device
        element = torch.empty((), dtype=dtype).element_size()
        self.buckets = plan_buckets(manifest, element, bucket_bytes)
        self.group: dist.ProcessGroup | None = None

    def _broadcast(self, flat: torch.Tensor) -> None:
        assert self.group is not None, "connect() first"
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([flat], opts).wait()

    def _numel(self, bucket: list[int]) -> int:
        return sum(math.prod(self.manifest[i][1]) for i in bucket)

    def close(self) -> None:
        self.group = None


class WeightSender(_Endpoint):
    """The trainer's rank 0 end: hosts the rendezvous and broadcasts each bucket."""

    def __init__(
        self, manifest: Manifest, dtype: torch.dtype, bucket_bytes: int, world_size: int, device: torch.device,
        host: str | None = None,
    ) -> None:  # fmt: skip
        """``host``: the address the receivers reach this process at (default: this host name's)."""
        super().__init__(manifest, dtype, bucket_bytes, device)
        host = host or socket.gethostbyname(socket.gethostname())
        self.store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False)
        self.address = SyncAddress(host, int(self.store.port), world_size)

    def connect(self, timeout_s: float) -> None:
        """Join the receivers (blocks until they all call ``WeightReceiver.connect``)."""
        self.group = _group(self.store, 0, self.address.world_size, timeout_s, self.device)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
        """Broadcast the stream (its names and shapes must follow the manifest); seconds and bytes."""
        start, moved = time.perf_counter(), 0
        stream = iter(named_tensors)
        for bucket in self.buckets:
            flat = torch.empty(self._numel(bucket), dtype=self.dtype, device=self.device)
            offset = 0
            for i in bucket:
                name, tensor = next(stream)
                want, shape = self.manifest[i]
                if name != want or tuple(tensor.shape) != shape:
                    raise ValueError(f"weight sync: the stream gave {name} {tuple(tensor.shape)}, the manifest "
                                     f"has {want} {shape} at position {i}")  # fmt: skip
                flat[offset : offset + tensor.numel()] = tensor.reshape(-1).to(self.device, self.dtype)
                offset += tensor.numel()
            self._broadcast(flat)
            moved += flat.numel() * flat.element_size()
        if next(stream, None) is not None:
            raise ValueError(f"weight sync: the stream has more tensors than the manifest's {len(self.manifest)}")
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "bytes": float(moved)}


class WeightReceiver(_Endpoint):
    """A rollout worker's end: receives the buckets into (name, tensor) pairs."""

    def __init__(self, manifest: Manifest, dtype: torch.dtype, bucket_bytes: int, device: torch.device) -> None:
        super().__init__(manifest, dtype, bucket_bytes, device)

    def connect(self, address: SyncAddress, group_rank: int, timeout_s: float) -> None:
        store = dist.TCPStore(address.host, address.port, address.world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
        self.group = _group(store, group_rank, address.world_size, timeout_s, self.device)

    def receive(self) -> list[tuple[str, torch.Tensor]]:
        """One whole sync: every weight of the manifest (held in memory until loaded)."""
        return list(self.stream())

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in self.buckets:
            flat = torch.empty(self._numel(bucket), dtype=self.dtype, device=self.device)
            self._broadcast(flat)
            offset = 0
            for i in bucket:
                name, shape = self.manifest[i]
                n = math.prod(shape)
                yield name, flat[offset : offset + n].view(shape)
                offset += n
