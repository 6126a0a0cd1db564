"""Accuracy of a model folder on RL rows, scored by the rule rewards (``flowrl eval``).

The same pieces as a training run's validation (``flowrl.trainer.loop.evaluate``): prompts
rendered with the tokenizer's chat template and tokenized by ``PromptDataset``, responses
from a vLLM engine (``VLLMRollout``) in this process, decoded with special tokens
skipped, and scored by ``RewardRunner``. A sample is correct when its score is >= 1, so
greedy accuracy here equals a run's ``val/accuracy`` for the same model, data, prompt
length and response length.

With ``n > 1`` samples per prompt (``temperature > 0``) ``accuracy`` is the mean over all
samples and ``pass_at_n`` the fraction of prompts with at least one correct sample.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from flowrl.batch import Batch
from flowrl.keys import Keys
from flowrl.rewards import RewardConfig, RewardResolver, RewardRunner

Metrics = dict[str, float]


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation; every default lives here (the CLI only overrides)."""

    model_path: str  # a Hugging Face folder (an exported policy, an SFT output's model/)
    data_files: list[str]  # RL rows: prompt, data_source, reward_model.ground_truth (parquet/JSONL)
    max_samples: int = -1  # the first rows only; -1: all (like data.val_max_samples)
    max_new_tokens: int = 256  # response length limit (rollout.max_response_length)
    max_prompt_length: int = 512  # longer prompts are skipped (data.prompts.max_prompt_length)
    prompt_key: str = "prompt"  # the prompt's column (data.prompts.prompt_key; docs/data.md)
    ground_truth_key: str = ""  # a top-level answer column; "": reward_model.ground_truth (data.prompts.ground_truth_key)
    data_source: str = ""  # for rows without a data_source column (data.prompts.data_source)
    temperature: float = 0.0  # 0: greedy (rollout.val_temperature)
    n: int = 1  # samples per prompt; > 1 needs temperature > 0
    seed: int = 0  # vLLM's sampling seed
    dtype: str = "float32"  # vLLM weights dtype: float32 on CPU, bfloat16 on GPU
    reward_function: str | None = None  # "pkg.module:function" for every row; unset: by data_source
    out: str | None = None  # a JSONL file: one line per sample with prompt, response, score
    reward: RewardConfig = field(default_factory=RewardConfig)  # rule rewards (a run's `reward` group)

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        check(
            os.path.isfile(os.path.join(self.model_path, "config.json")),
            f"model {self.model_path}: not a Hugging Face model folder (no config.json)",
        )
        check(bool(self.data_files), "no data files: name at least one parquet/JSONL file of RL rows")
        for path in self.data_files:
            check(os.path.isfile(path), f"data file {path}: no such file")
        check(self.max_new_tokens >= 1, f"--max-new-tokens={self.max_new_tokens} must be >= 1")
        check(self.max_prompt_length >= 1, f"--max-prompt-length={self.max_prompt_length} must be >= 1")
        check(self.n >= 1, f"--n={self.n} must be >= 1")
        check(self.temperature >= 0, f"--temperature={self.temperature} must be >= 0")
        check(
            self.n == 1 or self.temperature > 0,
            f"--n={self.n} samples per prompt need --temperature > 0 (greedy answers are all the same)",
        )
        check(self.max_samples == -1 or self.max_samples >= 1, f"--max-samples={self.max_samples}: use -1 or >= 1")


@dataclass(frozen=True)
class EvalResult:
    metrics: Metrics  # accuracy, score, pass_at_n, samples, prompts
    records: list[dict[str, Any]]  # per sample: index, prompt, response, ground_truth, data_source, score

    def line(self) -> str:
        m = self.metrics
        correct = round(m["accuracy"] * m["samples"])
        text = f"accuracy={m['accuracy']:.4f} ({correct}/{int(m['samples'])}) score={m['score']:.4f}"
        if m["n"] > 1:
            text += f" pass@{int(m['n'])}={m['pass_at_n']:.4f}"
        return f"{text} prompts={int(m['prompts'])}"


COLUMN_KEYS = ("prompt_key", "ground_truth_key", "data_source")  # data.prompts' keys that say where fields are


def settings_of_run(run: str) -> dict[str, Any]:
    """EvalConfig fields from a training run's ``config.yaml`` (the file or its folder): the
    response and prompt lengths, ``data.val_max_samples`` and the ``reward`` group, so that
    greedy accuracy here equals that run's ``val/accuracy``."""
    from omegaconf import OmegaConf

    from flowrl.data.dataset import PromptDataConfig

    path = os.path.join(run, "config.yaml") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise ValueError(f"--like-run {run}: no run config (config.yaml) there")
    cfg = OmegaConf.load(path)
    try:
        reward = OmegaConf.to_container(cfg.reward, resolve=True)
        return {
            "max_new_tokens": int(cfg.rollout.max_response_length),
            "max_prompt_length": int(cfg.data.prompts.max_prompt_length),
            **{k: str(cfg.data.prompts.get(k, getattr(PromptDataConfig(), k))) for k in COLUMN_KEYS},
            "max_samples": int(cfg.data.val_max_samples) if int(cfg.data.val_max_samples) > 0 else -1,
            "reward": RewardConfig(**reward),
        }
    except Exception as e:  # noqa: BLE001 - any malformed file gets the same one-line answer
        raise ValueError(f"--like-run {path}: not a flowrl run config ({type(e).__name__}: {e})") from None


def evaluate_model(cfg: EvalConfig) -> EvalResult:
    """Generate for the first ``max_samples`` prompts, score every response, write ``cfg.out``."""
    prompts = load_prompts(cfg)
    resolver = reward_resolver(cfg, [str(s) for s in prompts[Keys.DATA_SOURCE]])  # before vLLM starts
    batch = generate(cfg, prompts)
    scored = score(resolver, batch)
    scores = scored[Keys.SCORES]  # [N * n]
    result = EvalResult(accuracy_metrics(scores, cfg.n), sample_records(batch, scores, cfg.n))
    if cfg.out:
        write_records(cfg.out, result.records)
    return result


def load_prompts(cfg: EvalConfig) -> Batch:
    """The prompts as training validation builds them (chat template, prompt-length filter)."""
    from transformers import AutoTokenizer

    from flowrl.data.dataset import PromptDataConfig, PromptDataset

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    columns = {k: getattr(cfg, k) for k in COLUMN_KEYS}
    data = PromptDataset(
        list(cfg.data_files), tokenizer, PromptDataConfig(max_prompt_length=cfg.max_prompt_length, **columns)
    )
    count = len(data) if cfg.max_samples < 0 else min(len(data), cfg.max_samples)
    if count == 0:
        raise ValueError(
            f"{', '.join(cfg.data_files)}: no prompt of at most {cfg.max_prompt_length} tokens; "
            "raise --max-prompt-length"
        )
    return data.collate(list(range(count)))


def generate(cfg: EvalConfig, prompts: Batch) -> Batch:
    """``n`` responses per prompt (``aabb`` order) with ``RESPONSE_TEXT``, from vLLM in this process."""
    from flowrl.engines.vllm_rollout import VLLMRollout, VLLMRolloutConfig

    rollout = VLLMRollout(
        VLLMRolloutConfig(
            model_path=cfg.model_path,
            dtype=cfg.dtype,
            max_model_len=cfg.max_prompt_length + cfg.max_new_tokens,
            seed=cfg.seed,
            warmup=False,
        )
    )
    out = rollout.generate(prompts, n=cfg.n, temperature=cfg.temperature, max_tokens=cfg.max_new_tokens)
    tokenizer = rollout.llm.get_tokenizer()  # the decoding of ActorRollout.generate
    ids, mask = out[Keys.RESPONSE_IDS], out[Keys.RESPONSE_MASK]  # [N * n, R]
    out[Keys.RESPONSE_TEXT] = [
        tokenizer.decode(row[: int(m.sum())].tolist(), skip_special_tokens=True) for row, m in zip(ids, mask)
    ]
    return out


def reward_resolver(cfg: EvalConfig, data_sources: list[str]) -> RewardResolver:
    """The rule reward of each data source; an unknown source or a bad path fails here, by name."""
    reward = cfg.reward if cfg.reward_function is None else replace(cfg.reward, function=cfg.reward_function)
    resolver = RewardResolver(reward)
    for source in dict.fromkeys(data_sources):
        try:
            resolver(source)
        except ValueError as e:
            raise ValueError(f"{e}; with flowrl eval: --reward-function pkg.module:function") from None
    return resolver


def score(resolver: RewardResolver, batch: Batch) -> Batch:
    """The rule rewards of every response (``SCORES``; a failing function scores 0), called inline."""
    with RewardRunner(resolver, RewardConfig().timeout_s, num_workers=0) as runner:
        return runner.score(batch)


def accuracy_metrics(scores: torch.Tensor, n: int) -> Metrics:
    """Accuracy (score >= 1) and mean score over all samples; pass@n over prompts (``aabb`` order)."""
    correct = (scores >= 1.0).float()  # [N * n]
    per_prompt = correct.view(-1, n)  # [N, n]
    return {
        "accuracy": float(correct.mean()),
        "score": float(scores.mean()),
        "pass_at_n": float(per_prompt.amax(dim=1).mean()),
        "samples": float(len(scores)),
        "prompts": float(per_prompt.shape[0]),
        "n": float(n),
    }


def sample_records(batch: Batch, scores: torch.Tensor, n: int) -> list[dict[str, Any]]:
    return [
        {
            "index": i // n,
            "prompt": batch[Keys.PROMPT_TEXT][i],
            "response": batch[Keys.RESPONSE_TEXT][i],
            "ground_truth": batch[Keys.GROUND_TRUTH][i],
            "data_source": batch[Keys.DATA_SOURCE][i],
            "score": float(scores[i]),
            "correct": bool(scores[i] >= 1.0),
        }
        for i in range(len(batch))
    ]


def write_records(path: str, records: list[dict[str, Any]]) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, default=str) + "\n")
