"""The engine seam: what a worker asks of a training engine and of a rollout engine.

Workers and the weight sync are written against these two interfaces, never against
the concrete classes. A backend is a class that implements one of them plus a builder
registered under a name; ``actor.backend`` / ``rollout.backend`` pick one. Built-in:

    training  fsdp   FSDP2 over a Hugging Face model (flowrl.engines.fsdp)
    rollout   vllm   vLLM in the worker's process (flowrl.engines.vllm_rollout)
              hf     Hugging Face ``generate`` (flowrl.engines.hf_rollout): any model
                     transformers loads, and a reference for debugging the vLLM path

A plugin module (``trainer.plugins``) adds one with::

    @register_rollout_engine("my_engine")
    def build(cfg: DictConfig, rank: int) -> RolloutEngine: ...

``cfg`` is the run config; the builder maps it onto its engine's own settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import torch

from flowrl.batch import Batch
from flowrl.plugins import load_attr

T = TypeVar("T")


@dataclass(frozen=True)
class Normalizer:
    """Global counts over all ranks and micro-batches of one optimizer step."""

    global_tokens: float  # sum of RESPONSE_MASK (LOSS_MASK in a sequence batch)
    global_seqs: float  # sequences with at least one valid token (pairs, in a preference batch)


Metrics = dict[str, torch.Tensor | float]
LossFn = Callable[[Batch, dict[str, torch.Tensor], Normalizer], tuple[torch.Tensor, Metrics]]


@runtime_checkable
class TrainEngine(Protocol):
    """A sharded model that computes log-probs / values, trains, streams its weights and saves."""

    def compute_logprobs(
        self, batch: Batch, temperature: float, micro_batch_size: int, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def compute_values(self, batch: Batch, micro_batch_size: int) -> torch.Tensor: ...

    def train_step(
        self,
        batch: Batch,
        loss_fn: LossFn,
        micro_batch_size: int,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> dict[str, float]: ...

    def state_dict_stream(self, dtype: torch.dtype, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full tensors under Hugging Face names, in buckets (collective: every rank drains it)."""
        ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...

    def save_hf(self, path: str) -> None: ...


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates from token ids and takes new weights in place."""

    dtype: torch.dtype  # the dtype weights are sent in
    tokenizer: Any  # decodes RESPONSE_IDS

    def generate(
        self,
        prompts: Batch,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_tokens: int = 256,
        ignore_eos: bool = False,
        seeds: list[int] | None = None,
    ) -> Batch:
        """``n`` samples per prompt (``aabb``): the prompt rows repeated plus RESPONSE_IDS,
        RESPONSE_MASK, ROLLOUT_LOGPROBS (the sampler's), TRUNCATED and FINISH_REASON, responses
        right-padded to ``max_tokens`` columns."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Every weight of the model, (Hugging Face name, full tensor), in one call."""
        ...

    def sleep(self, level: int = 1) -> None: ...

    def wake_up(self, tags: list[str] | None = None) -> None: ...


@dataclass(frozen=True)
class TurnRequest:
    """One turn of a multi-turn trajectory: continue ``token_ids`` (prompt, earlier turns and
    observations, exactly as sampled and inserted) for at most ``max_tokens`` tokens."""

    key: str  # the trajectory's id; comes back on its TurnOutput
    token_ids: list[int]
    max_tokens: int
    seed: int | None = None  # the turn's sampling seed (None: the engine's RNG)


@dataclass(frozen=True)
class TurnOutput:
    """A finished turn: the sampled tokens, each with the sampler's log-prob, and why it stopped."""

    key: str
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token under the distribution it was drawn from
    text: str  # the tokens decoded
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens or the model length)
    stop_reason: str | int | None  # the stop string matched, the stop token id, or None (EOS / length)


@dataclass(frozen=True)
class TurnSampling:
    """Sampling settings shared by every turn of a multi-turn rollout."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()  # strings that end a turn (kept in its text and tokens)


class TurnScheduler(Protocol):
    """The multi-turn rollout's side of ``RolloutEngine.run_turns`` (``flowrl.workers.agent_loop``)."""

    def ready(self) -> list[TurnRequest]:
        """Requests ready now (never blocks)."""
        ...

    def finished(self, outputs: list[TurnOutput]) -> None:
        """Finished turns, as soon as the engine has them."""
        ...

    def pending(self) -> bool:
        """Whether any trajectory is still waiting (on a tool or the environment)."""
        ...

    def wait(self) -> list[TurnRequest]:
        """Block until some request is ready (or nothing is pending); returns them."""
        ...


def run_device(cfg: Any) -> str:
    """``cuda`` or ``cpu``, as the run config's ``trainer.use_gpu`` says (checked against this process)."""
    if cfg.trainer.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("trainer.use_gpu=true but this worker sees no CUDA device")
    return "cuda" if cfg.trainer.use_gpu else "cpu"


class EngineRegistry(Generic[T]):
    """Backend name -> builder. Built-ins are ``"module:function"`` paths imported on first use,
    so naming a backend in a recipe does not import every engine's dependencies."""

    def __init__(self, kind: str, builtins: dict[str, str]) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T] | str] = dict(builtins)

    def register(self, name: str, builder: Callable[..., T]) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
        self._entries[name] = builder

    def remove(self, name: str) -> None:
        self._entries.pop(name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def builder(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = self._entries[name] = load_attr(entry, self.kind)
        return entry

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.builder(name)(*args, **kwargs)


TRAIN_ENGINES: EngineRegistry[TrainEngine] = EngineRegistry(
    "training engine", {"fsdp": "flowrl.engines.fsdp:from_run_config"}
)
ROLLOUT_ENGINES: EngineRegistry[RolloutEngine] = EngineRegistry(
    "rollout engine",
    {"vllm": "flowrl.engines.vllm_rollout:from_run_config", "hf": "flowrl.engines.hf_rollout:from_run_config"},
)


def register_train_engine(name: str) -> Callable[[Callable[..., TrainEngine]], Callable[..., TrainEngine]]:
    """``builder(cfg, model_cfg, optim_cfg, value_head, head_bias) -> TrainEngine`` under ``name``."""

    def deco(fn: Callable[..., TrainEngine]) -> Callable[..., TrainEngine]:
        TRAIN_ENGINES.register(name, fn)
        return fn

    return deco


def register_rollout_engine(name: str) -> Callable[[Callable[..., RolloutEngine]], Callable[..., RolloutEngine]]:
    """``builder(cfg, rank) -> RolloutEngine`` under ``name``."""

    def deco(fn: Callable[..., RolloutEngine]) -> Callable[..., RolloutEngine]:
        ROLLOUT_ENGINES.register(name, fn)
        return fn

    return deco
