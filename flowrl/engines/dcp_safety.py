"""Refuse a torch.distributed.checkpoint folder whose ``.metadata`` would run code when loaded.

``dcp.load`` reads the folder's ``.metadata`` with plain ``pickle.load``, so a tampered file
could execute anything. Before loading, flowrl unpickles it once with an allowlist: the
classes DCP's metadata is made of, ``torch.Size``, dtypes and layouts, paths. Anything else
is refused with the name of what the file asked for. (The tensor files themselves are read
by DCP with ``torch.load(weights_only=True)``.)
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch

METADATA = ".metadata"
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that asks to unpickle something a checkpoint never holds."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"{module}.{name}")


def check_dcp_metadata(folder: str | os.PathLike) -> None:
    """Raise ``UnsafeCheckpointError`` unless ``folder/.metadata`` holds only checkpoint metadata."""
    path = os.path.join(os.fspath(folder), METADATA)
    with open(path, "rb") as f:
        data = f.read()
    try:
        _MetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused to load it: it asks to unpickle {e}, which no checkpoint holds; the file was "
            "modified or comes from another program"
        ) from None
