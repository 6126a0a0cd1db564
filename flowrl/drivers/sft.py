"""Supervised fine-tuning (SFT): next-token cross-entropy on the response tokens.

    L(theta) = - (1 / N) sum_{i, t : m_it = 1} log pi_theta(x_it | x_i,<t)

over the N target tokens (each response and its EOS, ``LOSS_MASK``) of a global batch,
as in the SFT stage of InstructGPT (Ouyang et al. 2022, arXiv:2203.02155). It warms a
policy up before RL: a tiny model learns the arithmetic task's answer format in a few
dozen steps, so that RL then gets non-zero rewards.

Deviations from common SFT trainers:
- The loss is the token mean over the whole global batch, not the mean of per-rank or
  per-micro-batch means, so the gradient is the same for any number of ranks.
- No sequence packing: sequences are right-padded within each global batch.

Outputs in ``out_dir``: ``metrics.jsonl`` (per step ``train/loss``, ``train/lr``,
``train/grad_norm``, ``perf/tokens_per_s``; ``val/loss`` and ``val/exact_match`` before
and after training and every ``eval_every`` steps), ``samples.jsonl`` (greedy answers
to validation prompts at the end) and ``model/``, a Hugging Face folder that
transformers and vLLM load (plus ``checkpoint/`` with ``save_checkpoint``).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import AutoTokenizer

from flowrl.data import DataLoader
from flowrl.data.sft import SequenceDataConfig, SFTDataset
from flowrl.engines.fsdp import DTYPES, FSDPEngineConfig
from flowrl.engines.optim import OptimizerConfig
from flowrl.keys import Keys
from flowrl.trainer.loop import LoopSettings, program_config, run_program
from flowrl.trainer.placement import connect, place_one_role, shutdown_groups
from flowrl.trainer.tracking import Tracker
from flowrl.workers.sft import SFTWorker

Metrics = dict[str, float]


@dataclass  # not frozen: OmegaConf 2.3 makes a frozen dataclass a read-only node that recipes cannot set
class SFTConfig:
    """One SFT run; every default lives here (the CLI and ``train_sft`` only override)."""

    model_path: str  # a Hugging Face folder: the model to fine-tune and its tokenizer
    train_files: list[str]  # SFT rows (prompt + response, or messages), parquet or JSONL
    val_files: list[str] = field(default_factory=list)  # held-out rows: loss and greedy answers
    out_dir: str = "runs/sft"  # metrics.jsonl, samples.jsonl, model/ (and checkpoint/)
    steps: int = 100  # optimizer steps
    batch_size: int = 16  # sequences per step, over all ranks
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    lr: float = 1e-5  # AdamW peak learning rate
    lr_schedule: str = "constant"  # constant | cosine (decays over all steps)
    warmup_steps: int = 0  # linear warmup to lr over this many steps
    min_lr_ratio: float = 0.0  # cosine: the final lr as a fraction of lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # max global gradient L2 norm; <= 0: no clipping
    num_workers: int = 1  # data-parallel ranks (one per GPU with use_gpu)
    use_gpu: bool = False  # CUDA + NCCL; else CPU + gloo
    ray_address: str | None = None  # None: start a local Ray cluster; "auto" or "ip:port": join one (docs/scaling.md)
    nnodes: int = 1  # machines the workers span: num_workers / nnodes on each
    cpus_per_worker: float = 1.0  # CPUs reserved per worker (per GPU with use_gpu)
    dtype: str = "float32"  # compute dtype (master weights stay fp32)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    seed: int = 0  # data order and initialization
    max_length: int = 1024  # prompt + response + EOS, in tokens
    overlong: str = "filter"  # filter | truncate_right | error
    shuffle: bool = True  # a new row order every epoch
    eval_every: int = 0  # 0: only before and after training
    val_max_samples: int = -1  # held-out rows for the loss; -1: all
    greedy_samples: int = 16  # held-out prompts answered greedily per evaluation; 0: none
    max_new_tokens: int = 32  # greedy answers' length limit
    save_checkpoint: bool = False  # also write OUT_DIR/checkpoint at the end (torch.distributed.checkpoint; flowrl export)
    save_every: int = -1  # resumable checkpoints in OUT_DIR/checkpoints every N steps and at the last; 0: last only; -1: none
    keep_last: int = 2  # complete checkpoints kept under OUT_DIR/checkpoints
    resume: str = "disable"  # disable | auto (continue from the newest checkpoint in OUT_DIR) | a checkpoint folder
    save_on_interrupt: bool = True  # Ctrl-C / SIGTERM: finish the step, save a checkpoint, stop
    max_bad_steps: int = 3  # stop after this many steps in a row with a NaN/Inf loss; 0: never
    loggers: list[str] = field(default_factory=lambda: ["console", "jsonl"])  # + tensorboard, wandb
    quiet: bool = False  # no console lines or progress bar (metrics.jsonl is still written)

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"sft: {msg}")

        check(
            os.path.isfile(os.path.join(self.model_path, "config.json")),
            f"model_path={self.model_path!r} is not a Hugging Face model folder (no config.json)",
        )
        check(bool(self.train_files), "train_files is empty: name at least one parquet/JSONL file")
        for key in ("steps", "batch_size", "micro_batch_size", "num_workers", "max_new_tokens", "keep_last"):
            check(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")
        check(self.save_every >= -1, f"save_every={self.save_every} must be >= 0 (or -1: no checkpoints)")
        check(self.max_bad_steps >= 0, f"max_bad_steps={self.max_bad_steps} must be >= 0 (0: never stop)")
        check(bool(self.resume), "resume is empty: use disable, auto or a checkpoint folder")
        check(self.dtype in DTYPES, f"dtype={self.dtype!r}: choose one of {list(DTYPES)}")
        check(
            self.nnodes >= 1 and self.num_workers % self.nnodes == 0,
            f"num_workers={self.num_workers} is not divisible by nnodes={self.nnodes}",
        )
        check(self.cpus_per_worker > 0, f"cpus_per_worker={self.cpus_per_worker} must be > 0")
        check(
            self.batch_size % self.num_workers == 0,
            f"batch_size={self.batch_size} is not divisible by num_workers={self.num_workers}",
        )
        try:
            self.engine_config()
            self.data_config()
        except ValueError as e:  # their messages say optim.KEY / data.KEY; here the keys are flat
            raise ValueError(f"sft: {re.sub(r'^(optim|data)[.]', '', str(e))}") from None

    def program_config(self) -> Any:
        """The loop's view of this run (``flowrl.trainer.loop.program_config``)."""
        loop = LoopSettings(
            save_every=self.save_every, keep_last=self.keep_last, resume=self.resume,
            save_on_interrupt=self.save_on_interrupt, max_bad_steps=self.max_bad_steps,
            eval_every=self.eval_every, quiet=self.quiet,
        )  # fmt: skip
        return program_config("sft", self.model_path, self.num_workers, self.seed, self.steps, self.out_dir, loop)

    def data_config(self) -> SequenceDataConfig:
        return SequenceDataConfig(self.max_length, self.overlong)

    def engine_config(self) -> FSDPEngineConfig:
        optim = OptimizerConfig(
            lr=self.lr,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            lr_schedule=self.lr_schedule,
            warmup_steps=self.warmup_steps,
            total_steps=self.steps,
            min_lr_ratio=self.min_lr_ratio,
        )
        return FSDPEngineConfig(
            model_path=self.model_path,
            device="cuda" if self.use_gpu else "cpu",
            param_dtype=self.dtype,
            gradient_checkpointing=self.gradient_checkpointing,
            seed=self.seed,
            optim=optim,
        )


class SFTDataError(ValueError):
    """The data cannot be used: a file is missing or malformed, or has too few rows."""


class _Run:
    """The pieces of one run: the worker group, the data, the tracker (a ``loop.Program``)."""

    def __init__(self, sft: SFTConfig) -> None:
        self.sft = sft
        self.cfg = sft.program_config()  # what the loop and the checkpointer read
        self.tokenizer = AutoTokenizer.from_pretrained(sft.model_path)
        data_cfg = sft.data_config()
        try:  # before any worker starts
            train = SFTDataset(sft.train_files, self.tokenizer, data_cfg)
            self.train_data = DataLoader(train, sft.batch_size, sft.seed, sft.shuffle)
            self.val = SFTDataset(sft.val_files, self.tokenizer, data_cfg) if sft.val_files else None
        except (FileNotFoundError, ValueError) as e:
            raise SFTDataError(str(e)) from e
        connect(sft.ray_address, sft.num_workers if sft.use_gpu else None)
        self.actor: Any = place_one_role(SFTWorker, sft.num_workers, sft.use_gpu, sft.cpus_per_worker, sft.nnodes)
        self.critic = None
        self.tracker = Tracker(sft.out_dir, sft.loggers, asdict(sft), total_steps=sft.steps, quiet=sft.quiet)

    def begin_step(self, step: int) -> None:
        pass

    def shutdown(self) -> None:
        self.tracker.close()
        shutdown_groups({"actor": self.actor})


def train_sft(config: SFTConfig | None = None, **fields: Any) -> Metrics:
    """Fine-tune ``model_path`` on ``train_files``; returns the held-out metrics before and after.

    ``train_sft(SFTConfig(...))`` or ``train_sft(model_path=..., train_files=[...], steps=...)``.
    Runs in the loop RL uses (``flowrl.trainer.loop.run_program``): checkpoints with
    ``save_every``, ``resume=auto``, the NaN/Inf guard and a graceful Ctrl-C/SIGTERM.
    """
    cfg = config if config is not None else SFTConfig(**fields)
    os.makedirs(cfg.out_dir, exist_ok=True)
    run = _Run(cfg)
    try:
        run.actor.init_model(cfg.engine_config(), cfg.micro_batch_size)
    except BaseException:
        run.shutdown()
        raise

    def finish() -> None:
        run.actor.save_hf(os.path.join(cfg.out_dir, "model"))
        if cfg.save_checkpoint:
            run.actor.save(os.path.join(cfg.out_dir, "checkpoint"))

    samples = os.path.join(cfg.out_dir, "samples.jsonl")
    return run_program(run, train_step, lambda final: evaluate(run, samples if final else None), finish)


def train_step(run: _Run) -> Metrics:
    batch = run.train_data.next_batch()
    assert batch is not None  # the loader repeats epochs without end
    start = time.perf_counter()
    per_rank = run.actor.train_step(batch)
    seconds = time.perf_counter() - start
    metrics = {f"train/{k}": v for k, v in per_rank[0].items() if k != "nll"}  # rank-independent values
    metrics["train/tokens"] = float(batch[Keys.LOSS_MASK].sum())
    metrics["perf/tokens_per_s"] = float(batch[Keys.ATTENTION_MASK].sum()) / seconds
    metrics["timing/step"] = seconds
    return metrics


def evaluate(run: _Run, samples_path: str | None = None, chunk: int = 64) -> Metrics:
    """Held-out token-mean NLL (``val/loss``) and greedy exact match of the responses."""
    if run.val is None:
        return {}
    n = len(run.val) if run.sft.val_max_samples < 0 else min(len(run.val), run.sft.val_max_samples)
    nll, tokens = 0.0, 0.0
    for start in range(0, n, chunk):
        batch = run.val.collate(range(start, min(n, start + chunk)))
        logprobs = run.actor.compute_logprobs(batch)[Keys.LOGPROBS]  # [b, L]
        mask = batch[Keys.LOSS_MASK]  # [b, L]
        nll -= float((logprobs * mask).sum())
        tokens += float(mask.sum())
    metrics = {"val/loss": nll / max(tokens, 1.0)}
    if run.sft.greedy_samples > 0:
        metrics["val/exact_match"] = greedy_exact_match(run, min(n, run.sft.greedy_samples), samples_path)
    return metrics


def greedy_exact_match(run: _Run, n: int, samples_path: str | None) -> float:
    """Fraction of the first ``n`` held-out prompts whose greedy answer equals the reference."""
    assert run.val is not None
    indices = list(range(n))
    out = run.actor.generate_greedy(run.val.collate_prompts(indices), max_new_tokens=run.sft.max_new_tokens)
    tok = run.tokenizer
    rows = []
    for i, ids, mask in zip(indices, out[Keys.RESPONSE_IDS], out[Keys.RESPONSE_MASK]):
        item = run.val.items[i]
        answer = str(tok.decode(ids[: int(mask.sum())].tolist(), skip_special_tokens=True))
        reference = str(tok.decode(item.response_ids, skip_special_tokens=True))
        prompt = str(tok.decode(item.prompt_ids, skip_special_tokens=False))
        rows.append({"prompt": prompt, "response": answer, "reference": reference})
    if samples_path is not None:
        with open(samples_path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return sum(r["response"].strip() == r["reference"].strip() for r in rows) / max(len(rows), 1)
