"""The split placement's generation: rollout workers of their own, weights over the collective
backend, and (``placement.max_staleness`` K > 0) rollouts sampled ahead of the trainer (docs/async.md).

Policy versions count updates: version v is the policy after v training steps. Step s trains
version s-1 into s, then sends version s to the rollout workers. The rollout of step s may be
sampled by any version >= s-1-K, so with K > 0 the driver submits the prompts of steps s+1 ..
s+K while step s trains: the rollout workers keep generating, and take each new version
between two engine steps (partial rollouts, ``flowrl.engines.inflight``). Each submission
names the oldest version it may use (``min_version``), so no token is ever more than K versions
older than the policy it trains; K = 0 submits each step's prompts only after the previous
step's weights were sent, the synchronous algorithm. Prompts and sampling seeds follow the
step (not the time of submission), so K changes when a batch is sampled, never what it asks.

The buffer is the queue of submitted steps (at most K+1). The data loader's checkpoint state
is the position before the oldest step not yet trained on (``AheadLoader``), so a resumed run
samples those prompts again, with the checkpoint's policy.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np
import ray
import torch
from omegaconf import DictConfig

from flowrl.batch import Batch
from flowrl.controller import WorkerGroup
from flowrl.controller.errors import WorkerError
from flowrl.controller.future import DataFuture
from flowrl.keys import Keys

Metrics = dict[str, float]


class RolloutWaitTimeout(RuntimeError):
    """The trainer waited longer than ``placement.sync_timeout_s`` for a rollout batch."""


def step_seeds(seed: int, step: int, call: int, n_prompts: int) -> torch.Tensor:
    """One sampling seed per prompt of rollout call ``call`` of ``step`` (``Runtime.rollout_seeds``).  -> [B]"""
    seeds = np.random.SeedSequence([int(seed), step, call]).generate_state(n_prompts, dtype=np.uint32)
    return torch.from_numpy(seeds.astype(np.int64))


class AheadLoader:
    """The training data loader, drawn ahead by the rollout queue; its checkpoint state is the
    position before the oldest batch the trainer has not taken yet."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.dataset = loader.dataset
        self._states: deque[dict[str, Any]] = deque()  # state before each drawn, untaken batch

    def draw(self) -> Batch | None:
        self._states.append(self.loader.state_dict())
        return self.loader.next_batch()

    def taken(self) -> None:
        self._states.popleft()

    def next_batch(self) -> Batch | None:
        return self.loader.next_batch()

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return dict(self._states[0]) if self._states else self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._states.clear()
        self.loader.load_state_dict(state)


class SplitRollout:
    """Generation on the rollout group for a trainer on the actor group (module docstring)."""

    def __init__(self, cfg: DictConfig, actor: WorkerGroup, rollout: WorkerGroup, loader: AheadLoader) -> None:
        self.cfg, self.actor, self.rollout, self.loader = cfg, actor, rollout, loader
        self.max_staleness = int(cfg.placement.max_staleness)
        self.timeout_s = float(cfg.placement.sync_timeout_s)
        self.version = 0  # the trainer's policy version: updates so far
        self.ahead: deque[tuple[int, DataFuture]] = deque()  # (step, its submitted rollout)
        self._next_step = 1  # the next step whose prompts are not submitted yet
        self._waited_s = 0.0
        address, manifest = next(a for a in actor.open_weight_sync(rollout.world_size) if a is not None)
        joining = rollout.connect_weight_sync(address, manifest)
        actor.connect_weight_sync()
        joining.get()

    # ---- weights --------------------------------------------------------------------------
    def send_weights(self, version: int) -> Metrics:
        """Send the trainer's current weights as policy ``version`` (all rollout workers receive)."""
        receiving = self.rollout.receive_weights(version)
        try:
            sent = self.actor.send_weights()
        except WorkerError:
            receiving.get()  # a rollout worker that died or failed is the cause: its own error names it
            raise
        self._wait(receiving, f"the rollout workers' receive of policy version {version}")
        receiving.get()
        self.version = version
        seconds = max(m["seconds"] for m in sent)
        gb = sum(m["bytes"] for m in sent) / 1e9
        return {"perf/weight_sync_s": seconds, "perf/weight_sync_gb_per_s": gb / max(seconds, 1e-9)}

    def begin(self, step: int) -> None:
        """Before the first step of a run or a resume: a resumed trainer's weights go to the rollout
        workers (version ``step - 1``) and the queue starts at ``step``."""
        if self._next_step == 1 and step > 1:
            self._next_step = step
        if step - 1 > self.version:
            self.send_weights(step - 1)

    # ---- rollouts -------------------------------------------------------------------------
    def generate(self, prompts: Batch, n: int, temperature: float | None = None) -> Batch:
        """A rollout now, with the trainer's newest policy (evaluation, extra rollouts of a step)."""
        return self.rollout.generate(prompts, n=n, temperature=temperature, min_version=self.version)

    def step_batch(self, step: int, n: int, prepare: Any) -> Batch:
        """Step ``step``'s rollout: submit the prompts of steps up to ``step + K`` (``prepare``
        adds group ids and seeds to a step's prompts), then wait for this step's."""
        last = min(step + self.max_staleness, int(self.cfg.trainer.total_steps))
        while self._next_step <= last:
            b = self._next_step
            prompts = self.loader.draw()
            if prompts is None:
                raise RuntimeError("the training data is exhausted; raise the sampler's num_epochs")
            min_version = max(0, b - 1 - self.max_staleness)
            self.ahead.append((b, self.rollout.submit_generate(prepare(prompts, b), n=n, min_version=min_version)))
            self._next_step += 1
        b, future = self.ahead.popleft()
        assert b == step, f"rollout queue out of order: step {b} queued, step {step} asked"
        start = time.monotonic()
        self._wait(future, f"the rollout of step {step}")
        batch = future.get()
        self._waited_s = time.monotonic() - start
        self.loader.taken()
        return batch

    def buffer_depth(self) -> int:
        """Submitted rollouts already finished and waiting for the trainer."""
        return sum(f.done() for _, f in self.ahead)

    def _wait(self, future: DataFuture, what: str) -> None:
        refs = list(future.refs.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s, fetch_local=False)
        if len(ready) < len(refs):
            stuck = sorted(r for r, ref in future.refs.items() if ref not in ready)
            raise RolloutWaitTimeout(
                f"waited {self.timeout_s:g} s (placement.sync_timeout_s) for {what}: rollout workers {stuck} "
                "did not answer (stuck or gone); stopping"
            )

    # ---- metrics ---------------------------------------------------------------------------
    def step_metrics(self, step: int, batch: Batch, step_s: float) -> Metrics:
        """Staleness of the step's tokens, the queue, and both sides' idle time."""
        metrics: Metrics = {"async/buffer_depth": float(self.buffer_depth()),
                            "async/trainer_wait_s": self._waited_s,
                            "async/trainer_idle_frac": self._waited_s / max(step_s, 1e-9)}  # fmt: skip
        if Keys.TOKEN_VERSIONS in batch:
            metrics |= staleness_metrics(batch[Keys.TOKEN_VERSIONS], batch[Keys.RESPONSE_MASK], step - 1, self.max_staleness)
        stats = self.rollout.stats()
        busy, wall = sum(s["busy_s"] for s in stats), sum(s["wall_s"] for s in stats)
        metrics |= {
            "async/rollout_idle_frac": 1.0 - busy / max(wall, 1e-9),
            "async/rollout_wait_s": max(s["waiting_s"] for s in stats),
            "async/swaps": sum(s["swaps"] for s in stats),
            "async/paused_samples": sum(s["paused_samples"] for s in stats),
        }
        return metrics


def staleness_metrics(versions: torch.Tensor, mask: torch.Tensor, trained: int, bound: int) -> Metrics:
    """How many versions each sampled token is behind the policy ``trained`` at this step: max, mean,
    the fraction of sequences with any token from an older policy, and a histogram (``async/staleness_k``:
    fraction of tokens k versions behind, k = 0..bound).  versions, mask: [B, R]"""
    valid = mask.bool() & (versions >= 0)
    lag = (trained - versions)[valid]  # [T]
    if lag.numel() == 0:
        return {}
    out = {
        "async/staleness_max": float(lag.max()),
        "async/staleness_mean": float(lag.float().mean()),
        "async/mixed_version_seq_frac": float(
            ((versions.masked_fill(~valid, -(2**62)).amax(-1) != versions.masked_fill(~valid, 2**62).amin(-1))
             & valid.any(-1)).float().mean()
        ),
    }
    for k in range(bound + 1):
        out[f"async/staleness_{k}"] = float((lag == k).float().mean())
    return out
