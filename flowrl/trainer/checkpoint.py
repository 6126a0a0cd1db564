"""Training checkpoints: what is saved, how a save stays atomic, and how a run resumes.

Layout under ``RUN_DIR/checkpoints``::

    step_00000004/            one complete checkpoint (the name carries the step)
        actor/                model + optimizer shards, LR schedule, optimizer step (torch DCP)
        critic/               the same for the critic (PPO with GAE only)
        worker_rng/rank0.pt   torch / numpy / python (/ CUDA) RNG states of each worker process
        driver_rng.pt         the driver's RNG states
        driver.json           step, sampler position, KL controller, metrics offset, run metadata
    latest                    the name of the newest complete checkpoint (written last)

A save writes everything into ``step_<8-digit step>.tmp`` (e.g. ``step_00000004.tmp``)
first; ``driver.json`` is the last file written inside it, then the folder is renamed to
its final name and ``latest`` is replaced (write + ``os.replace``). A process killed at any moment therefore leaves either
a ``.tmp`` folder (ignored and removed by the next run) or a complete checkpoint; a
checkpoint folder without ``driver.json`` is never loaded. ``keep_last`` complete
checkpoints are kept; older ones are deleted after a new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from omegaconf import OmegaConf

from flowrl.engines.rng import capture_rng, read_rng, restore_rng

if TYPE_CHECKING:
    from flowrl.trainer.runtime import Runtime

CHECKPOINTS = "checkpoints"
LATEST = "latest"
DRIVER_STATE = "driver.json"
DRIVER_RNG = "driver_rng.pt"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the folder and what to do."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ---- layout --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointRef:
    path: str
    step: int


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint folder whose save finished (its ``driver.json`` is written last)."""
    return os.path.isfile(os.path.join(path, DRIVER_STATE))


def list_checkpoints(root: str | os.PathLike) -> list[CheckpointRef]:
    """Complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _NAME.match(name)
        path = os.path.join(root, name)
        if match and is_complete(path):
            found.append(CheckpointRef(path, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def find_latest(root: str | os.PathLike) -> CheckpointRef | None:
    """The checkpoint ``latest`` names if it is complete, else the newest complete one, else None."""
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        match = _NAME.match(name)
        if match and is_complete(os.path.join(root, name)):
            return CheckpointRef(os.path.join(os.fspath(root), name), int(match.group(1)))
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_checkpoint(path: str | os.PathLike) -> tuple[CheckpointRef, dict[str, Any]]:
    """A checkpoint folder given by the user (``trainer.resume=FOLDER``) and its driver state."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"trainer.resume={path}: no such folder; name a checkpoint folder or use 'auto'")
    if not is_complete(path):
        raise CheckpointError(
            f"trainer.resume={path}: not a complete checkpoint (no {DRIVER_STATE}; a save that was "
            f"interrupted leaves such a folder); name a folder under {CHECKPOINTS}/ or use 'auto'"
        )
    with open(os.path.join(path, DRIVER_STATE)) as f:
        state = json.load(f)
    return CheckpointRef(path, int(state["step"])), state


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial(root: str | os.PathLike) -> list[str]:
    """Delete what interrupted saves left (``*.tmp`` folders and files); returns their names."""
    if not os.path.isdir(root):
        return []
    removed = []
    for name in os.listdir(root):
        if name.endswith(".tmp"):
            path = os.path.join(root, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(name)
    return removed


def prune(root: str | os.PathLike, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints; returns the deleted paths."""
    old = list_checkpoints(root)[:-keep_last] if keep_last > 0 else []
    for ref in old:
        shutil.rmtree(ref.path)
    return [ref.path for ref in old]


# ---- the run's checkpoints -------------------------------------------------------------------
class Checkpointer:
    """Saves and restores a whole run through the runtime's worker groups.

    Worker state (model and optimizer shards, LR schedule, per-process RNG) is written by
    the workers themselves; driver state (step, sampler position, the ``state`` objects
    such as a KL controller, the driver's RNG, the length of ``metrics.jsonl``) by this
    object. ``save(step)`` is atomic (module docstring); ``resume()`` applies
    ``trainer.resume`` and returns the step to continue after (0 for a fresh run).
    """

    def __init__(self, rt: Runtime, state: Mapping[str, Stateful] | None = None) -> None:
        self.rt = rt
        self.trainer = rt.cfg.trainer
        self.root = os.path.join(self.trainer.run_dir, CHECKPOINTS)
        self.state = dict(state or {})
        self.last: CheckpointRef | None = None  # the newest checkpoint of THIS run (saved or resumed from)

    def _groups(self) -> dict[str, Any]:
        groups = {"actor": self.rt.actor, "critic": self.rt.critic}
        return {name: g for name, g in groups.items() if g is not None}

    def due(self, step: int) -> bool:
        """Whether step ``step`` ends with a save: every ``save_every`` steps and at the last step."""
        every = self.trainer.save_every
        return every >= 0 and (step == self.trainer.total_steps or (every > 0 and step % every == 0))

    def save(self, step: int) -> CheckpointRef:
        """Write the checkpoint of the state after ``step`` (atomic); prune to ``keep_last``."""
        final = os.path.join(self.root, step_name(step))
        if self.last is not None and self.last.path == final:
            return self.last  # resumed from this very step: the same state is already there
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, group in self._groups().items():
            group.save(os.path.join(tmp, name))
        self.rt.actor.save_rng_state(tmp)
        torch.save(capture_rng(), os.path.join(tmp, DRIVER_RNG))
        _write_atomic(os.path.join(tmp, DRIVER_STATE), json.dumps(self._driver_state(step), indent=1))
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)  # an earlier run's, or an incomplete one (never loaded)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        _write_atomic(os.path.join(self.root, LATEST), step_name(step) + "\n")
        prune(self.root, max(1, self.trainer.keep_last))
        self.last = CheckpointRef(final, step)
        return self.last

    def _driver_state(self, step: int) -> dict[str, Any]:
        metrics = os.path.join(self.trainer.run_dir, "metrics.jsonl")
        return {
            "format": FORMAT_VERSION,
            "step": step,
            "saved_at": time.time(),
            "sampler": self.rt.train_data.state_dict(),
            "state": {name: obj.state_dict() for name, obj in self.state.items()},
            "metrics_bytes": os.path.getsize(metrics) if os.path.isfile(metrics) else None,
            "meta": run_metadata(self.rt.cfg),
        }

    def resume(self) -> int:
        """Apply ``trainer.resume``: ``disable`` (0), ``auto`` (the newest complete checkpoint
        under this run's folder, or 0 when there is none) or a checkpoint folder."""
        remove_partial(self.root)
        mode = self.trainer.resume
        if mode == "disable":
            if find_latest(self.root) is not None:
                self._say(f"{self.root} holds checkpoints of an earlier run; this run replaces them as it saves "
                          "(trainer.resume=auto continues that run instead)")
            return 0
        if mode == "auto":
            ref = find_latest(self.root)
            if ref is None:
                self._say(f"trainer.resume=auto: no checkpoint under {self.root}; starting from step 0")
                return 0
            ref, state = read_checkpoint(ref.path)
        else:
            ref, state = read_checkpoint(mode)
        check_compatible(state, self.rt.cfg, ref.path, set(self._groups()))
        self._load(ref, state)
        self._say(f"resumed from {ref.path} (step {ref.step})")
        return ref.step

    def _load(self, ref: CheckpointRef, state: dict[str, Any]) -> None:
        for name, group in self._groups().items():
            group.load(os.path.join(ref.path, name))
        self.rt.actor.load_rng_state(ref.path)
        restore_rng(read_rng(os.path.join(ref.path, DRIVER_RNG)))
        self.rt.train_data.load_state_dict(state["sampler"])
        for name, obj in self.state.items():
            obj.load_state_dict(state["state"][name])
        self._truncate_metrics(ref, state.get("metrics_bytes"))
        self.last = ref

    def _truncate_metrics(self, ref: CheckpointRef, size: int | None) -> None:
        """Drop the metrics rows written after the checkpoint, so no step appears twice."""
        metrics = os.path.join(self.trainer.run_dir, "metrics.jsonl")
        own = os.path.realpath(os.path.dirname(ref.path)) == os.path.realpath(self.root)
        if own and size is not None and os.path.isfile(metrics) and os.path.getsize(metrics) > size:
            os.truncate(metrics, size)

    def _say(self, line: str) -> None:
        if not self.trainer.quiet:
            print(f"flowrl: {line}", flush=True)


def run_metadata(cfg: Any) -> dict[str, Any]:
    """What a resume must agree with, and what helps a reader identify the run."""
    meta = {
        "algorithm": cfg.trainer.algorithm,
        "num_workers": int(cfg.trainer.num_workers),
        "critic": bool(cfg.critic.enable),
        "model": cfg.actor.model.path,
        "seed": int(cfg.trainer.seed),
        "total_steps": int(cfg.trainer.total_steps),
        "torch": torch.__version__,
    }
    lora = OmegaConf.select(cfg, "actor.lora")
    if lora is not None and lora.rank > 0:  # what an export needs to rebuild the adapters (flowrl export)
        targets = lora.target_modules
        meta["lora"] = {
            "rank": int(lora.rank),
            "alpha": float(lora.alpha),
            "target_modules": targets if isinstance(targets, str) else list(targets),
        }
        # checkpoints hold only the adapters: the frozen base is the model folder's cast to this dtype
        meta["lora_base_dtype"] = str(cfg.rollout.dtype)
    data = getattr(cfg, "data", None)  # RL runs: the data order a sampler state belongs to
    if data is not None:
        meta["train_files"] = [os.path.abspath(f) for f in data.train_files]
        meta["train_batch_size"] = int(data.train_batch_size)
        meta["shuffle"] = bool(data.shuffle)
    return meta


# meta key -> the config key a resume must keep (a later checkpoint format may add keys: missing ones pass)
RESUME_MUST_MATCH = {
    "algorithm": "trainer.algorithm", "num_workers": "trainer.num_workers", "critic": "critic.enable",
    "seed": "trainer.seed", "train_files": "data.train_files", "train_batch_size": "data.train_batch_size",
    "shuffle": "data.shuffle", "lora": "actor.lora", "lora_base_dtype": "rollout.dtype",
}  # fmt: skip


def check_compatible(state: Mapping[str, Any], cfg: Any, path: str, groups: set[str]) -> None:
    """Refuse a checkpoint written by a differently shaped run, naming the key to change."""
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')}, this flowrl reads {FORMAT_VERSION}")
    meta, now = state["meta"], run_metadata(cfg)
    for key, config_key in RESUME_MUST_MATCH.items():
        if key in meta and key in now and meta[key] != now[key]:
            raise CheckpointError(
                f"{path}: written with {config_key}={meta[key]}, this run has {config_key}={now[key]}; "
                f"resume with {config_key}={meta[key]} (or start a new run_dir)"
            )
    missing = sorted(g for g in groups if not os.path.isdir(os.path.join(path, g)))
    if missing:
        raise CheckpointError(f"{path}: no state for {', '.join(missing)}; the checkpoint is incomplete")
