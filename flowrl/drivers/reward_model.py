"""Reward-model training on preference pairs (Stiennon et al. 2020; Ouyang et al. 2022).

A causal-LM backbone with a scalar head scores prompt + response at its last token; each
step minimizes the Bradley–Terry loss -log sigma(r(x, y_c) - r(x, y_r)) averaged over the
step's pairs (``flowrl.algos.preference``). The chosen and the rejected sequence of a
pair go through the same forward pass (one micro-batch), and the loss is normalized by
the number of pairs over all ranks, so the gradient does not depend on the DP size or
the micro-batch split. The result is a Hugging Face ``*ForSequenceClassification`` folder
that ``flowrl.workers.reward_model.RewardModel`` loads as ``reward_model.path``.

Deviations from the papers: one pair per prompt per row (InstructGPT batches all
K-choose-2 comparisons of a prompt together); no reward normalization after training.

    metrics = train_reward_model("MODEL", ["pairs_train.parquet"], ["pairs_test.parquet"], "out/rm",
                                 steps=200, batch_size=16, lr=1e-3)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from transformers import AutoTokenizer

from flowrl.algos.preference import bradley_terry_loss, pair_accuracy
from flowrl.batch import Batch
from flowrl.controller import WorkerGroup
from flowrl.data import DataLoader, PreferenceDataset, SequenceDataConfig
from flowrl.engines.fsdp import FSDPEngineConfig
from flowrl.engines.optim import OptimizerConfig
from flowrl.keys import Keys
from flowrl.trainer.loop import LoopSettings, program_config, run_program
from flowrl.trainer.placement import connect, place_one_role, shutdown_groups
from flowrl.trainer.tracking import Tracker, mean_metrics
from flowrl.workers.reward_model import RewardModelTrainer

Metrics = dict[str, float]


@dataclass  # not frozen: OmegaConf 2.3 makes a frozen dataclass a read-only node that recipes cannot set
class RewardModelTrainConfig:
    """One reward-model training run; every default lives here."""

    model_path: str  # a Hugging Face causal LM (or sequence-classifier) folder to start from
    train_files: list[str]  # preference rows: prompt (messages), chosen, rejected
    out_dir: str  # the trained reward model (HF folder) and its metrics.jsonl
    val_files: list[str] = field(default_factory=list)  # held-out pairs for the pair accuracy
    steps: int = 100  # optimizer steps
    batch_size: int = 16  # pairs per step, over all ranks
    micro_batch_size: int = 8  # pairs per forward/backward on one rank (2x sequences)
    num_workers: int = 1  # FSDP2 ranks (one per GPU with use_gpu)
    use_gpu: bool = False
    ray_address: str | None = None  # None: start a local Ray cluster; "auto" or "ip:port": join one (docs/scaling.md)
    nnodes: int = 1  # machines the workers span: num_workers / nnodes on each
    cpus_per_worker: float = 1.0  # CPUs reserved per worker (per GPU with use_gpu)
    seed: int = 0  # data order and the head's initialization
    max_length: int = 1024  # prompt + response + EOS; longer pairs are dropped
    dtype: str = "float32"  # FSDP2 compute dtype; master weights stay fp32
    eval_every: int = 0  # held-out accuracy every N steps; 0: before and after training only
    loggers: tuple[str, ...] = ("console", "jsonl")
    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5))
    loop: LoopSettings = field(default_factory=LoopSettings)  # checkpoints, resume, NaN guard (the RL loop's)

    def __post_init__(self) -> None:
        where = "RewardModelTrainConfig"
        if self.steps < 1 or self.num_workers < 1:
            raise ValueError(f"{where}: steps={self.steps} and num_workers={self.num_workers} must be >= 1")
        if self.loop.save_every < -1 or self.loop.keep_last < 1 or self.loop.max_bad_steps < 0:
            raise ValueError(
                f"{where}: save_every={self.loop.save_every} must be >= -1, keep_last={self.loop.keep_last} >= 1 "
                f"and max_bad_steps={self.loop.max_bad_steps} >= 0"
            )
        if self.nnodes < 1 or self.num_workers % self.nnodes:
            raise ValueError(f"{where}: num_workers={self.num_workers} is not divisible by nnodes={self.nnodes}")
        if not self.train_files:
            raise ValueError(f"{where}: train_files is empty; name at least one preference parquet/JSONL file")
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"{where}: batch_size={self.batch_size} is not divisible by num_workers={self.num_workers}"
            )
        per_rank = self.batch_size // self.num_workers
        if per_rank % self.micro_batch_size:
            raise ValueError(
                f"{where}: batch_size / num_workers = {per_rank} is not divisible by "
                f"micro_batch_size={self.micro_batch_size}"
            )

    def engine_config(self) -> FSDPEngineConfig:
        return FSDPEngineConfig(
            model_path=self.model_path,
            value_head=True,
            head_bias=False,
            device="cuda" if self.use_gpu else "cpu",
            param_dtype=self.dtype,
            seed=self.seed,
            optim=self.optim,
        )


def train_reward_model(
    model_path: str,
    train_files: list[str],
    val_files: list[str],
    out_dir: str,
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 1e-5,
    num_workers: int = 1,
    seed: int = 0,
    **options: object,
) -> Metrics:
    """Train and save a reward model; returns the final train metrics and the held-out pair
    accuracy before (``val/accuracy_before``) and after (``val/accuracy``) training.

    ``options`` set the other fields of :class:`RewardModelTrainConfig` (``micro_batch_size``,
    ``max_length``, ``use_gpu``, ...); AdamW runs at a constant ``lr``. For full control
    of the optimizer build the config and call :func:`run`.
    """
    cfg = RewardModelTrainConfig(
        model_path=model_path,
        train_files=list(train_files),
        val_files=list(val_files),
        out_dir=out_dir,
        steps=steps,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        optim=OptimizerConfig(lr=lr),
        **options,  # type: ignore[arg-type]
    )
    return run(cfg)


class _Run:
    """The pieces of one run: the trainer group, the pair loader, the tracker (a ``loop.Program``)."""

    def __init__(self, rm: RewardModelTrainConfig) -> None:
        loop = replace(rm.loop, eval_every=rm.eval_every)
        self.cfg = program_config("reward_model", rm.model_path, rm.num_workers, rm.seed, rm.steps, rm.out_dir, loop)
        tokenizer = AutoTokenizer.from_pretrained(rm.model_path)
        data_cfg = SequenceDataConfig(max_length=rm.max_length)
        train = PreferenceDataset(rm.train_files, tokenizer, data_cfg)
        self.val = PreferenceDataset(rm.val_files, tokenizer, data_cfg) if rm.val_files else None
        self.train_data = DataLoader(train, rm.batch_size, seed=rm.seed)
        connect(rm.ray_address, rm.num_workers if rm.use_gpu else None)
        self.tracker = Tracker(rm.out_dir, rm.loggers, asdict(rm), total_steps=rm.steps, quiet=rm.loop.quiet)
        self.actor: Any = None
        self.critic = None
        self.last: Metrics = {}  # the last step's training metrics

    def begin_step(self, step: int) -> None:
        pass

    def shutdown(self) -> None:
        self.tracker.close()
        if self.actor is not None:
            shutdown_groups({"actor": self.actor})


def run(cfg: RewardModelTrainConfig) -> Metrics:
    """Train in the loop RL uses (``flowrl.trainer.loop.run_program``): a Ray group of
    ``num_workers`` FSDP2 ranks, checkpoints with ``loop.save_every``, ``loop.resume=auto``,
    the NaN/Inf guard and a graceful Ctrl-C/SIGTERM. Returns the held-out metrics before
    (``*_before``) and after training and the last step's training metrics."""
    run_ = _Run(cfg)
    try:
        run_.actor = place_one_role(RewardModelTrainer, cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker, cfg.nnodes)
        run_.actor.init_model(cfg.engine_config(), cfg.micro_batch_size)
    except BaseException:
        run_.shutdown()
        raise

    def train_step(r: _Run) -> Metrics:
        r.last = mean_metrics(r.actor.update(_next(r.train_data)))
        return r.last

    result = run_program(
        run_, train_step, lambda final: evaluate(run_.actor, run_.val), lambda: run_.actor.save_hf(os.path.abspath(cfg.out_dir))
    )
    return {**result, **run_.last}


def _next(loader: DataLoader) -> Batch:
    batch = loader.next_batch()
    if batch is None:  # the loader has no epoch limit; None would be a bug there
        raise RuntimeError("reward-model training: the pair loader returned no batch")
    return batch


def evaluate(group: WorkerGroup, val: PreferenceDataset | None, chunk: int = 256) -> Metrics:
    """Held-out pair accuracy (chosen scored strictly higher), Bradley–Terry loss and margin."""
    if val is None:
        return {}
    starts = range(0, len(val), chunk)
    scored = [group.compute_pair_scores(val.collate(range(s, min(len(val), s + chunk)))) for s in starts]
    chosen = torch.cat([b[Keys.CHOSEN_SCORES] for b in scored])  # [N]
    rejected = torch.cat([b[Keys.REJECTED_SCORES] for b in scored])  # [N]
    loss, _ = bradley_terry_loss(chosen, rejected)  # [N]
    return {
        "val/accuracy": pair_accuracy(chosen, rejected),
        "val/loss": float(loss.mean()),
        "val/margin": float((chosen - rejected).mean()),
    }
