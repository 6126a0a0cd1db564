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
    with open(Path(path, STEP_STATE)) as f:
        state = json.load(f)
    base = state.get("meta", {}).get("model")
    return os.fspath(Path(path, "actor")), base


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
    checkpoint: str | os.PathLike, base: str | os.PathLike, out_dir: str | os.PathLike
) -> Path:
    """Write the policy weights of a training checkpoint as a Hugging Face folder in ``out_dir``.

    ``base`` is the model folder training started from: its config, generation config and
    tokenizer are copied, its weights replaced by the checkpoint's (all of them: a
    checkpoint that lacks one fails with its name).
    """
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not is_training_checkpoint(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: not a training checkpoint (no {DCP_METADATA} file)")
    check_dcp_metadata(checkpoint)  # dcp reads .metadata with pickle: refuse a tampered one first
    if not is_hf_folder(base):
        raise FileNotFoundError(f"--base {base}: not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tied = _tied_aliases(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    stored = set(dcp.FileSystemReader(os.fspath(checkpoint)).read_metadata().state_dict_metadata)
    missing = sorted(k for k in state if f"{MODEL_PREFIX}.{k}" not in stored)
    if missing:
        raise ValueError(
            f"{checkpoint}: lacks {len(missing)} weights of the --base model (first: {missing[0]}); "
            "export with the model the run started from"
        )
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process.*")
        dcp.load({MODEL_PREFIX: state}, checkpoint_id=os.fspath(checkpoint))  # fills the tensors in place
    model.load_state_dict(state, strict=False)  # the same values again, should the loader swap any tensor
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def copy_hf_folder(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    if Path(out_dir).exists() and Path(out_dir).resolve() == Path(src).resolve():
        return Path(out_dir)
    shutil.copytree(src, out_dir, dirs_exist_ok=True)
    return Path(out_dir)


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    first = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
