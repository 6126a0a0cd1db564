"""LoRA adapters on the policy, with PEFT, and what the rest of the engine needs of them.

``apply_lora`` injects PEFT's LoRA layers into the Hugging Face model *in place*
(``peft.inject_adapter_in_model``): the model keeps its class (``_no_split_modules``,
``config``, the chunked LM head all work as before); each targeted ``nn.Linear`` becomes
a PEFT ``lora.Linear`` whose state-dict names are

    model.layers.0.self_attn.q_proj.base_layer.weight     the frozen base weight W  [out, in]
    model.layers.0.self_attn.q_proj.base_layer.bias       (if any) frozen
    model.layers.0.self_attn.q_proj.lora_A.default.weight A  [r, in], trainable
    model.layers.0.self_attn.q_proj.lora_B.default.weight B  [out, r], trainable (zero at start)

and computes ``x W^T + s * dropout(x) A^T B^T`` with ``s = alpha / r``. Only A and B are
trainable; the base weights are frozen and may be stored in another dtype (the rollout's).

``merge_adapters`` turns a stream of (name, full tensor) of such a model into the base
model's names and weights, ``W' = W + s * B @ A``: what the rollout engine loads (it
needs no LoRA support) and what a merged Hugging Face folder holds.

``adapter_disabled`` switches every adapter off for a block (PEFT's own switch, the one
``PeftModel.disable_adapter`` uses): the model is then exactly the base model.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ALL_LINEAR = "all-linear"  # PEFT: every nn.Linear except the output head
SYNC_MODES = ("adapter", "merged")
ADAPTER_NAME = "default"
# "<module>.lora_A.default.weight" / "<module>.lora_B.default.weight"
_ADAPTER_WEIGHT = re.compile(rf"(?P<module>.+)\.lora_(?P<which>[AB])\.{ADAPTER_NAME}\.weight")
_BASE_LAYER = ".base_layer."


@dataclass
class LoraConfig:
    """LoRA adapters on the policy (PEFT); rank 0: off, the whole model trains (docs/lora.md)."""

    rank: int = 0  # r, the adapters' inner dimension; 0: no LoRA (full fine-tuning)
    alpha: float = 16.0  # scaling: the adapter's output is multiplied by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input while training
    # the layers that get an adapter: module names (e.g. [q_proj, k_proj, v_proj, o_proj]) or
    # all-linear (every Linear layer except the output head)
    target_modules: Any = ALL_LINEAR
    # how new weights reach the rollout engine: adapter (only A and B, served by vLLM on the base model
    # it loaded once; a rollout engine that serves no adapters gets merged) | merged (W + s B A, every weight)
    sync: str = "adapter"

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def lora_config_errors(c: Any, key: str = "actor.lora") -> list[str]:
    """What is wrong with a LoRA section (a ``LoraConfig`` or its DictConfig), one line each."""
    errors = []
    if c.sync not in SYNC_MODES:
        errors.append(f"{key}.sync={c.sync!r} is not one of {', '.join(SYNC_MODES)}")
    if c.rank < 0:
        errors.append(f"{key}.rank={c.rank} must be >= 0 (0: off)")
    if c.rank > 0 and c.alpha <= 0:
        errors.append(f"{key}.alpha={c.alpha} must be > 0")
    if not 0 <= c.dropout < 1:
        errors.append(f"{key}.dropout={c.dropout} must be in [0, 1)")
    targets = c.target_modules
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            errors.append(
                f"{key}.target_modules={targets!r}: give a list of module names "
                f"(e.g. [q_proj, v_proj]) or {ALL_LINEAR}"
            )
    elif not isinstance(targets, Sequence) or not targets or not all(isinstance(t, str) and t for t in targets):
        errors.append(
            f"{key}.target_modules={targets!r}: give a non-empty list of module names or {ALL_LINEAR}"
        )
    return errors


def apply_lora(model: nn.Module, config: LoraConfig, seed: int, frozen_dtype: torch.dtype | None = None) -> None:
    """Inject LoRA layers into ``model`` in place; freeze everything else.

    The adapters' random initialization (A; B starts at zero) is drawn from ``seed`` so
    that every rank holds the same adapters before sharding. ``frozen_dtype`` casts the
    frozen base weights (e.g. to the rollout's bfloat16); the adapters stay as they are.
    """
    try:
        import peft
    except ImportError:
        raise ImportError("actor.lora.rank > 0 needs PEFT: pip install 'flowrl[lora]'") from None
    errors = lora_config_errors(config)
    if errors:
        raise ValueError("; ".join(errors))
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    peft_config = peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets, bias="none"
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER_NAME)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"actor.lora.target_modules={targets!r} matched no layer of the model")
    for name, module in layers.items():
        if not isinstance(module, peft.tuners.lora.Linear) or module.fan_in_fan_out:
            raise ValueError(
                f"actor.lora.target_modules: {name} is a {type(module).__name__}; "
                "only nn.Linear layers can take an adapter for now (docs/lora.md)"
            )
    for name, param in model.named_parameters():
        param.requires_grad = is_adapter_weight(name)
        if frozen_dtype is not None and not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(frozen_dtype)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that carry an adapter, by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_scales(model: nn.Module) -> dict[str, float]:
    """Module name -> the scale s its adapter's output is multiplied by (alpha / rank)."""
    return {name: float(m.scaling[ADAPTER_NAME]) for name, m in lora_layers(model).items()}  # type: ignore[index]


def adapter_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapters' weights under PEFT's saved names (``saved_name``)."""
    for name, tensor in model.state_dict().items():
        if is_adapter_weight(name):
            yield saved_name(name), tensor


def saved_name(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``:
    the name PEFT saves an adapter weight under (its adapter name dropped)."""
    match = _ADAPTER_WEIGHT.fullmatch(name)
    if match is None:
        raise ValueError(f"{name} is not an adapter weight")
    return f"{match['module']}.lora_{match['which']}.weight"


def target_names(model: nn.Module) -> list[str]:
    """The adapted layers' own names (``q_proj``, ``up_proj``, ...): ``all-linear`` spelt out."""
    return sorted({name.rsplit(".", 1)[-1] for name in lora_layers(model)})


def write_peft_adapter(
    tensors: Iterable[tuple[str, torch.Tensor]], rank: int, alpha: float, targets: list[str], base: str, out: str
) -> str:
    """An adapter folder in PEFT's format from (saved name, full tensor) pairs:
    ``adapter_model.safetensors`` (``base_model.model.<saved name>``) and ``adapter_config.json``.
    ``PeftModel.from_pretrained(base_model, out)`` and vLLM's ``LoRARequest`` load it."""
    import os

    import peft
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    weights = {f"base_model.model.{name}": t.detach().float().contiguous().cpu() for name, t in tensors}
    save_file(weights, os.path.join(out, "adapter_model.safetensors"))
    config = peft.LoraConfig(
        r=int(rank), lora_alpha=float(alpha), bias="none", task_type="CAUSAL_LM", target_modules=list(targets),
        base_model_name_or_path=os.path.abspath(base) if os.path.exists(base) else base,
    )  # fmt: skip
    config.save_pretrained(out)
    return out


def is_adapter_weight(name: str) -> bool:
    return _ADAPTER_WEIGHT.fullmatch(name) is not None


def merge_adapters(
    named: Iterable[tuple[str, torch.Tensor]], scales: dict[str, float], dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of a LoRA model -> (base name, full tensor) with ``W + s * B @ A``.

    A base weight waits until its A and B have come by (they follow it in module order,
    so one layer's weight at most); the merge runs in fp32 and is cast to ``dtype`` (None:
    W's dtype). Other tensors pass through, renamed from ``.base_layer.`` where needed.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in named:
        match = _ADAPTER_WEIGHT.fullmatch(name)
        if match is not None:
            module, key = match["module"], match["which"]
        elif _BASE_LAYER in name:
            module, leaf = name.split(_BASE_LAYER, 1)
            if leaf != "weight":
                yield f"{module}.{leaf}", tensor
                continue
            key = "W"
        elif ".lora_" in name:
            raise ValueError(f"merge_adapters: {name} is an adapter tensor of a kind that cannot be merged yet")
        else:
            yield name, tensor
            continue
        got = parts.setdefault(module, {})
        got[key] = tensor
        if len(got) == 3:
            del parts[module]
            w, a, b = got["W"], got["A"], got["B"]  # [out, in], [r, in], [out, r]
            merged = w.float() + scales[module] * (b.float() @ a.float())  # [out, in]
            yield f"{module}.weight", merged.to(dtype or w.dtype)
    if parts:
        raise ValueError(f"merge_adapters: incomplete adapters at the end of the stream: {sorted(parts)}")


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the base model: every adapter off inside the block, back on after."""
    layers = list(lora_layers(model).values())
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    def keep_trainable() -> None:  # PEFT's switch also flips requires_grad: put it back as it was
        for name, p in model.named_parameters():
            p.requires_grad = trainable[name]

    for layer in layers:
        layer.enable_adapters(False)  # type: ignore[operator]
    # Right away, not only at the end: FSDP2 reads which parameters train when the model's first
    # forward initialises it; seeing none (a reference pass first), it would cast no gradient back to
    # the fp32 adapters' dtype and a bf16 compute dtype's gradients would then fail to land.
    keep_trainable()
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # type: ignore[operator]
        keep_trainable()
