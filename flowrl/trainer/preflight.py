"""Checks of a run's inputs that need files or devices, done before any worker starts.

``flowrl/config.py`` already refuses malformed recipes, unknown keys, wrong types and
inconsistent sizes. What is left needs the disk or the machine: the model folders and
their tokenizer, the devices asked for, the dataset rows, the reward function of each
data source and the checkpoint to resume from. Each problem raises ``InputError`` with
one line that names the key or file and what to do; ``flowrl train`` prints it and exits
with status 2, so a bad input never costs a worker start-up or shows a deep traceback.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from flowrl.trainer.checkpoint import CHECKPOINTS, CheckpointError, check_compatible, find_latest, read_checkpoint
from flowrl.data import DataLoader, PromptDataset
from flowrl.data.dataset import PromptDataConfig
from flowrl.data.rows import RowError
from flowrl.rewards.registry import RewardConfig, RewardResolver

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class InputError(ValueError):
    """A run input (file, folder, device count, data row, checkpoint) that cannot work."""


def model_folders(cfg: DictConfig) -> dict[str, str]:
    """Config key -> the model folder it names, for every model the run loads."""
    folders = {"actor.model.path": cfg.actor.model.path}
    if cfg.critic.enable:
        folders["critic.model.path"] = cfg.critic.model.path
    if cfg.reference is not None and cfg.reference.path:
        folders["reference.path"] = cfg.reference.path
    if cfg.reward_model is not None:
        folders["reward_model.path"] = cfg.reward_model.path
    if cfg.teacher is not None:
        folders["teacher.path"] = cfg.teacher.path
    return folders


def is_hub_id(path: str) -> bool:
    """``org/name`` that is no local path: transformers and vLLM fetch it (unless offline)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
    return not offline and not os.path.exists(path) and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) is not None


def check_model_folder(key: str, path: str) -> dict[str, Any]:
    """The folder exists and holds a Hugging Face ``config.json``; returns that config ({} for a hub id)."""
    if is_hub_id(path):
        return {}
    if not os.path.isdir(path):
        raise InputError(f"{key}={path}: no such folder; give a Hugging Face model folder (config.json + weights)")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise InputError(f"{key}={path}: no config.json, so not a Hugging Face model folder; save one with save_pretrained")
    try:
        with open(config_file) as f:
            config = dict(json.load(f))
    except (OSError, ValueError) as e:
        raise InputError(f"{key}={path}: config.json is unreadable ({e}); re-save the model") from None
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in os.listdir(path)):
        raise InputError(
            f"{key}={path}: no weights (*.safetensors or pytorch_model*.bin) next to config.json; "
            "save the model with save_pretrained"
        )
    return config


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def check_run_dir(cfg: DictConfig) -> None:
    """``trainer.run_dir`` can be created and written to (checked before anything is started)."""
    path = os.path.abspath(cfg.trainer.run_dir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a folder" if not os.path.isdir(existing) else "is not writable"
        raise InputError(f"trainer.run_dir={cfg.trainer.run_dir}: {existing} {what}; choose another run_dir")


def check_tokenizer(path: str, model_config: dict[str, Any]) -> Any:
    """The actor folder's tokenizer loads and fits the model's embedding table."""
    from transformers import AutoTokenizer

    if not is_hub_id(path) and not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise InputError(
            f"actor.model.path={path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the model's "
            "tokenizer into the folder (tokenizer.save_pretrained)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing/broken tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"actor.model.path={path}: cannot load its tokenizer ({type(e).__name__}: {first[:200]}); "
            "save the model's tokenizer into the folder (tokenizer.save_pretrained)"
        ) from None
    vocab = model_config.get("vocab_size") or model_config.get("text_config", {}).get("vocab_size")
    if vocab is not None and len(tokenizer) > int(vocab):
        raise InputError(
            f"actor.model.path={path}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{vocab}; the tokenizer belongs to another model: save the model's own tokenizer into the folder"
        )
    return tokenizer


def check_teacher_tokenizer(cfg: DictConfig, tokenizer: Any) -> None:
    """The distillation teacher scores the student's token ids as they are: its tokenizer's
    vocabulary must be the student's, token for token."""
    from transformers import AutoTokenizer

    if cfg.teacher is None:
        return
    path = cfg.teacher.path
    try:
        vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing/broken tokenizer
        raise InputError(
            f"teacher.path={path}: cannot load its tokenizer ({type(e).__name__}); the teacher must ship the "
            "student's tokenizer (tokenizer.save_pretrained)"
        ) from None
    if vocab != tokenizer.get_vocab():
        raise InputError(
            f"teacher.path={path}: its tokenizer ({len(vocab)} tokens) differs from the student's "
            f"(actor.model.path={cfg.actor.model.path}, {len(tokenizer.get_vocab())} tokens); the teacher scores "
            "the student's token ids, so both must share one tokenizer: pick a teacher of the same model family"
        )


def check_tensor_parallel(cfg: DictConfig, model_config: dict[str, Any]) -> None:
    """vLLM splits attention heads over the T ranks of a replica: T must divide them.

    With fewer key/value heads than T, vLLM copies each onto T / heads ranks, so then the
    heads must divide T instead.
    """
    tp = cfg.rollout.tensor_parallel_size
    text = {**model_config, **model_config.get("text_config", {})}
    heads = text.get("num_attention_heads")
    if tp == 1 or heads is None:
        return
    path = cfg.actor.model.path
    if heads % tp:
        raise InputError(
            f"rollout.tensor_parallel_size={tp}: actor.model.path={path} has {heads} attention heads, which "
            f"{tp} GPUs cannot share evenly; use a tensor_parallel_size that divides {heads}"
        )
    kv = text.get("num_key_value_heads") or heads
    if kv % tp and tp % kv:
        raise InputError(
            f"rollout.tensor_parallel_size={tp}: actor.model.path={path} has {kv} key/value heads; vLLM needs "
            f"{tp} to divide them or be a multiple of them"
        )


def check_devices(cfg: DictConfig) -> None:
    """Enough GPUs (or CPUs) on this machine for ``trainer.num_workers`` (skipped on a Ray cluster)."""
    if os.environ.get("RAY_ADDRESS"):
        return  # the cluster's resources are checked when its placement group is reserved
    t = cfg.trainer
    if t.use_gpu:
        have = torch.cuda.device_count()
        if have < t.num_workers:
            raise InputError(
                f"trainer.num_workers={t.num_workers} with trainer.use_gpu=true needs {t.num_workers} GPUs; this "
                f"machine has {have}: lower trainer.num_workers or set trainer.use_gpu=false"
            )
    elif t.num_workers > (os.cpu_count() or 1):
        raise InputError(
            f"trainer.num_workers={t.num_workers} needs {t.num_workers} CPUs (one per worker); this machine has "
            f"{os.cpu_count()}: lower trainer.num_workers"
        )


def check_resume(cfg: DictConfig) -> None:
    """``trainer.resume`` names a complete checkpoint of a run shaped like this one."""
    mode = cfg.trainer.resume
    if mode == "disable":
        return
    try:
        if mode == "auto":
            ref = find_latest(os.path.join(cfg.trainer.run_dir, CHECKPOINTS))
            if ref is None:
                return
            ref, state = read_checkpoint(ref.path)
        else:
            ref, state = read_checkpoint(mode)
        check_compatible(state, cfg, ref.path, set())
    except CheckpointError as e:
        raise InputError(str(e)) from None
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"trainer.resume={mode}: unreadable checkpoint ({type(e).__name__}: {e})") from None


def check_rewards(cfg: DictConfig, sources: set[str]) -> None:
    """Every data source of the data has a reward function that imports."""
    resolver = RewardResolver(cast(RewardConfig, OmegaConf.to_object(cfg.reward)))
    for source in sorted(sources):
        try:
            resolver(source)
        except ValueError as e:
            raise InputError(f"data_source {source!r}: {e}") from None


def check_run_inputs(cfg: DictConfig) -> Any:
    """Model folders, tokenizer, attention heads vs T, devices and resume target; returns the tokenizer."""
    configs = {key: check_model_folder(key, path) for key, path in model_folders(cfg).items()}
    tokenizer = check_tokenizer(cfg.actor.model.path, configs["actor.model.path"])
    check_teacher_tokenizer(cfg, tokenizer)
    check_tensor_parallel(cfg, configs["actor.model.path"])
    check_devices(cfg)
    check_run_dir(cfg)
    check_resume(cfg)
    return tokenizer


def load_inputs(cfg: DictConfig, tokenizer: Any = None) -> tuple[Any, DataLoader, PromptDataset | None]:
    """The tokenizer, the training batches and the validation prompts; data problems as ``InputError``."""
    if tokenizer is None:
        tokenizer = check_tokenizer(cfg.actor.model.path, check_model_folder("actor.model.path", cfg.actor.model.path))
    prompts_cfg = cast(PromptDataConfig, OmegaConf.to_object(cfg.data.prompts))
    try:
        train = PromptDataset(list(cfg.data.train_files), tokenizer, prompts_cfg)
        val = PromptDataset(list(cfg.data.val_files), tokenizer, prompts_cfg) if cfg.data.val_files else None
        if len(train) < cfg.data.train_batch_size:
            raise InputError(
                f"data.train_files: {len(train)} usable prompts ({train.stats['n_filtered']} of "
                f"{train.stats['n_rows']} filtered as longer than data.prompts.max_prompt_length="
                f"{prompts_cfg.max_prompt_length}), fewer than data.train_batch_size={cfg.data.train_batch_size}; "
                "add rows, raise the limit or set data.prompts.overlong=truncate_left"
            )
        loader = DataLoader(train, cfg.data.train_batch_size, seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)
    except InputError:
        raise
    except (RowError, FileNotFoundError, ValueError, TypeError) as e:
        raise InputError(str(e)) from None
    sources = {item.data_source for item in (val.items if val is not None else [])}
    if cfg.reward_model is None:
        sources |= {item.data_source for item in train.items}
    check_rewards(cfg, sources)
    return tokenizer, loader, val
