"""Capture and restore a process's random number generators (torch, CUDA, numpy, python).

The state is stored as tensors and plain numbers only, so ``torch.load(..., weights_only=True)``
reads it back: loading a checkpoint never unpickles arbitrary objects (a tampered file is
refused instead of executing code).
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

WORKER_RNG = "worker_rng"


class RNGStateError(ValueError):
    """An RNG state file that is missing or not one this module wrote."""


def capture_rng() -> dict[str, Any]:
    """torch, numpy and python RNG states of this process (and CUDA's when present), as tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),  # [624]
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),  # [625]
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    torch.save(capture_rng(), path)


def read_rng(path: str | os.PathLike) -> dict[str, Any]:
    """The state ``save_rng`` wrote, loaded without unpickling code (``weights_only=True``)."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # torch's UnpicklingError for anything but tensors and plain values
        raise RNGStateError(
            f"{path}: not an RNG state written by flowrl (refused to unpickle it: {type(e).__name__}); "
            "the checkpoint was modified or comes from another program"
        ) from None


def load_rng(path: str | os.PathLike) -> None:
    if not os.path.isfile(path):
        raise RNGStateError(f"{path}: missing RNG state; the checkpoint was written by a different number of ranks")
    restore_rng(read_rng(path))


def worker_rng_path(checkpoint: str | os.PathLike, rank: int) -> str:
    return os.path.join(checkpoint, WORKER_RNG, f"rank{rank}.pt")
