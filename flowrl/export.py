"""Hugging Face folders out of training: export a checkpoint, and check a folder loads.

Two sources:
- a training checkpoint (``FSDPEngine.save``: ``ActorRollout.save``, ``SFTWorker.save``,
  ``flowrl sft --save-checkpoint``), a torch.distributed.checkpoint folder holding the
  sharded model and optimizer. It stores no architecture, so ``base`` names the model
  folder training started from (its config and tokenizer). The weights are read in one
  process, without a process group, whatever number of ranks wrote them.
- a Hugging Face folder (``FSDPEngine.save_hf``, ``flowrl sft``'s ``model/``): checked and,
  when asked, copied.

``verify_hf_folder`` loads a folder with transformers (model and tokenizer) and runs one
forward pass, so a broken export fails here rather than at the start of the next run.
Policies only: a critic's checkpoint (value head) is not a causal LM.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flowrl.engines.dcp_safety import check_dcp_metadata

DCP_METADATA = ".metadata"  # the index torch.distributed.checkpoint writes next to the shards
MODEL_PREFIX = "model"  # FSDPEngine.save stores {"model": ..., "optim": ..., "engine": ...}


def is_hf_folder(path: str | os.PathLike) -> bool:
    return Path(path, "config.json").is_file()


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path, DCP_METADATA).is_file()


STEP_STATE = "driver.json"  # a run's checkpoint step folder: driver state + actor/ (flowrl.trainer.checkpoint)


def is_step_folder(path: str | os.PathLike) -> bool:
    """A checkpoint step folder of a run (``RUN_DIR/checkpoints/step_N``): ``driver.json`` and ``actor/``."""
    return Path(path, STEP_STATE).is_file() and is_training_checkpoint(Path(path, "actor"))


def step_folder_parts(path: str | os.PathLike) -> tuple[str, str | None]:
    """(the policy's DCP folder, the model folder the run started from as ``driver.json`` recorded it)."""
    base = recorded_meta(path).get("model")
    return os.fspath(Path(path, "actor")), base


def recorded_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The run metadata a step folder's ``driver.json`` recorded (model, LoRA settings, ...)."""
    with open(Path(path, STEP_STATE)) as f:
        meta: dict[str, Any] = json.load(f).get("meta", {})
    return meta


@dataclass(frozen=True)
class FolderReport:
    """What ``verify_hf_folder`` found."""

    path: str
    architecture: str
    n_params: int
    vocab_size: int
    chat_template: bool

    def line(self) -> str:
        chat = "with" if self.chat_template else "without"
        return (
            f"{self.path}: {self.architecture}, {self.n_params / 1e6:.2f}M parameters, "
            f"vocabulary {self.vocab_size}, {chat} a chat template; loads in transformers"
        )


def verify_hf_folder(path: str | os.PathLike) -> FolderReport:
    """Load model and tokenizer with transformers and run one forward pass (finite logits)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not is_hf_folder(path):
        raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer("Hello", return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # [1, T, V]
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{path}: the model loads but its logits are not finite; the weights are broken")
    return FolderReport(
        path=os.fspath(path),
        architecture=type(model).__name__,
        n_params=sum(p.numel() for p in model.parameters()),
        vocab_size=int(logits.shape[-1]),
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )


def export_checkpoint(
    checkpoint: str | os.PathLike,
    base: str | os.PathLike,
    out_dir: str | os.PathLike,
    lora: dict[str, Any] | None = None,
    adapter_only: bool = False,
    base_dtype: str | None = None,
) -> Path:
    """Write the policy weights of a training checkpoint as a Hugging Face folder in ``out_dir``.

    ``base`` is the model folder training started from: its config, generation config and
    tokenizer are copied, its weights replaced by the checkpoint's (all of them: a
    checkpoint that lacks one fails with its name). A LoRA run's checkpoint needs its
    ``lora`` settings (rank, alpha, target_modules; a step folder records them): the folder
    then holds the base model with the adapters merged in, or with ``adapter_only`` the
    adapters alone in PEFT's format (``export_adapter``). Its checkpoint holds only the adapters
    (an older one the base too): the base weights come from ``base``, cast to the run's
    ``base_dtype`` (its ``rollout.dtype``, recorded in the step folder) as training held them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not is_training_checkpoint(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: not a training checkpoint (no {DCP_METADATA} file)")
    check_dcp_metadata(checkpoint)  # dcp reads .metadata with pickle: refuse a tampered one first
    if not is_hf_folder(base):
        raise FileNotFoundError(f"--base {base}: not a Hugging Face model folder (no config.json)")
    stored = _stored_names(checkpoint)
    if lora is None and any(".lora_A." in name for name in stored):
        raise ValueError(
            f"{checkpoint}: a LoRA run's checkpoint; export it from its step folder (RUN_DIR/checkpoints/step_N), "
            "which records the adapters' settings"
        )
    if adapter_only and lora is None:
        raise ValueError(f"{checkpoint}: --adapter needs a LoRA run's checkpoint; this one trained every weight")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if lora is not None:
        from flowrl.engines.lora import LoraConfig, apply_lora

        frozen = getattr(torch, base_dtype) if base_dtype else None  # the base as the run held it
        apply_lora(model, LoraConfig(**lora), seed=0, frozen_dtype=frozen)  # the adapters come from the checkpoint
        model.float()
    _load_policy(model, checkpoint, stored, frozen_from_base=lora is not None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if adapter_only:
        return export_adapter(model, lora or {}, os.fspath(base), out)
    if lora is not None:
        model = _merged(model, base)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def _stored_names(checkpoint: str | os.PathLike) -> set[str]:
    """The policy weights' names in a checkpoint (without the ``model.`` prefix of its state)."""
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(os.fspath(checkpoint)).read_metadata().state_dict_metadata
    return {k.removeprefix(f"{MODEL_PREFIX}.") for k in keys if k.startswith(f"{MODEL_PREFIX}.")}


def _load_policy(
    model: torch.nn.Module, checkpoint: str | os.PathLike, stored: set[str], frozen_from_base: bool = False
) -> None:
    """Fill every weight of ``model`` from the checkpoint (one process, no process group); with
    ``frozen_from_base`` the frozen ones the checkpoint lacks keep the values they have."""
    import torch.distributed.checkpoint as dcp

    tied = _tied_aliases(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    if frozen_from_base:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in stored or k in trainable}
    missing = sorted(k for k in state if k not in stored)
    if missing:
        raise ValueError(
            f"{checkpoint}: lacks {len(missing)} weights of the --base model (first: {missing[0]}); "
            "export with the model the run started from"
        )
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process.*")
        dcp.load({MODEL_PREFIX: state}, checkpoint_id=os.fspath(checkpoint))  # fills the tensors in place
    model.load_state_dict(state, strict=False)  # the same values again, should the loader swap any tensor


def _merged(model: torch.nn.Module, base: str | os.PathLike) -> torch.nn.Module:
    """A plain model of the base architecture holding ``W + s * B @ A`` for every adapted layer."""
    from transformers import AutoModelForCausalLM

    from flowrl.engines.lora import lora_scales, merge_adapters

    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tied = _tied_aliases(model)
    named = ((k, v) for k, v in model.state_dict().items() if k not in tied)
    plain.load_state_dict(dict(merge_adapters(named, lora_scales(model))), strict=False)
    return plain


def export_adapter(model: torch.nn.Module, lora: dict[str, Any], base: str, out: Path) -> Path:
    """The adapters of a LoRA model in PEFT's format (``flowrl.engines.lora.write_peft_adapter``):
    what ``PeftModel.from_pretrained(base_model, out)`` and vLLM's ``LoRARequest`` load."""
    from flowrl.engines.lora import adapter_tensors, target_names, write_peft_adapter

    rank, alpha = int(lora["rank"]), float(lora["alpha"])
    write_peft_adapter(adapter_tensors(model), rank, alpha, target_names(model), base, os.fspath(out))
    return out


def verify_adapter_folder(path: str | os.PathLike) -> str:
    """Load a PEFT adapter folder onto the base model it names and run one forward; one line."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    config = PeftConfig.from_pretrained(os.fspath(path))
    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.fspath(path)).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    return f"adapter: {path} (PEFT LoRA r={config.r}, {n:,} parameters, on {config.base_model_name_or_path})"


def copy_hf_folder(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    if Path(out_dir).exists() and Path(out_dir).resolve() == Path(src).resolve():
        return Path(out_dir)
    shutil.copytree(src, out_dir, dirs_exist_ok=True)
    return Path(out_dir)


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    first = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
