"""The one batch type of flowrl.

A ``Batch`` is a set of samples along one batch dimension. Tensors live in a
``tensordict.TensorDict`` (so device moves, slicing and concatenation are one
call); per-sample Python objects (strings, chat messages, dicts) live beside it
as numpy object arrays of the same length; ``meta`` is a small dict of
batch-level facts (temperature, step, metrics) that is never split.

Keys are constants in :class:`flowrl.keys.Keys`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from tensordict import TensorDict

Index = int | slice | Sequence[int] | torch.Tensor | np.ndarray


def _object_array(values: Iterable[Any]) -> np.ndarray:
    values = list(values)
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


class Batch:
    """Samples along one dimension: tensors, per-sample objects and batch-level meta."""

    __slots__ = ("tensors", "non_tensors", "meta")

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | TensorDict | None = None,
        non_tensors: Mapping[str, Sequence[Any] | np.ndarray] | None = None,
        meta: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
    ) -> None:
        tensors = _tensor_dict(tensors) if tensors is not None else {}
        objects = {k: _object_array(v) for k, v in (non_tensors or {}).items()}
        sizes = {k: int(v.shape[0]) for k, v in tensors.items()}
        sizes.update({k: len(v) for k, v in objects.items()})
        if batch_size is None:
            if not sizes:
                raise ValueError("Batch: pass batch_size for a batch with no fields")
            batch_size = next(iter(sizes.values()))
        bad = {k: n for k, n in sizes.items() if n != batch_size}
        if bad:
            raise ValueError(f"Batch: batch size is {batch_size} but these fields differ: {bad}")
        self.tensors = TensorDict(tensors, batch_size=[batch_size])
        self.non_tensors: dict[str, np.ndarray] = objects
        self.meta: dict[str, Any] = dict(meta or {})

    # ---- basic access ---------------------------------------------------------
    def __len__(self) -> int:
        return int(self.tensors.batch_size[0])

    def keys(self) -> list[str]:
        return self.tensor_keys() + list(self.non_tensors.keys())

    def tensor_keys(self) -> list[str]:
        return [str(k) for k in self.tensors.keys()]

    def tensor_items(self) -> list[tuple[str, torch.Tensor]]:
        return list(_tensor_dict(self.tensors).items())

    def __contains__(self, key: str) -> bool:
        return key in self.tensors.keys() or key in self.non_tensors

    def __getitem__(self, key: str | Index) -> Any:
        if isinstance(key, str):
            if key in self.non_tensors:
                return list(self.non_tensors[key])
            if key in self.tensors.keys():
                return self.tensors[key]
            raise KeyError(f"Batch has no key {key!r}; it has {sorted(self.keys())}")
        return self._take(key)

    def __setitem__(self, key: str, value: torch.Tensor | Sequence[Any]) -> None:
        if len(value) != len(self):
            raise ValueError(f"Batch[{key!r}]: {len(value)} values for a batch of {len(self)}")
        if isinstance(value, torch.Tensor):
            self.non_tensors.pop(key, None)
            self.tensors[key] = value
        else:
            if key in self.tensors.keys():
                del self.tensors[key]
            self.non_tensors[key] = _object_array(value)

    def pop(self, key: str) -> Any:
        value = self[key]
        if key in self.non_tensors:
            del self.non_tensors[key]
        else:
            del self.tensors[key]
        return value

    def _take(self, index: Index) -> Batch:
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        if isinstance(index, slice):
            np_index: Any = index
            t_index: Any = index
        else:
            np_index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
            if np_index.dtype == bool:
                np_index = np.nonzero(np_index)[0]
            t_index = torch.as_tensor(np_index, dtype=torch.long)
        tensors = self.tensors[t_index]
        non_tensors = {k: v[np_index] for k, v in self.non_tensors.items()}
        return Batch(tensors, non_tensors, self.meta, batch_size=int(tensors.batch_size[0]))

    def __repr__(self) -> str:
        fields = [f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in self.tensors.items()]
        fields += [f"{k}: object" for k in self.non_tensors]
        return f"Batch(len={len(self)}, " + ", ".join(fields) + f", meta={sorted(self.meta)})"

    # ---- structure ------------------------------------------------------------
    def select(self, *keys: str, meta: bool = True) -> Batch:
        missing = [k for k in keys if k not in self]
        if missing:
            raise KeyError(f"Batch.select: missing keys {missing}; it has {sorted(self.keys())}")
        tensors = {k: self.tensors[k] for k in keys if k in self.tensors.keys()}
        non_tensors = {k: self.non_tensors[k] for k in keys if k in self.non_tensors}
        return Batch(tensors, non_tensors, self.meta if meta else None, batch_size=len(self))

    def union(self, other: Batch) -> Batch:
        """All fields of both; a key present in both must hold equal values."""
        if len(self) != len(other):
            raise ValueError(f"Batch.union: sizes differ ({len(self)} vs {len(other)})")
        tensors = dict(self.tensor_items())
        for k, v in other.tensor_items():
            if k in tensors and not _same_tensor(tensors[k], v):
                raise ValueError(f"Batch.union: key {k!r} holds different tensors in both batches")
            tensors[k] = v
        objects = dict(self.non_tensors)
        for k, arr in other.non_tensors.items():
            if k in objects and list(objects[k]) != list(arr):
                raise ValueError(f"Batch.union: key {k!r} holds different values in both batches")
            objects[k] = arr
        for k, v in other.meta.items():
            if k in self.meta and not _same_value(self.meta[k], v):
                raise ValueError(f"Batch.union: meta {k!r} differs ({self.meta[k]!r} vs {v!r})")
        return Batch(tensors, objects, {**self.meta, **other.meta}, batch_size=len(self))

    __or__ = union

    def chunk(self, n: int) -> list[Batch]:
        """n equal parts, in order. The size must divide; pad first (``pad_to_multiple``)."""
        if n <= 0 or len(self) % n:
            raise ValueError(f"Batch.chunk: {len(self)} samples do not split into {n} equal parts")
        size = len(self) // n
        return [self[i * size : (i + 1) * size] for i in range(n)]

    def split(self, size: int) -> list[Batch]:
        """Consecutive parts of ``size`` samples (the last may be shorter)."""
        return [self[i : i + size] for i in range(0, len(self), size)]

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        if not batches:
            raise ValueError("Batch.concat: nothing to concatenate")
        keys = sorted(batches[0].keys())
        for i, b in enumerate(batches[1:], 1):
            if sorted(b.keys()) != keys:
                raise ValueError(f"Batch.concat: part {i} has keys {sorted(b.keys())}, part 0 has {keys}")
        tensors = cast(TensorDict, torch.cat([b.tensors for b in batches], dim=0))
        non_tensors = {
            k: np.concatenate([b.non_tensors[k] for b in batches]) for k in batches[0].non_tensors
        }
        return Batch(tensors, non_tensors, batches[0].meta, batch_size=int(tensors.batch_size[0]))

    def repeat(self, n: int, interleave: bool = True) -> Batch:
        """Each sample n times: ``aabb`` with interleave, ``abab`` without."""
        idx = torch.arange(len(self))
        idx = idx.repeat_interleave(n) if interleave else idx.repeat(n)
        return self._take(idx)

    def pad_to_multiple(self, k: int) -> tuple[Batch, int]:
        """Append copies of the first samples until len is a multiple of k; returns (batch, pad)."""
        pad = (-len(self)) % k
        if pad == 0:
            return self, 0
        if len(self) == 0:
            raise ValueError("Batch.pad_to_multiple: cannot pad an empty batch")
        idx = torch.cat([torch.arange(len(self)), torch.arange(pad) % len(self)])
        return self[idx], pad

    def unpad(self, pad: int) -> Batch:
        return self[: len(self) - pad] if pad else self

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.tensors.to(device), self.non_tensors, self.meta, batch_size=len(self))

    def clone(self) -> Batch:
        non_tensors = {k: v.copy() for k, v in self.non_tensors.items()}
        return Batch(self.tensors.clone(), non_tensors, dict(self.meta), batch_size=len(self))

    # ---- pickling across Ray ----------------------------------------------------
    def __reduce__(self) -> tuple[Any, ...]:
        # numpy arrays pickle their buffers out of band (pickle protocol 5, which Ray
        # uses), so a batch crosses the object store without a copy into the pickle.
        payload = {k: _to_numpy(v) for k, v in self.tensor_items()}
        return (_rebuild, (payload, self.non_tensors, self.meta, len(self)))


def _to_numpy(t: torch.Tensor) -> tuple[str, np.ndarray]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return "bfloat16", t.view(torch.int16).numpy()
    return "", t.numpy()


def _from_numpy(dtype: str, arr: np.ndarray) -> torch.Tensor:
    # Ray hands back read-only views of its object store: copy so callers may edit in place.
    t = torch.from_numpy(np.array(arr, copy=True))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _rebuild(
    payload: dict[str, tuple[str, np.ndarray]], non_tensors: dict[str, np.ndarray], meta: dict[str, Any], batch_size: int
) -> Batch:
    tensors = {k: _from_numpy(dtype, arr) for k, (dtype, arr) in payload.items()}
    return Batch(tensors, non_tensors, meta, batch_size=batch_size)


def _tensor_dict(tensors: Mapping[str, torch.Tensor] | TensorDict) -> dict[str, torch.Tensor]:
    return {str(k): cast(torch.Tensor, v) for k, v in tensors.items()}


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _same_tensor(a, b)
    try:
        return bool(a == b)
    except Exception:
        return a is b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
