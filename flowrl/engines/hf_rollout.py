"""A rollout engine on Hugging Face ``generate``: the ``hf`` backend (``rollout.backend=hf``).

It serves any model transformers can run, including architectures vLLM cannot load, and
is a reference when debugging the vLLM path: the same prompts, sampling settings and
weights go through plain PyTorch. It is much slower than vLLM (no paged KV cache or
continuous batching), so use it for small models or checks, not for throughput.

What it returns matches ``RolloutEngine.generate``: ``ROLLOUT_LOGPROBS`` are the log-probs
of the sampled tokens under the distribution they were drawn from (logits / T, after
top-k / top-p), like vLLM's ``processed_logprobs``. Each prompt is sampled under its own
seed (given, or drawn from the engine seed and a call counter), inside a forked RNG, so
the caller's RNG state is untouched and a resumed run samples what an uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flowrl.batch import Batch
from flowrl.engines.base import run_device
from flowrl.engines.vllm_rollout import DTYPES, prompt_token_lists
from flowrl.keys import Keys


@dataclass(frozen=True)
class HFRolloutConfig:
    model_path: str  # a Hugging Face model folder (config, weights, tokenizer)
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    pad_token_id: int | None = None  # None: the tokenizer's pad id, else its EOS id

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"HFRolloutConfig.dtype={self.dtype!r}: choose one of {list(DTYPES)}")


class HFRollout:
    """Generate with ``model.generate`` one prompt at a time; load weights with ``copy_``."""

    def __init__(self, config: HFRolloutConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.config = config
        self.dtype = DTYPES[config.dtype]
        self.device = torch.device(config.device)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=self.dtype).to(self.device)
        self.model.eval()
        self.model.generation_config = GenerationConfig()  # no sampling defaults from the folder
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        pad = config.pad_token_id if config.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_id)
        self._calls = 0

    @torch.no_grad()
    def generate(
        self,
        prompts: Batch,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_tokens: int = 256,
        ignore_eos: bool = False,
        seeds: list[int] | None = None,
    ) -> Batch:
        """``n`` samples per prompt (``aabb``) with the fields of ``RolloutEngine.generate``."""
        token_lists = prompt_token_lists(prompts)
        if seeds is not None and len(seeds) != len(token_lists):
            raise ValueError(f"HFRollout.generate: {len(seeds)} seeds for {len(token_lists)} prompts")
        if seeds is None:
            key = [self.config.seed, self._calls]
            seeds = np.random.SeedSequence(key).generate_state(len(token_lists), dtype=np.uint32).tolist()
        self._calls += 1
        rows: list[tuple[list[int], list[float]]] = []
        for ids, seed in zip(token_lists, seeds):
            rows += self._sample(ids, int(seed), n, temperature, top_p, top_k, max_tokens, ignore_eos)
        result = prompts.repeat(n, interleave=True)
        for key, value in self._fields(rows, max_tokens, ignore_eos).items():
            result[key] = value
        return result

    def _sample(
        self, ids: list[int], seed: int, n: int, temperature: float, top_p: float, top_k: int,
        max_tokens: int, ignore_eos: bool,
    ) -> list[tuple[list[int], list[float]]]:  # fmt: skip
        """``n`` responses to one prompt: (token ids up to the first EOS inclusive, their log-probs)."""
        greedy = temperature == 0
        sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": max(top_k, 0)}
        prompt = torch.tensor([ids], device=self.device)  # [1, P]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = self.model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=not greedy,
                num_return_sequences=1 if greedy else n,  # greedy: one answer, repeated below
                max_new_tokens=max_tokens,
                eos_token_id=None if ignore_eos else self.eos_token_id,
                pad_token_id=self.pad_token_id,
                output_scores=True,
                return_dict_in_generate=True,
                **sampling,
            )
        tokens = out.sequences[:, len(ids) :]  # [n, r]
        scores = torch.stack(out.scores, dim=1).float()  # [n, r, V], processed (T, top-k, top-p)
        logprobs = torch.log_softmax(scores, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [n, r]
        rows = []
        for row, lp in zip(tokens.tolist(), logprobs.tolist()):
            length = len(row)
            if not ignore_eos and self.eos_token_id in row:
                length = row.index(self.eos_token_id) + 1
            rows.append((row[:length], lp[:length]))
        return rows * n if greedy else rows

    def _fields(self, rows: list[tuple[list[int], list[float]]], width: int, ignore_eos: bool) -> dict[str, Any]:
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # [B*n, R]
        mask = torch.zeros(len(rows), width, dtype=torch.float32)  # [B*n, R]
        logprobs = torch.zeros(len(rows), width, dtype=torch.float32)  # [B*n, R]
        reasons = []
        for i, (tokens, lps) in enumerate(rows):
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[i, : len(tokens)] = 1.0
            logprobs[i, : len(tokens)] = torch.tensor(lps, dtype=torch.float32)
            stopped = not ignore_eos and len(tokens) > 0 and tokens[-1] == self.eos_token_id
            reasons.append("stop" if stopped else "length")
        return {
            Keys.RESPONSE_IDS: ids,
            Keys.RESPONSE_MASK: mask,
            Keys.ROLLOUT_LOGPROBS: logprobs,
            Keys.TRUNCATED: torch.tensor([r == "length" for r in reasons], dtype=torch.bool),
            Keys.FINISH_REASON: reasons,
        }

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (Hugging Face name, full tensor) pairs into the model; a tied weight needs one name."""
        params = self.model.state_dict()
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"HFRollout.load_weights: the model has no tensor {name!r}")
            params[name].copy_(tensor.to(device=self.device, dtype=params[name].dtype))

    def sleep(self, level: int = 1) -> None:
        """Nothing to free: the model is small enough to stay (this backend is not for big models)."""

    def wake_up(self, tags: list[str] | None = None) -> None:
        """See ``sleep``."""


def from_run_config(cfg: Any, rank: int) -> HFRollout:
    """The ``hf`` backend from the run config (``rollout.dtype``, ``trainer.seed`` + rank)."""
    if cfg.rollout.tensor_parallel_size != 1:
        raise ValueError("rollout.backend=hf runs one model per rank: set rollout.tensor_parallel_size=1")
    return HFRollout(
        HFRolloutConfig(
            model_path=cfg.actor.model.path,
            dtype=cfg.rollout.dtype,
            device=run_device(cfg),
            seed=cfg.trainer.seed + rank,
        )
    )
