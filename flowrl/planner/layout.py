"""Layouts: the settings of a run that change where and how it computes, not what it learns.

A ``Layout`` is one value of each knob the planner searches, and ``overrides()`` turns it
into ``key=value`` pairs that ``flowrl train`` takes. ``layout_errors`` holds the rules of
``flowrl/config.py`` and ``flowrl/trainer/preflight.py`` that these knobs touch, so every
layout ``candidate_layouts`` yields loads (``tests/unit/test_planner.py`` checks each one
against ``flowrl.config.validate``).

What a layout never changes: the algorithm, batch sizes (``data.train_batch_size``,
``actor.mini_batch_size``, ``rollout.n``), lengths, dtypes, the critic's and other roles'
settings; and ``max_staleness`` only up to the recipe's own value (asynchrony changes the
learning, so the recipe has to allow it).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from flowrl.planner.shape import ModelShape


@dataclass(frozen=True)
class Layout:
    num_workers: int  # trainer ranks (the FSDP size); with colocation also the rollout ranks
    rollout_workers: int = 0  # > 0: split placement (rollout on devices of its own)
    max_staleness: int = 0
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    micro_batch_size: int = 4  # rows per forward/backward (when max_tokens_per_micro_batch is 0)
    max_tokens_per_micro_batch: int = 0
    gradient_checkpointing: bool = False
    offload: bool = False

    @classmethod
    def of(cls, cfg: Any) -> Layout:
        """The layout a config asks for."""
        return cls(
            num_workers=cfg.trainer.num_workers,
            rollout_workers=cfg.placement.rollout_workers,
            max_staleness=cfg.placement.max_staleness,
            tensor_parallel_size=cfg.rollout.tensor_parallel_size,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            micro_batch_size=cfg.actor.micro_batch_size,
            max_tokens_per_micro_batch=cfg.actor.model.max_tokens_per_micro_batch,
            gradient_checkpointing=cfg.actor.model.gradient_checkpointing,
            offload=cfg.actor.offload,
        )

    @property
    def split(self) -> bool:
        return self.rollout_workers > 0

    def overrides(self) -> list[str]:
        """``key=value`` pairs that set this layout on a recipe."""
        return [
            f"trainer.num_workers={self.num_workers}",
            f"placement.rollout_workers={self.rollout_workers}",
            f"placement.max_staleness={self.max_staleness}",
            f"rollout.tensor_parallel_size={self.tensor_parallel_size}",
            f"rollout.gpu_memory_utilization={self.gpu_memory_utilization}",
            f"actor.micro_batch_size={self.micro_batch_size}",
            f"actor.model.max_tokens_per_micro_batch={self.max_tokens_per_micro_batch}",
            f"actor.model.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
            f"actor.offload={str(self.offload).lower()}",
        ]

    def short(self) -> str:
        """One line: ``W2 colocated mb8 ckpt`` and so on."""
        parts = [f"W{self.num_workers}"]
        parts.append(f"split R{self.rollout_workers} s{self.max_staleness}" if self.split else "colocated")
        if self.tensor_parallel_size > 1:
            parts.append(f"tp{self.tensor_parallel_size}")
        parts.append(f"tok{self.max_tokens_per_micro_batch}" if self.max_tokens_per_micro_batch else f"mb{self.micro_batch_size}")
        if self.gradient_checkpointing:
            parts.append("ckpt")
        if self.offload:
            parts.append("offload")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layout_errors(cfg: Any, layout: Layout, shape: ModelShape, devices: int, use_gpu: bool) -> list[str]:
    """Why ``layout`` cannot run ``cfg`` on ``devices`` devices (GPUs, or CPU cores); [] if it can."""
    a, p, r = cfg.actor, cfg.placement, cfg.rollout
    w, tp, errors = layout.num_workers, layout.tensor_parallel_size, []
    if a.mini_batch_size % w or (a.mini_batch_size // w) % layout.micro_batch_size:
        errors.append(f"actor.mini_batch_size={a.mini_batch_size} does not split into {w} ranks of micro-batches of {layout.micro_batch_size}")
    if w % p.nnodes or (w // p.nnodes) % tp:
        errors.append(f"rollout.tensor_parallel_size={tp} does not divide the workers per node")
    if tp > 1 and (shape.heads % tp or (shape.kv_heads % tp and tp % shape.kv_heads)):
        errors.append(f"rollout.tensor_parallel_size={tp} does not split {shape.heads} heads / {shape.kv_heads} kv heads")
    separate = len(p.separate) * p.separate_workers
    if w + layout.rollout_workers + separate > devices:
        errors.append(f"{w} + {layout.rollout_workers} + {separate} workers need more than the {devices} devices")
    if layout.max_staleness and not layout.split:
        errors.append("max_staleness > 0 needs rollout workers of their own")
    if layout.max_staleness > p.max_staleness:
        errors.append(f"max_staleness={layout.max_staleness} is more than the recipe allows ({p.max_staleness})")
    if layout.split and (r.backend != "vllm" or r.multi_turn.enable or layout.offload or tp != 1):
        errors.append("split placement needs vLLM, single-turn rollouts, no offload and tensor_parallel_size=1")
    if layout.split and layout.max_staleness and cfg.algorithm.dynamic_sampling.enable:
        errors.append("max_staleness > 0 with dynamic sampling")
    if layout.offload and a.backend != "fsdp":
        errors.append("actor.offload needs actor.backend=fsdp")
    if r.multi_turn.enable and tp != 1:
        errors.append("multi-turn rollouts need tensor_parallel_size=1")
    if not 0 < layout.gpu_memory_utilization <= 1:
        errors.append(f"rollout.gpu_memory_utilization={layout.gpu_memory_utilization} is not in (0, 1]")
    if layout.max_tokens_per_micro_batch < 0 or layout.micro_batch_size < 1:
        errors.append("micro-batch sizes must be positive")
    return errors


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(
    cfg: Any, shape: ModelShape, devices: int, use_gpu: bool, seq_tokens: int
) -> Iterator[Layout]:
    """Every layout of the knobs' values worth trying that ``layout_errors`` accepts.

    Workers: divisors of ``actor.mini_batch_size`` that fit the devices (one node); split
    placement with 1..(devices - W) rollout workers when the recipe's rollout allows it;
    micro-batches of 1, 2, 4, ... rows, or token budgets of 1, 2, 4, ... sequences of
    ``seq_tokens``; gradient checkpointing on/off; on GPU also tensor parallelism, offload
    and gpu_memory_utilization 0.3 .. 0.9 (on CPU vLLM's memory is VLLM_CPU_KVCACHE_SPACE,
    so it stays as the recipe sets it).
    """
    a, p = cfg.actor, cfg.placement
    base = Layout.of(cfg)
    nnodes_fixed = p.nnodes > 1
    workers = [base.num_workers] if nnodes_fixed else [w for w in divisors(a.mini_batch_size) if w <= devices]
    utils = (0.3, 0.5, 0.7, 0.9) if use_gpu else (base.gpu_memory_utilization,)
    for w in workers:
        per_rank = a.mini_batch_size // w
        micros = [m for m in divisors(per_rank) if m & (m - 1) == 0 or m == per_rank]
        budgets = [0] + [seq_tokens * k for k in (1, 2, 4, 8, 16) if k < per_rank]
        rollouts = [0] + list(range(1, devices - w + 1))
        tps = [t for t in divisors(w) if t <= 8] if use_gpu else [1]
        for rw, tp, m, tb, gc, off, u in itertools.product(
            rollouts, tps, micros, budgets, (False, True), (False, True) if use_gpu else (base.offload,), utils
        ):
            if tb and m != per_rank:  # with a token budget the rows per micro-batch do not matter
                continue
            for s in range(0, p.max_staleness + 1) if rw else [0]:
                layout = replace(
                    base, num_workers=w, rollout_workers=rw, max_staleness=s, tensor_parallel_size=tp,
                    gpu_memory_utilization=u, micro_batch_size=m, max_tokens_per_micro_batch=tb,
                    gradient_checkpointing=gc, offload=off and not rw,
                )  # fmt: skip
                if not layout_errors(cfg, layout, shape, devices, use_gpu):
                    yield layout
