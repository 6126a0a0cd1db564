"""Export of a LoRA run's adapter-only checkpoint: the base weights come from the model folder,
cast to the dtype the run held them in (``rollout.dtype``), the adapters from the checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from flowrl.engines.lora import LoraConfig, apply_lora
from flowrl.export import export_checkpoint
from flowrl.models.tiny import make_tiny_model

pytest.importorskip("peft", reason="LoRA needs peft (the lower-bounds environment has none)")

LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


def adapter_only_checkpoint(model_dir: Path, ckpt: Path, base_dtype: torch.dtype) -> torch.nn.Module:
    """A trained-looking LoRA model (base cast to ``base_dtype``, adapters random) and a DCP folder
    holding only its adapters, as ``FSDPEngine.save`` writes for a LoRA run."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    apply_lora(model, LoraConfig(**LORA), seed=0, frozen_dtype=base_dtype)
    g = torch.Generator().manual_seed(1)
    adapters = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=g) * 0.1
            adapters[name] = p.data
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({"model": adapters}, checkpoint_id=str(ckpt))
    return model


def merged_by_hand(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """W + (alpha / r) B A for every adapted Linear, from the model's own (fp32-upcast) values."""
    out, scale = {}, LORA["alpha"] / LORA["rank"]
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            base = module.base_layer.weight.float()
            delta = module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()
            out[name.removeprefix("base_model.model.") + ".weight"] = base + scale * delta
    return out


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_adapter_only_checkpoint_exports_on_the_base_as_the_run_held_it(tmp_path: Path, dtype_name: str) -> None:
    from safetensors.torch import load_file

    make_tiny_model(tmp_path / "base")
    dtype = getattr(torch, dtype_name)
    trained = adapter_only_checkpoint(tmp_path / "base", tmp_path / "ckpt", dtype)
    want = merged_by_hand(trained)
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "base", tmp_path / "hf", lora=LORA, base_dtype=dtype_name)
    got = load_file(str(out / "model.safetensors"))
    assert want and all(torch.equal(got[name], w) for name, w in want.items()), sorted(want)
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    untouched = "model.layers.0.mlp.up_proj.weight"  # not adapted: the base's value, as the run held it
    assert torch.equal(got[untouched], base[untouched].to(dtype).float())
    if dtype == torch.bfloat16:  # without the recorded dtype the export would use the fp32 base: other weights
        plain = export_checkpoint(tmp_path / "ckpt", tmp_path / "base", tmp_path / "hf32", lora=LORA)
        assert not torch.equal(load_file(str(plain / "model.safetensors"))[untouched], got[untouched])


def test_a_checkpoint_missing_an_adapter_is_refused(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    make_tiny_model(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({"model": {"unrelated": torch.zeros(2)}}, checkpoint_id=str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="lacks .* weights"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "base", tmp_path / "hf", lora=LORA, base_dtype="bfloat16")
