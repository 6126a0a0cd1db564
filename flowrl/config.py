"""Run configuration: dataclasses hold every default; a recipe YAML overrides them; CLI
``key=value`` pairs override the recipe.

``load_config("recipes/grpo.yaml", ["trainer.total_steps=3"])`` returns a read-only
OmegaConf object typed by :class:`Config`. Unknown keys, wrong types and inconsistent
values fail here, with a message that names the recipe and the key.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowrl.algos.config import (
    AdvantageConfig,
    DynamicSamplingConfig,
    KLControllerConfig,
    OverlongConfig,
    PolicyLossConfig,
)
from flowrl.algos.importance import MISMATCH_MODES
from flowrl.algos.registry import ESTIMATORS, POLICY_LOSSES, check_estimator_inputs
from flowrl.data.dataset import PromptDataConfig
from flowrl.drivers.registry import DriverSpec, load_driver
from flowrl.engines.base import ROLLOUT_ENGINES, TRAIN_ENGINES
from flowrl.engines.lora import LoraConfig, lora_config_errors
from flowrl.engines.optim import OptimizerConfig
from flowrl.keys import Keys
from flowrl.plugins import PluginError, load_plugins
from flowrl.rewards.registry import RewardConfig


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the key and what to do."""


@dataclass
class ModelConfig:
    """The policy (or critic / reference) weights."""

    path: str = ""  # a Hugging Face model folder (config.json + weights + tokenizer)
    dtype: str = "float32"  # parameter dtype on the trainer: float32 | bfloat16
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    # skip the columns that are padding in every row of a micro-batch (fewer tokens per
    # forward when responses are short; log-probs then differ by float rounding, ~1e-7)
    trim_padding: bool = False
    # no-grad passes (old log-probs, reference, values) all-gather each layer once for all
    # their micro-batches instead of once per micro-batch; holds the whole model in `dtype`
    # on every rank while the pass runs. For FSDP across machines (docs/scaling.md)
    gather_once_for_inference: bool = False
    # pack each micro-batch's sequences into one row with per-sequence position ids (no padding
    # tokens; varlen flash attention on GPU, a block-diagonal mask otherwise) where that costs fewer
    # FLOPs than padded rows (always with flash attention; with a mask when lengths vary enough);
    # false: padded rows always
    packing: bool = True
    # micro-batches of consecutive responses within this many real tokens per rank (prompt +
    # response), split further so every rank runs as many forwards; 0: micro_batch_size rows
    max_tokens_per_micro_batch: int = 0
    # tokens per chunk of the LM head and log-softmax: [chunk, vocab] fp32 logits at a time (0: all)
    logits_chunk_size: int = 1024
    # keep this model's parameter shards (and, when it trains, its gradients and AdamW state) in
    # host memory for the whole run: FSDP2's CPUOffloadPolicy copies each layer to the device for its
    # forward and backward, and the optimizer steps on the CPU. Slower steps, for models whose training
    # state does not fit on the device (a 7B full-parameter update on one 80 GB GPU; docs/hybrid_engine.md)
    cpu_offload: bool = False


@dataclass
class ScoringModelConfig(ModelConfig):
    """A forward-only model of a role of its own: the reference policy, a reward model or a distillation teacher."""

    micro_batch_size: int = 0  # responses per forward on one rank; 0: actor.micro_batch_size


@dataclass
class MultiTurnConfig:
    """Multi-turn rollouts: the model and an environment take turns (docs/agents.md)."""

    enable: bool = False  # turns of the model and an environment instead of one response per prompt
    env: str = "tools"  # a registered environment (flowrl.envs) or "pkg.module:Class"
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the environment
    max_turns: int = 4  # model turns per trajectory; rollout.max_response_length bounds all its tokens
    step_timeout_s: float = 60.0  # one env.step (its tool calls included) at most; past it: truncated
    max_concurrent_steps: int = 16  # env.step calls running at once in each rollout worker (threads)


@dataclass
class RolloutConfig:
    """Generation with the colocated rollout engine (vLLM by default)."""

    backend: str = "vllm"  # the rollout engine: vllm | hf (flowrl.engines.base.ROLLOUT_ENGINES; plugins add more)
    n: int = 1  # responses sampled per prompt (the group size of GRPO/RLOO)
    temperature: float = 1.0  # sampling temperature of training rollouts (> 0)
    top_p: float = 1.0  # nucleus sampling; 1.0: off (keep it off to compare log-probs with the trainer)
    top_k: int = -1  # -1: no top-k
    max_response_length: int = 256  # tokens generated per response at most
    ignore_eos: bool = False  # benchmarks: always generate max_response_length tokens
    dtype: str = "float32"  # vLLM weights dtype: float32 on CPU, bfloat16 on GPU
    gpu_memory_utilization: float = 0.5  # GPU: fraction of device memory vLLM may take (weights + KV cache)
    enforce_eager: bool = True  # no CUDA graphs: faster start, slower decoding
    tensor_parallel_size: int = 1  # GPUs per vLLM replica; divides the workers per node
    sync_bucket_mb: int = 256  # weight-sync bucket; peak extra memory during a sync
    val_temperature: float = 0.0  # greedy evaluation
    # seed each prompt's sampling from (trainer.seed, step, index): a resumed run samples what an
    # uninterrupted one did; off: vLLM's one engine-wide RNG (resumes are then not bitwise)
    seed_per_prompt: bool = True
    multi_turn: MultiTurnConfig = field(default_factory=MultiTurnConfig)


@dataclass
class ActorConfig:
    """The policy's update (PPO-style clipped surrogate for every algorithm)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters (PEFT); rank 0: off
    backend: str = "fsdp"  # the training engine (flowrl.engines.base.TRAIN_ENGINES; plugins add more)
    mini_batch_size: int = 8  # responses per optimizer step, over all ranks
    micro_batch_size: int = 4  # responses per forward/backward on one rank
    epochs: int = 1  # passes over each rollout batch
    policy_loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    loss_agg_mode: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean
    entropy_coef: float = 0.0  # weight of the entropy bonus in the actor loss
    log_entropy: bool = True  # log actor/entropy from the old-log-prob pass (a softmax over the vocabulary)
    # one epoch of one mini-batch (and no in-reward KL): take the old log-probs, detached, from the
    # update's own forward instead of a separate pass (the same values; one forward fewer per step)
    fuse_old_logprobs: bool = True
    # memory handover: while vLLM generates, the trainer's parameters and optimizer state wait in host
    # memory (pinned) and its gradients are dropped, so the KV cache can take their device memory
    # (docs/hybrid_engine.md); restored bitwise before the next pass. Colocated placement, fsdp backend
    offload: bool = False
    use_kl_loss: bool = False  # KL to the reference as a loss term (GRPO style)
    kl_loss_coef: float = 0.001  # weight of the KL loss term (with use_kl_loss)
    kl_loss_type: str = "k3"  # k1 | k2 | k3 | abs


@dataclass
class CriticConfig:
    """The value model of PPO with GAE; unused by critic-free estimators."""

    enable: bool = False  # train a critic (needed by the gae estimator)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5))
    micro_batch_size: int = 4  # responses per forward/backward on one rank
    epochs: int = 1  # passes over each rollout batch
    cliprange_value: float = 0.5  # new values stay within this distance of the old ones (clipped value loss)
    loss_agg_mode: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean


@dataclass
class AlgorithmConfig:
    """The advantage estimator, the KL penalty in the reward (InstructGPT style), DAPO's sampling and shaping."""

    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    use_kl_in_reward: bool = False  # subtract beta * KL(policy || reference) per token from the reward
    kl_ctrl: KLControllerConfig = field(default_factory=KLControllerConfig)
    # DAPO: only groups whose scores vary, refilled with fresh prompts
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)  # DAPO: soft penalty for long responses


@dataclass
class DataConfig:
    """Prompts: parquet or JSONL rows with prompt / data_source / reward_model / extra_info."""

    train_files: list[str] = field(default_factory=list)  # parquet/JSONL files of training prompts
    val_files: list[str] = field(default_factory=list)  # held-out prompts: val/accuracy (greedy)
    train_batch_size: int = 8  # prompts per step
    prompts: PromptDataConfig = field(default_factory=PromptDataConfig)  # length limit, overlong policy
    shuffle: bool = True  # a new prompt order every epoch
    val_max_samples: int = -1  # -1: all


@dataclass
class TrainerConfig:
    """The run: size, placement, logging and checkpoints."""

    algorithm: str = "grpo"  # the driver: ppo | grpo | remax | rloo | reinforce_pp | distill, or a module path (my_pkg.my_algo)
    # modules imported by the driver process and every worker before anything is built: they
    # register estimators, policy losses and engines under names a recipe can then use
    plugins: list[str] = field(default_factory=list)
    total_steps: int = 10  # training steps (one rollout batch each)
    num_workers: int = 1  # hybrid actor-rollout ranks (one per GPU on GPU)
    use_gpu: bool = False  # CUDA + NCCL; else CPU + gloo
    seed: int = 0  # data order, initialization and sampling
    run_dir: str = "runs/flowrl"  # config.yaml, metrics.jsonl, checkpoints, policy
    save_every: int = 0  # checkpoint every N steps and at the last step; 0: only at the last; -1: never
    keep_last: int = 2  # complete checkpoints kept under run_dir/checkpoints (older ones deleted)
    eval_every: int = 0  # 0: only before and after training
    resume: str = "disable"  # disable | auto (newest checkpoint in run_dir, if any) | a checkpoint folder
    save_on_interrupt: bool = True  # Ctrl-C / SIGTERM: finish the step, save a checkpoint, stop
    max_bad_steps: int = 3  # stop after this many steps in a row with a NaN/Inf loss or gradient; 0: never
    max_reward_failure_steps: int = 3  # stop after this many steps in a row whose every reward call failed; 0: never
    # once one rank of a call returned, the others get this long; 0: no limit; null: 10 x the slowest
    # step so far, at least 300 s (1800 s until the first step has ended)
    hang_timeout_s: float | None = None
    stop_grace_s: float = 120.0  # after Ctrl-C / SIGTERM the step under way gets this long to end and save
    loggers: list[str] = field(default_factory=lambda: ["console", "jsonl"])  # + tensorboard, wandb
    quiet: bool = False  # no progress bar or console lines (metrics.jsonl and other sinks still written)
    # files: each worker process's stdout/stderr (vLLM, torch, Ray) goes to RUN_DIR/logs/worker_<rank>.log
    # and the console shows flowrl's own lines only; console: Ray forwards it all to the console
    worker_logs: str = "files"
    save_policy: bool = True  # the final policy as a Hugging Face folder in RUN_DIR/policy
    # auto: before any worker starts, pick the layout (workers, placement, micro-batches, checkpointing,
    # offload, vLLM's share) with the fastest predicted step that fits in memory, record it in
    # RUN_DIR/plan.json and log plan/predicted_<stage>_s each step (docs/planner.md); off: as written
    plan: str = "off"


@dataclass
class PlacementConfig:
    """Where the workers run: machines, which roles share the actor's devices (docs/scaling.md)."""

    ray_address: str | None = None  # None: start a local Ray cluster; "auto": join the one `ray start` made
    nnodes: int = 1  # machines the actor's workers span: trainer.num_workers / nnodes on each
    separate: list[str] = field(default_factory=list)  # roles on their own workers: critic, reward_model, teacher
    separate_workers: int = 1  # workers (one GPU each on GPU) for each role in `separate`
    # CPUs reserved per worker (per GPU on GPU); its torch threads follow them. null: a node's CPUs
    # divided among the workers placed on it (at start, from the Ray cluster's resources)
    cpus_per_worker: float | None = None
    # split placement (docs/async.md): > 0 puts rollout on that many workers of its own (one GPU each
    # on GPU), fed weights over the collective backend; 0: the colocated hybrid (rollout in the actor's processes)
    rollout_workers: int = 0
    # split only: rollouts may be sampled by a policy up to this many versions behind the one being
    # trained (asynchronous RL); new weights reach the rollout workers mid-generation. 0: synchronous
    max_staleness: int = 0
    sync_timeout_s: float = 600.0  # a weight sync, or a wait for a rollout batch, longer than this stops the run


SEPARABLE_ROLES = ("critic", "reward_model", "teacher")


@dataclass
class Config:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reference: ScoringModelConfig | None = None  # a reference model for KL; null (or no path): the policy's initial weights
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)  # rule rewards
    # a learned reward model (a sequence classifier) that scores instead of the rule rewards
    reward_model: ScoringModelConfig | None = None
    placement: PlacementConfig = field(default_factory=PlacementConfig)  # machines and devices per role
    # on-policy distillation (trainer.algorithm=distill): a frozen Hugging Face causal LM sharing the
    # student's tokenizer, which scores every sampled token; colocated unless placement.separate lists it
    teacher: ScoringModelConfig | None = None


def load_config(recipe: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults <- recipe YAML <- ``key=value`` overrides; validated and read-only."""
    where = f"recipe {os.fspath(recipe)}" if recipe else "config"
    cfg = merge_recipe(OmegaConf.structured(Config), recipe, overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{where}: required keys not set: {', '.join(missing)}")
    validate(cfg, where)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def merge_recipe(
    base: DictConfig, recipe: str | os.PathLike | None, overrides: list[str] | None
) -> DictConfig:
    """``base`` <- recipe YAML <- ``key=value`` overrides; an error names the recipe (and the
    YAML line) or the one override it comes from, and the key."""
    cfg = base
    if recipe is not None:
        name = os.fspath(recipe)
        if not os.path.exists(name):
            raise ConfigError(f"recipe {name}: no such file")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(name))
        except OmegaConfBaseException as e:
            line = _yaml_line(name, getattr(e, "full_key", None))
            raise ConfigError(f"recipe {name}{line}: {_one_line(e)}") from None
        except Exception as e:  # malformed YAML and the like
            mark = getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"recipe {name}{line}: cannot read it ({type(e).__name__}: {_one_line(e)})") from None
    for override in overrides or []:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {override}: {_one_line(e)}") from None
        except Exception as e:
            raise ConfigError(f"override {override}: cannot read it ({type(e).__name__}: {_one_line(e)})") from None
    return cast(DictConfig, cfg)


def _yaml_line(path: str, full_key: str | None) -> str:
    """`` line N`` where the recipe writes the last part of ``full_key`` (best effort), else ``""``."""
    if not full_key:
        return ""
    last = full_key.split(".")[-1]
    with open(path) as f:
        for number, text in enumerate(f, start=1):
            if text.lstrip().startswith(f"{last}:"):
                return f" line {number}"
    return ""


def _one_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type="))]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    msg = keep[0] if keep else type(e).__name__
    return f"{key}: {msg}" if key and key not in msg else msg


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


_CHOICES = {
    "actor.loss_agg_mode": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"),
    "critic.loss_agg_mode": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"),
    "actor.kl_loss_type": ("k1", "k2", "k3", "abs"),
    "algorithm.kl_ctrl.estimator": ("k1", "k2", "k3", "abs"),
    "algorithm.kl_ctrl.kind": ("fixed", "adaptive"),
    "data.prompts.overlong": ("filter", "truncate_left", "error"),
    "actor.optim.lr_schedule": ("constant", "cosine"),
    "critic.optim.lr_schedule": ("constant", "cosine"),
    "trainer.worker_logs": ("files", "console"),
    "trainer.plan": ("off", "auto"),
    "actor.policy_loss.mismatch": MISMATCH_MODES,
}


# Sizes and counts: (key, least value); a zero here would divide by zero or do nothing.
_AT_LEAST = (
    ("data.train_batch_size", 1), ("actor.mini_batch_size", 1), ("actor.micro_batch_size", 1),
    ("actor.epochs", 1), ("critic.micro_batch_size", 1), ("critic.epochs", 1),
    ("rollout.max_response_length", 1), ("data.prompts.max_prompt_length", 1),
    ("rollout.tensor_parallel_size", 1), ("rollout.sync_bucket_mb", 1), ("placement.nnodes", 1),
    ("placement.separate_workers", 1), ("reward.num_workers", 0),
    ("actor.optim.warmup_steps", 0), ("critic.optim.warmup_steps", 0),
)  # fmt: skip
# Reals that must be positive: learning rates, time limits, fractions.
_POSITIVE = ("actor.optim.lr", "critic.optim.lr", "actor.optim.eps", "critic.optim.eps", "reward.timeout_s",
             "rollout.gpu_memory_utilization", "rollout.top_p")  # fmt: skip
LOGGERS = ("console", "jsonl", "tensorboard", "wandb")
_LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _check_ranges(cfg: Any, where: str) -> None:
    """Sizes, rates and loggers that can be refused before anything starts."""
    for key, least in _AT_LEAST:
        value = OmegaConf.select(cfg, key)
        _check(value >= least, where, f"{key}={value} must be >= {least}")
    for key in _POSITIVE:
        value = OmegaConf.select(cfg, key)
        _check(value > 0, where, f"{key}={value} must be > 0")
    for key in ("actor.optim", "critic.optim"):
        o = OmegaConf.select(cfg, key)
        _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, where, f"{key}.beta1/beta2 must be in [0, 1)")
        _check(o.weight_decay >= 0, where, f"{key}.weight_decay={o.weight_decay} must be >= 0")
        _check(0 <= o.min_lr_ratio <= 1, where, f"{key}.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _check(cfg.rollout.top_p <= 1, where, f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]")
    _check(cfg.rollout.gpu_memory_utilization <= 1, where, "rollout.gpu_memory_utilization must be in (0, 1]")
    for name in cfg.trainer.loggers:
        _check(name in LOGGERS, where, f"trainer.loggers lists {name!r}; known: {', '.join(LOGGERS)}")
        package = _LOGGER_PACKAGES.get(name)
        _check(
            package is None or importlib.util.find_spec(package) is not None,
            where,
            f"trainer.loggers lists {name!r} but the {package} package is not installed: "
            f"pip install 'flowrl[{package}]' (or drop it from trainer.loggers)",
        )


def _check_trainer(t: Any, where: str) -> None:
    """The ``trainer`` section's bounds."""
    _check(t.num_workers >= 1, where, f"trainer.num_workers={t.num_workers} must be >= 1")
    _check(t.total_steps >= 1, where, f"trainer.total_steps={t.total_steps} must be >= 1")
    _check(t.save_every >= -1, where, f"trainer.save_every={t.save_every} must be >= 0 (or -1: never save)")
    _check(t.keep_last >= 1, where, f"trainer.keep_last={t.keep_last} must be >= 1 (checkpoints kept)")
    _check(
        t.max_bad_steps >= 0, where, f"trainer.max_bad_steps={t.max_bad_steps} must be >= 0 (0: never stop)"
    )
    _check(
        t.max_reward_failure_steps >= 0,
        where,
        f"trainer.max_reward_failure_steps={t.max_reward_failure_steps} must be >= 0 (0: never stop)",
    )
    _check(
        t.hang_timeout_s is None or t.hang_timeout_s >= 0,
        where,
        f"trainer.hang_timeout_s={t.hang_timeout_s} must be >= 0 (0: no limit; null: from the step time)",
    )
    _check(
        t.stop_grace_s >= 0, where, f"trainer.stop_grace_s={t.stop_grace_s} must be >= 0 (0: wait for the step)"
    )
    _check(bool(t.resume), where, "trainer.resume is empty: use disable, auto or a checkpoint folder")


def validate(cfg: Any, where: str = "config") -> None:
    """Checks that need more than one key; each failure names the keys and a fix."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        _check(value in choices, where, f"{key}={value!r} is not one of {', '.join(choices)}")
    _check_ranges(cfg, where)
    _check_trainer(cfg.trainer, where)
    t, a, r = cfg.trainer, cfg.actor, cfg.rollout
    _check(r.n >= 1, where, f"rollout.n={r.n} must be >= 1")
    rollout_size = cfg.data.train_batch_size * r.n
    _check(
        rollout_size % a.mini_batch_size == 0,
        where,
        f"data.train_batch_size * rollout.n = {rollout_size} is not divisible by "
        f"actor.mini_batch_size={a.mini_batch_size}",
    )
    _check(
        a.mini_batch_size % t.num_workers == 0,
        where,
        f"actor.mini_batch_size={a.mini_batch_size} is not divisible by trainer.num_workers={t.num_workers}",
    )
    per_rank = a.mini_batch_size // t.num_workers
    _check(
        per_rank % a.micro_batch_size == 0,
        where,
        f"actor.mini_batch_size / trainer.num_workers = {per_rank} is not divisible by "
        f"actor.micro_batch_size={a.micro_batch_size}",
    )
    for role in ("reference", "reward_model", "teacher"):
        section = cfg[role]
        _check(
            section is None or section.micro_batch_size >= 0,
            where,
            f"{role}.micro_batch_size={section.micro_batch_size if section is not None else 0} must be >= 0 "
            "(0: actor.micro_batch_size)",
        )
    models = {"actor.model": a.model, "critic.model": cfg.critic.model}
    models |= {"reference": cfg.reference, "reward_model": cfg.reward_model, "teacher": cfg.teacher}
    for name, model in models.items():
        for key in ("max_tokens_per_micro_batch", "logits_chunk_size"):
            value = model[key] if model is not None else 0
            _check(value >= 0, where, f"{name}.{key}={value} must be >= 0 (0: off)")
    _check_policy_loss(a.policy_loss, where)
    _check_lora(a, where)
    _check_dapo_options(cfg, where)
    _check(r.temperature > 0, where, f"rollout.temperature={r.temperature} must be > 0 for training")
    _check(
        bool(cfg.data.train_files), where, "data.train_files is empty: name at least one parquet/JSONL file"
    )
    _check(bool(a.model.path), where, "actor.model.path is not set: name a Hugging Face model folder")
    _check(
        not cfg.critic.enable or bool(cfg.critic.model.path),
        where,
        "critic.enable=true but critic.model.path is not set",
    )
    _check(
        cfg.reward_model is None or bool(cfg.reward_model.path),
        where,
        "reward_model is set but reward_model.path is not: name a *ForSequenceClassification folder "
        "(or leave reward_model out to score with the rule rewards)",
    )
    _check(
        cfg.teacher is None or bool(cfg.teacher.path),
        where,
        "teacher is set but teacher.path is not: name a Hugging Face causal-LM folder with the student's tokenizer",
    )
    _check_placement(cfg, where)
    try:  # names below may come from the user's plugins: import them first
        load_plugins(cfg.trainer.plugins)
        spec = load_driver(cfg.trainer.algorithm).spec
    except PluginError as e:
        raise ConfigError(f"{where}: {e}") from None
    _check_driver(cfg, where, spec)
    _check_registered(cfg, where)
    _check_estimator(cfg, where, spec)
    _check_multi_turn(cfg, where)
    _check_split(cfg, where)


def _check_split(cfg: Any, where: str) -> None:
    """The split placement and asynchronous mode (docs/async.md): what they do not support yet is refused."""
    p = cfg.placement
    _check(p.rollout_workers >= 0, where, f"placement.rollout_workers={p.rollout_workers} must be >= 0")
    _check(p.max_staleness >= 0, where, f"placement.max_staleness={p.max_staleness} must be >= 0")
    _check(p.sync_timeout_s > 0, where, f"placement.sync_timeout_s={p.sync_timeout_s} must be > 0")
    _check(
        p.max_staleness == 0 or p.rollout_workers > 0,
        where,
        f"placement.max_staleness={p.max_staleness} needs rollout workers of their own: set placement.rollout_workers",
    )
    if p.rollout_workers == 0:
        return
    split = f"placement.rollout_workers={p.rollout_workers} (split placement)"
    _check(cfg.rollout.backend == "vllm", where, f"{split} needs rollout.backend=vllm, not {cfg.rollout.backend!r}")
    _check(not cfg.rollout.multi_turn.enable, where, f"{split} does not run multi-turn rollouts yet; use the colocated placement")
    _check(not cfg.actor.offload, where, f"actor.offload frees the device for a colocated vLLM engine; {split} has none")
    _check(cfg.rollout.tensor_parallel_size == 1, where, f"{split} needs rollout.tensor_parallel_size=1")
    _check(
        p.max_staleness == 0 or not cfg.algorithm.dynamic_sampling.enable,
        where,
        f"placement.max_staleness={p.max_staleness} with algorithm.dynamic_sampling: sampling rounds ahead of "
        "the trainer is not supported; use max_staleness=0",
    )


def _check_multi_turn(cfg: Any, where: str) -> None:
    """A multi-turn recipe names an environment that loads with its kwargs, on an engine that runs turns."""
    from flowrl.envs import make_env

    mt, r = cfg.rollout.multi_turn, cfg.rollout
    if not mt.enable:
        return
    _check(mt.max_turns >= 1, where, f"rollout.multi_turn.max_turns={mt.max_turns} must be >= 1")
    _check(mt.step_timeout_s > 0, where, f"rollout.multi_turn.step_timeout_s={mt.step_timeout_s} must be > 0")
    _check(
        mt.max_concurrent_steps >= 1, where,
        f"rollout.multi_turn.max_concurrent_steps={mt.max_concurrent_steps} must be >= 1",
    )
    _check(
        r.backend == "vllm", where,
        f"rollout.multi_turn.enable=true needs rollout.backend=vllm (rollout.backend={r.backend!r} runs no turns)",
    )
    _check(
        r.tensor_parallel_size == 1, where,
        f"rollout.multi_turn.enable=true needs rollout.tensor_parallel_size=1 (got {r.tensor_parallel_size}): "
        "the ranks of a tensor-parallel replica would see tool results at different times",
    )
    _check(
        cfg.reward_model is None, where,
        "rollout.multi_turn.enable=true: the environment gives the rewards; leave reward_model out",
    )
    try:
        make_env(mt.env, OmegaConf.to_container(mt.env_kwargs)).close()
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_policy_loss(pl: Any, where: str) -> None:
    """The loss's bounds and temperatures, and the mismatch correction's bands."""
    key = "actor.policy_loss"
    _check(pl.clip_low > 0 and pl.clip_high > 0, where, f"{key}.clip_low/clip_high must be > 0")
    _check(
        pl.dual_clip_c is None or pl.dual_clip_c > 1.0,
        where,
        f"{key}.dual_clip_c={pl.dual_clip_c} must be > 1 (or null to disable)",
    )
    _check(
        0 < pl.gspo_clip_low < 1 and pl.gspo_clip_high > 0,
        where,
        f"{key}.gspo_clip_low={pl.gspo_clip_low} must be in (0, 1) "
        f"and gspo_clip_high={pl.gspo_clip_high} > 0",
    )
    _check(
        pl.cispo_clip_low is None or 0 < pl.cispo_clip_low <= 1,
        where,
        f"{key}.cispo_clip_low={pl.cispo_clip_low} must be in (0, 1] (or null: no lower bound)",
    )
    _check(pl.cispo_clip_high > 0, where, f"{key}.cispo_clip_high={pl.cispo_clip_high} must be > 0")
    _check(
        pl.sapo_tau_pos > 0 and pl.sapo_tau_neg > 0,
        where,
        f"{key}.sapo_tau_pos={pl.sapo_tau_pos} and sapo_tau_neg={pl.sapo_tau_neg} must be > 0",
    )
    _check(pl.tis_cap is None or pl.tis_cap > 0, where, f"{key}.tis_cap={pl.tis_cap} must be > 0 (or null)")
    _check(
        pl.mismatch != "tis" or pl.tis_cap is not None,
        where,
        f"{key}.mismatch=tis needs {key}.tis_cap (e.g. 2.0)",
    )
    for band in ("seq", "token"):
        low, high = pl[f"mismatch_{band}_low"], pl[f"mismatch_{band}_high"]
        _check(
            0 < low <= 1 <= high,
            where,
            f"{key}.mismatch_{band}_low={low} / mismatch_{band}_high={high} must satisfy "
            "0 < low <= 1 <= high (on-policy tokens, ratio 1, are never masked)",
        )
    _check(
        pl.max_logprob_diff is None or pl.max_logprob_diff > 0,
        where,
        f"{key}.max_logprob_diff={pl.max_logprob_diff} must be > 0 "
        "(or null: from rollout.dtype and actor.model.dtype)",
    )


def _check_lora(actor: Any, where: str) -> None:
    """The adapters' shape; when they are on, PEFT installed and the engine that applies them."""
    lora = actor.lora
    for error in lora_config_errors(lora):
        _check(False, where, error)
    _check(
        lora.rank == 0 or actor.backend == "fsdp",
        where,
        f"actor.lora.rank={lora.rank}: LoRA is applied by the fsdp training engine, not actor.backend={actor.backend!r}",
    )
    _check(
        not actor.offload or actor.backend == "fsdp",
        where,
        f"actor.offload: the fsdp training engine offloads its state, not actor.backend={actor.backend!r}",
    )
    _check(
        not actor.model.cpu_offload or actor.backend == "fsdp",
        where,
        f"actor.model.cpu_offload: the fsdp training engine keeps its state in host memory, not actor.backend={actor.backend!r}",
    )
    _check(
        lora.rank == 0 or importlib.util.find_spec("peft") is not None,
        where,
        f"actor.lora.rank={lora.rank} needs the peft package: pip install 'flowrl[lora]' (or set actor.lora.rank=0)",
    )


def _check_dapo_options(cfg: Any, where: str) -> None:
    """Dynamic sampling compares the samples of a prompt; the overlong buffer fits in the response."""
    ds, ol, length = cfg.algorithm.dynamic_sampling, cfg.algorithm.overlong, cfg.rollout.max_response_length
    _check(ds.max_rounds >= 1, where, f"algorithm.dynamic_sampling.max_rounds={ds.max_rounds} must be >= 1")
    _check(
        not ds.enable or cfg.rollout.n > 1,
        where,
        "algorithm.dynamic_sampling.enable=true drops groups whose scores are all equal: set rollout.n > 1",
    )
    _check(
        not ol.enable or 1 <= ol.buffer <= length,
        where,
        f"algorithm.overlong.buffer={ol.buffer} must be in [1, rollout.max_response_length={length}]",
    )
    _check(ol.penalty_factor >= 0, where, f"algorithm.overlong.penalty_factor={ol.penalty_factor} must be >= 0")


def _check_placement(cfg: Any, where: str) -> None:
    """Workers split evenly over machines, tensor-parallel replicas inside one machine."""
    p, n, tp = cfg.placement, cfg.trainer.num_workers, cfg.rollout.tensor_parallel_size
    _check(
        p.cpus_per_worker is None or p.cpus_per_worker > 0,
        where,
        f"placement.cpus_per_worker={p.cpus_per_worker} must be > 0 (or null: the node's CPUs / its workers)",
    )
    _check(
        p.nnodes >= 1 and n % p.nnodes == 0,
        where,
        f"trainer.num_workers={n} is not divisible by placement.nnodes={p.nnodes}",
    )
    _check(
        tp >= 1 and (n // p.nnodes) % tp == 0,
        where,
        f"rollout.tensor_parallel_size={tp} must divide the workers per node (trainer.num_workers / "
        f"placement.nnodes = {n // p.nnodes}): the ranks of a rollout replica stay on one machine",
    )
    for role in p.separate:
        _check(
            role in SEPARABLE_ROLES,
            where,
            f"placement.separate lists {role!r}; roles that can have their own workers: "
            f"{', '.join(SEPARABLE_ROLES)}",
        )
    _check(
        len(set(p.separate)) == len(p.separate),
        where,
        f"placement.separate={list(p.separate)} repeats a role",
    )
    _check(
        "critic" not in p.separate or cfg.critic.enable,
        where,
        "placement.separate lists critic but critic.enable=false",
    )
    _check(
        "reward_model" not in p.separate or cfg.reward_model is not None,
        where,
        "placement.separate lists reward_model but no reward_model is configured",
    )
    _check("teacher" not in p.separate or cfg.teacher is not None, where, "placement.separate lists teacher but no teacher is configured")
    m, mini, micro = p.separate_workers, cfg.actor.mini_batch_size, cfg.critic.micro_batch_size
    _check(m >= 1, where, f"placement.separate_workers={m} must be >= 1")
    _check(
        "critic" not in p.separate or (mini % m == 0 and (mini // m) % micro == 0),
        where,
        f"a separate critic on placement.separate_workers={m} gets actor.mini_batch_size={mini} / {m} "
        f"responses per rank, which must be a whole multiple of critic.micro_batch_size={micro}",
    )


def _check_driver(cfg: Any, where: str, spec: DriverSpec) -> None:
    """Options the driver cannot honour are refused, not ignored."""
    algo = cfg.trainer.algorithm
    _check(
        spec.kl_in_reward or not cfg.algorithm.use_kl_in_reward,
        where,
        f"algorithm.use_kl_in_reward=true, but the {algo!r} driver does not put a KL penalty in the reward; "
        "use actor.use_kl_loss=true for a KL term in the loss, or a driver that supports it (ppo, rloo, reinforce_pp)",
    )
    _check(
        spec.critic != "required" or cfg.critic.enable,
        where,
        f"trainer.algorithm={algo!r} needs a critic: set critic.enable=true and critic.model.path",
    )
    _check(
        spec.critic != "never" or not cfg.critic.enable,
        where,
        f"trainer.algorithm={algo!r} uses no critic: set critic.enable=false",
    )
    _check(
        not spec.teacher or cfg.teacher is not None,
        where,
        f"trainer.algorithm={algo!r} distils a teacher: set teacher.path to a model folder with the student's tokenizer",
    )
    _check(
        spec.teacher or cfg.teacher is None,
        where,
        f"teacher.path is set, but the {algo!r} driver uses no teacher: use trainer.algorithm=distill "
        "(or leave teacher out)",
    )
    estimator = cfg.algorithm.advantage.estimator
    _check(
        not spec.teacher or estimator not in ESTIMATORS or Keys.TEACHER_LOGPROBS in ESTIMATORS.get(estimator).needs,
        where,
        f"trainer.algorithm={algo!r} distils a teacher, but algorithm.advantage.estimator={estimator!r} never reads "
        "its log-probs: set algorithm.advantage.estimator=distill (or an estimator of yours that reads teacher_logprobs)",
    )


def _check_registered(cfg: Any, where: str) -> None:
    """Every registry name in the recipe exists (after the plugins registered theirs)."""
    named = {
        "actor.policy_loss.name": (cfg.actor.policy_loss.name, POLICY_LOSSES.names()),
        "actor.backend": (cfg.actor.backend, TRAIN_ENGINES.names()),
        "rollout.backend": (cfg.rollout.backend, ROLLOUT_ENGINES.names()),
        "algorithm.advantage.estimator": (cfg.algorithm.advantage.estimator, ESTIMATORS.names()),
    }
    for key, (name, known) in named.items():
        hint = "" if cfg.trainer.plugins else "; register yours in a module listed in trainer.plugins"
        _check(name in known, where, f"{key}={name!r} is not registered; known: {', '.join(known)}{hint}")


def _check_estimator(cfg: Any, where: str, spec: DriverSpec) -> None:
    """The recipe's workers and driver produce every key the estimator reads."""
    name = cfg.algorithm.advantage.estimator
    available = {Keys.SCORES, Keys.RESPONSE_MASK, Keys.TOKEN_REWARDS, Keys.GROUP_IDS, Keys.REF_LOGPROBS}
    if cfg.critic.enable:
        available |= {Keys.VALUES, Keys.OLD_VALUES}
    available |= set(spec.provides)
    try:
        check_estimator_inputs(name, available)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    _check(
        name not in ("grpo", "rloo", "reinforce_pp_baseline") or cfg.rollout.n > 1,
        where,
        f"algorithm.advantage.estimator={name!r} compares samples of one prompt: set rollout.n > 1",
    )
    w = cfg.algorithm.advantage.distill_reward_weight
    _check(
        name != "distill" or w == 0.0 or cfg.rollout.n > 1,
        where,
        f"algorithm.advantage.distill_reward_weight={w} adds GRPO's advantage, which compares samples of one "
        "prompt: set rollout.n > 1 (or the weight to 0)",
    )
    _check(
        name != "distill" or w != 0.0 or not cfg.algorithm.dynamic_sampling.enable,
        where,
        "algorithm.dynamic_sampling.enable=true drops groups whose scores are all equal, but with "
        "algorithm.advantage.estimator=distill and distill_reward_weight=0 every token carries the teacher's "
        "signal whatever the score: turn dynamic sampling off (or set a weight > 0)",
    )
