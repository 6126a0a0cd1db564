"""Generation that takes new weights mid-sequence (partial rollouts), every token tagged with the
policy version that sampled it.

The asynchronous trainer (``placement.max_staleness``) sends new weights to the rollout
engines while they generate. ``generate_versioned`` runs vLLM's engine one step at a time;
between two steps (a token boundary) it asks ``take_weights`` for a newer policy. When one
comes, every unfinished sample is paused (its vLLM request aborted, the tokens it has so far
kept), the weights are loaded in place, and the sample continues as a new request whose
prompt is the original prompt plus its tokens so far. The continuation is prefilled under
the new weights (the prefix cache is reset by the load), so every later token, and its
sampler log-prob, is the new policy's exactly; the earlier tokens keep the old version tag
and the old policy's log-probs. ``TOKEN_VERSIONS`` records the version of every token, so an
off-policy correction (``actor.policy_loss``: truncated importance sampling, masking) applies
per token.

Each sample is its own vLLM request seeded by ``seed + i`` (its index within the prompt's
``n``); a continuation after a swap to version ``v`` is seeded from (seed, v), so a run is
reproducible given where the swaps fall.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from flowrl.batch import Batch
from flowrl.keys import Keys

Weights = tuple[int, Iterable[tuple[str, torch.Tensor]]]  # (policy version, (name, tensor) pairs)


@dataclass
class _Sample:
    row: int
    prompt: list[int]
    seed: int | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class SwapStats:
    swaps: int = 0  # weight loads during this call
    paused_samples: int = 0  # samples that were mid-sequence at a swap
    load_s: float = 0.0  # seconds spent loading weights


def continuation_seed(seed: int | None, version: int) -> int | None:
    """The seed of a sample's continuation under policy ``version`` (None stays None)."""
    return None if seed is None else (int(seed) * 1_000_003 + version) % (2**63 - 1)


def generate_versioned(
    rollout: Any,
    prompts: Batch,
    n: int,
    sampling: dict[str, Any],
    max_tokens: int,
    seeds: list[int] | None,
    version: int,
    take_weights: Callable[[], Weights | None] = lambda: None,
) -> tuple[Batch, SwapStats]:
    """``n`` samples per prompt (``aabb`` rows) from a ``VLLMRollout``, swapping in newer weights
    whenever ``take_weights`` has them. ``sampling``: temperature, top_p, top_k, ignore_eos.
    Returns the batch (``VLLMRollout.generate``'s fields plus ``TOKEN_VERSIONS``) and the swaps."""
    from vllm.inputs import TokensPrompt

    from flowrl.engines.vllm_rollout import prompt_token_lists

    engine, stats = rollout.llm.llm_engine, SwapStats()
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"generate_versioned: {len(seeds)} seeds for {len(prompts)} prompts")
    samples = [
        _Sample(i * n + j, ids, None if seeds is None else int(seeds[i]) + j)
        for i, ids in enumerate(prompt_token_lists(prompts))
        for j in range(n)
    ]
    live: dict[str, _Sample] = {}

    def submit(s: _Sample) -> None:
        rid = f"v{version}-{s.row}-{len(s.tokens)}-{time.monotonic_ns()}"
        seed = s.seed if not s.tokens else continuation_seed(s.seed, version)
        params = _params(sampling, max_tokens - len(s.tokens), seed)
        engine.add_request(rid, TokensPrompt(prompt_token_ids=s.prompt + s.tokens), params)
        live[rid] = s

    for s in samples:
        submit(s)
    while live:
        new = take_weights()
        if new is not None:
            version = _swap(rollout, engine, live, new, stats)
            paused = list(live.values())
            live.clear()
            for s in paused:
                submit(s)
        for out in engine.step():
            s = _owner(live, out.request_id)
            c = out.outputs[0]
            tokens = list(c.token_ids)
            s.tokens += tokens
            s.logprobs += [float(lp[t].logprob) for t, lp in zip(tokens, c.logprobs or [])]
            s.versions += [version] * len(tokens)
            if out.finished:
                s.finish_reason = str(c.finish_reason)
                live.pop(_key(live, out.request_id))
    return _as_batch(prompts, n, samples, max_tokens, rollout.pad_token_id), stats


def _swap(rollout: Any, engine: Any, live: dict[str, _Sample], new: Weights, stats: SwapStats) -> int:
    """Pause every live request, load ``new`` in place; returns its version."""
    start = time.perf_counter()
    if live:
        engine.abort_request(list(live))
        stats.paused_samples += len(live)
    version, weights = new
    rollout.load_weights(weights)
    stats.swaps += 1
    stats.load_s += time.perf_counter() - start
    return int(version)


def _key(live: dict[str, _Sample], request_id: str) -> str:
    """Our id of a vLLM output (vLLM >= 0.30 may report ``<ours>-<8 chars>``)."""
    return request_id if request_id in live else request_id.rsplit("-", 1)[0]


def _owner(live: dict[str, _Sample], request_id: str) -> _Sample:
    return live[_key(live, request_id)]


def _params(sampling: dict[str, Any], max_tokens: int, seed: int | None) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        temperature=sampling["temperature"],
        top_p=sampling.get("top_p", 1.0),
        top_k=sampling.get("top_k", 0),
        max_tokens=max_tokens,
        ignore_eos=sampling.get("ignore_eos", False),
        logprobs=0,
        detokenize=False,
        seed=seed,
        output_kind=RequestOutputKind.DELTA,
    )


def _as_batch(prompts: Batch, n: int, samples: list[_Sample], width: int, pad_token_id: int) -> Batch:
    rows = len(samples)
    ids = torch.full((rows, width), pad_token_id, dtype=torch.long)  # [B*n, R]
    mask = torch.zeros(rows, width, dtype=torch.float32)  # [B*n, R]
    logprobs = torch.zeros(rows, width, dtype=torch.float32)  # [B*n, R]
    versions = torch.full((rows, width), -1, dtype=torch.long)  # [B*n, R]
    for s in samples:
        k = len(s.tokens)
        ids[s.row, :k] = torch.tensor(s.tokens, dtype=torch.long)
        mask[s.row, :k] = 1.0
        logprobs[s.row, :k] = torch.tensor(s.logprobs, dtype=torch.float32)
        versions[s.row, :k] = torch.tensor(s.versions, dtype=torch.long)
    result = prompts.repeat(n, interleave=True)
    result[Keys.RESPONSE_IDS] = ids
    result[Keys.RESPONSE_MASK] = mask
    result[Keys.ROLLOUT_LOGPROBS] = logprobs
    result[Keys.TOKEN_VERSIONS] = versions
    result[Keys.TRUNCATED] = torch.tensor([s.finish_reason == "length" for s in samples], dtype=torch.bool)
    result[Keys.FINISH_REASON] = [str(s.finish_reason) for s in samples]
    return result
