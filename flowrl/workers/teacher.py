"""The distillation teacher: forward-only log-probs of the student's samples under another model.

Built like the reference policy (``flowrl/workers/reference.py``): a frozen FSDP2 engine
over any Hugging Face causal-LM folder (``teacher.path``), colocated with the actor by
default or on workers of its own (``placement.separate: [teacher]``). It scores the
student's token ids as they are, so the two must share a tokenizer (checked before any
worker starts, ``flowrl/trainer/preflight.py``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from flowrl.batch import Batch
from flowrl.controller import Dispatch, Worker, register
from flowrl.engines.memory import STAGE_PEAKS
from flowrl.keys import Keys
from flowrl.workers.engines import build_train_engine, worker_config


class Teacher(Worker):
    """Frozen teacher for on-policy distillation; usually colocated with ``ActorRollout``."""

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self, config: DictConfig | dict[str, Any]) -> None:
        self.cfg = worker_config(config)
        teacher = self.cfg.teacher
        if teacher is None or not teacher.path:
            raise ValueError("Teacher.init_model: the run config has no teacher.path")
        self.init_distributed()
        self.micro_batch_size = teacher.micro_batch_size or self.cfg.actor.micro_batch_size
        self.engine = build_train_engine(self.cfg, teacher, optim=None, value_head=False)

    @register(Dispatch.DP_COMPUTE)
    def compute_teacher_logprobs(self, batch: Batch) -> Batch:
        """log π_T of each sampled response token, at ``rollout.temperature`` like the student's.  -> [B, R]"""
        with STAGE_PEAKS("teacher"):
            logprobs, _ = self.engine.compute_logprobs(batch, self.cfg.rollout.temperature, self.micro_batch_size)
        return Batch({Keys.TEACHER_LOGPROBS: logprobs})
