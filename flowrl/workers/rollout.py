"""A rollout worker of the split placement: a vLLM engine on devices of its own (docs/async.md).

With ``placement.rollout_workers`` the trainer (``ActorRollout`` without an engine) and the
rollout engines live in different processes. Each rollout worker holds the policy version
it has loaded; new weights arrive over the weight-sync group (``flowrl.engines.weight_transfer``)
in a call of their own (``receive_weights``), which runs while ``generate`` is under way (the
process serves several calls at once, ``flowrl.trainer.placement.rollout_concurrency``), and
wait in an inbox. ``generate`` takes them:

- before it starts, until it holds at least ``min_version`` (the staleness bound the driver
  asks for), waiting up to ``placement.sync_timeout_s``;
- between engine steps while it runs (asynchronous mode): unfinished samples are paused and
  continue under the new weights (``flowrl.engines.inflight``), every token tagged with its version.

Only the newest waiting version is loaded; an older one still in the inbox is dropped.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import torch
from omegaconf import DictConfig

from flowrl.batch import Batch
from flowrl.controller import Dispatch, Worker, register
from flowrl.engines.inflight import Weights, generate_versioned
from flowrl.engines.sequences import response_lengths
from flowrl.engines.vllm_rollout import DTYPES, VLLMRollout, VLLMRolloutConfig, engine_config
from flowrl.engines.weight_transfer import Manifest, SyncAddress, WeightReceiver
from flowrl.keys import Keys
from flowrl.workers.engines import worker_config

Metrics = dict[str, float]


class RolloutVersionTimeout(RuntimeError):
    """A rollout worker waited longer than ``placement.sync_timeout_s`` for the policy version it needs."""


def rollout_engine_config(cfg: DictConfig, rank: int) -> VLLMRolloutConfig:
    """The vLLM engine of rollout worker ``rank``: the actor's model, its own sampling seed."""
    return engine_config(cfg, rank, enable_sleep_mode=False)  # the engine has its devices to itself


class RolloutWorker(Worker):
    """Generates with the newest policy version it has received, within the driver's staleness bound."""

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self, config: DictConfig | dict[str, Any]) -> None:
        self.cfg: DictConfig = worker_config(config)
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        self.rollout = VLLMRollout(rollout_engine_config(self.cfg, self.rank))
        self.tokenizer = self.rollout.tokenizer
        self.version = 0  # the policy version loaded: 0 is the initial model
        self.inbox: queue.Queue[Weights] = queue.Queue()
        self.receiver: WeightReceiver | None = None
        self._lock = threading.Lock()  # one generate at a time
        self._busy_s = 0.0  # seconds spent generating (or loading weights) since the last stats call
        self._waiting_s = 0.0  # seconds generate waited for a policy version
        self._since = time.monotonic()
        self._swaps = self._paused = 0

    # ---- weights ----------------------------------------------------------------------
    @register(Dispatch.ONE_TO_ALL, blocking=False)
    def connect_weight_sync(self, address: SyncAddress, manifest: Manifest) -> None:
        """Join the trainer's weight-sync group as group rank ``1 + rank`` (blocks until all have joined)."""
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        r = self.cfg.rollout
        self.receiver = WeightReceiver(manifest, DTYPES[r.dtype], r.sync_bucket_mb * 2**20, device)
        self.receiver.connect(address, 1 + self.rank, self.cfg.placement.sync_timeout_s)

    @register(Dispatch.ONE_TO_ALL, blocking=False)
    def receive_weights(self, version: int) -> Metrics:
        """Receive policy ``version`` from the trainer (collective with its ``send_weights``) into the inbox."""
        assert self.receiver is not None, "connect_weight_sync first"
        start = time.perf_counter()
        weights = self.receiver.receive()
        self.inbox.put((version, weights))
        return {"seconds": time.perf_counter() - start}

    def _newest(self, block_until: int | None = None) -> Weights | None:
        """The newest waiting weights (older ones dropped); with ``block_until``, wait for that version."""
        newest: Weights | None = None
        deadline = time.monotonic() + self.cfg.placement.sync_timeout_s
        while True:
            try:
                while True:
                    newest = self.inbox.get_nowait()
            except queue.Empty:
                pass
            have = newest[0] if newest is not None else self.version
            if block_until is None or have >= block_until:
                return newest
            left = deadline - time.monotonic()
            if left <= 0:
                raise RolloutVersionTimeout(
                    f"rollout worker {self.rank} waited {self.cfg.placement.sync_timeout_s:g} s "
                    f"(placement.sync_timeout_s) for policy version {block_until} and has {have}: the trainer "
                    "sent no weights (stuck or gone)"
                )
            try:
                newest = self.inbox.get(timeout=min(left, 1.0))
            except queue.Empty:
                pass

    def _load(self, weights: Weights) -> None:
        version, named = weights
        self.rollout.load_weights(named)
        self.version = int(version)

    # ---- generation ---------------------------------------------------------------------
    def _generate(self, prompts: Batch, n: int, temperature: float | None, min_version: int) -> Batch:
        r = self.cfg.rollout
        with self._lock:
            waited = time.monotonic()
            first = self._newest(block_until=min_version)
            start = time.monotonic()
            self._waiting_s += start - waited
            if first is not None:
                self._load(first)
            sampling = {"temperature": r.temperature if temperature is None else temperature,
                        "top_p": r.top_p, "top_k": r.top_k, "ignore_eos": r.ignore_eos}  # fmt: skip
            seeds = prompts[Keys.SAMPLE_SEEDS].tolist() if Keys.SAMPLE_SEEDS in prompts else None
            in_flight = self.cfg.placement.max_staleness > 0  # synchronous: weights only between batches
            out, stats = generate_versioned(
                self.rollout, prompts, n, sampling, r.max_response_length, seeds, self.version,
                self._take_in_flight if in_flight else lambda: None,
            )  # fmt: skip
            self._swaps, self._paused = self._swaps + stats.swaps, self._paused + stats.paused_samples
            self._busy_s += time.monotonic() - start
        ids, lengths = out[Keys.RESPONSE_IDS], response_lengths(out[Keys.RESPONSE_MASK])
        out[Keys.RESPONSE_TEXT] = [
            self.tokenizer.decode(row[: int(k)].tolist(), skip_special_tokens=True) for row, k in zip(ids, lengths)
        ]
        return out

    def _take_in_flight(self) -> Weights | None:
        newest = self._newest()
        if newest is not None:
            self.version = int(newest[0])
        return newest

    @register(Dispatch.DP_COMPUTE)
    def generate(self, prompts: Batch, n: int = 1, temperature: float | None = None, min_version: int = 0) -> Batch:
        """``n`` responses per prompt with a policy of version ``min_version`` or newer (``TOKEN_VERSIONS``)."""
        return self._generate(prompts, n, temperature, min_version)

    @register(Dispatch.DP_COMPUTE, blocking=False)
    def submit_generate(self, prompts: Batch, n: int = 1, temperature: float | None = None, min_version: int = 0) -> Batch:
        """``generate`` as a future: the driver goes on while the rollout workers sample."""
        return self._generate(prompts, n, temperature, min_version)

    @register(Dispatch.ONE_TO_ALL)
    def stats(self) -> Metrics:
        """Since the last call: seconds generating and waiting for weights, wall seconds, swaps, paused samples."""
        now = time.monotonic()
        out = {"busy_s": self._busy_s, "waiting_s": self._waiting_s, "wall_s": now - self._since,
               "swaps": float(self._swaps), "paused_samples": float(self._paused), "version": float(self.version)}  # fmt: skip
        self._busy_s = self._waiting_s = 0.0
        self._swaps = self._paused = 0
        self._since = now
        return out
