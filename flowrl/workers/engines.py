"""Build the engines of a worker from the run config (the one place that maps one onto the other)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig
from flowrl.engines.optim import OptimizerConfig
from flowrl.engines.vllm_rollout import VLLMRollout, VLLMRolloutConfig, replica_info


def as_config(cfg: DictConfig | dict[str, Any]) -> DictConfig:
    """Workers receive the run config as a plain dict (cheap to pickle); read it back typed-ish."""
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)


def device_name(cfg: DictConfig) -> str:
    if cfg.trainer.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("trainer.use_gpu=true but this worker sees no CUDA device")
    return "cuda" if cfg.trainer.use_gpu else "cpu"


def build_fsdp_engine(
    cfg: DictConfig, model: DictConfig, optim: DictConfig | None, value_head: bool, head_bias: bool = True
) -> FSDPEngine:
    """An FSDP2 engine for the policy, the reference (``optim=None``), the critic or the
    reward model (``value_head`` without ``head_bias``)."""
    optim_cfg = OptimizerConfig()
    if optim is not None:
        fields = OmegaConf.to_container(optim)
        if fields["total_steps"] == 0:
            fields["total_steps"] = cfg.trainer.total_steps * _updates_per_step(cfg)
        optim_cfg = OptimizerConfig(**fields)
    return FSDPEngine(
        FSDPEngineConfig(
            model_path=model.path,
            value_head=value_head,
            head_bias=head_bias,
            device=device_name(cfg),
            param_dtype=model.dtype,
            gradient_checkpointing=model.gradient_checkpointing,
            trim_padding=model.trim_padding,
            gather_once_for_inference=model.gather_once_for_inference,
            seed=cfg.trainer.seed,
            optim=optim_cfg,
        )
    )


def _updates_per_step(cfg: DictConfig) -> int:
    rollout_size = cfg.data.train_batch_size * cfg.rollout.n
    return cfg.actor.epochs * max(1, rollout_size // cfg.actor.mini_batch_size)


def build_rollout(cfg: DictConfig, rank: int) -> VLLMRollout:
    """The colocated vLLM engine; each replica samples with its own seed.

    With ``rollout.tensor_parallel_size`` T the ranks of one replica (T consecutive ranks)
    share the seed: they must draw the same samples (``flowrl.engines.vllm_rollout``).
    """
    r = cfg.rollout
    replica = replica_info(rank, cfg.trainer.num_workers, r.tensor_parallel_size).replica
    return VLLMRollout(
        VLLMRolloutConfig(
            model_path=cfg.actor.model.path,
            dtype=r.dtype,
            max_model_len=cfg.data.prompts.max_prompt_length + r.max_response_length,
            gpu_memory_utilization=r.gpu_memory_utilization,
            enforce_eager=r.enforce_eager,
            seed=cfg.trainer.seed + replica,
            tensor_parallel_size=r.tensor_parallel_size,
        )
    )
