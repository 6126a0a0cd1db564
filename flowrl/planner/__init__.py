"""Execution-plan search: a cost and memory model of a run's step, calibrated on this machine,
and the layout (placement, FSDP size, micro-batches, checkpointing, offload, vLLM's share) with
the smallest predicted step time that fits in memory (docs/planner.md).
"""

from flowrl.planner.layout import Layout
from flowrl.planner.search import NoPlanFits, Plan, PlanResult, plan, write_plan
from flowrl.planner.shape import ModelShape

__all__ = ["Layout", "ModelShape", "NoPlanFits", "Plan", "PlanResult", "plan", "write_plan"]
